"""The code MLflow stores with every logged model (models from code): it only imports the installed
defect_detection package, so the store holds no pickled objects and no code of ours to unpickle."""

import mlflow

from defect_detection.tracking.pyfunc import DefectPyfunc

mlflow.models.set_model(DefectPyfunc())
