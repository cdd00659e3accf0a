"""Known third-party noise, silenced where it is emitted: each filter names one message and the module
that emits it, so any other warning or log line of those libraries still shows.

- pytorch_lightning/utilities/_pytree.py builds a torch `LeafSpec` on every step, which torch >= 2.9
  deprecates with a FutureWarning (Lightning's code, nothing a caller can change);
- Lightning logs a "💡 Tip: ... litlogger" advertisement at INFO whenever a Trainer gets a logger;
- MLflow warns "Add type hints to the `predict` method" when DefectPyfunc is defined: its predict
  takes paths, DataFrames or arrays of any size on purpose, which MLflow's type-hint validation
  would reject or coerce.

MLflow emits its warning inside its own `warnings.catch_warnings(); simplefilter("once", UserWarning)`
(mlflow.utils.annotations.filter_user_warnings_once), which outranks any filter set from outside, so
that one is also dropped where warnings are shown (`warnings.showwarning`), matched on the same
message and on the emitting file; every other warning passes through unchanged.

`quiet_third_party()` is idempotent; `defect_detection/__init__.py` calls it on import, before
MLflow or Lightning are imported by any entry point.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

LEAFSPEC_MESSAGE = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
LEAFSPEC_MODULE = r"pytorch_lightning\.utilities\._pytree\Z"
# MLflow's color_warning wraps the text in ANSI colour codes: allow a prefix before the words
MLFLOW_TYPE_HINT_MESSAGE = r"(\x1b\[[0-9;]*m)?Add type hints to the `predict` method"
MLFLOW_TYPE_HINT_MODULE = r"mlflow\.pyfunc\.utils\.data_validation\Z"
MLFLOW_TYPE_HINT_FILE = os.path.join("mlflow", "pyfunc", "utils", "data_validation.py")
LIGHTNING_TIP_LOGGER = "pytorch_lightning.utilities.rank_zero"  # where rank_zero_info logs


class DropLitLoggerTip(logging.Filter):
    """Drops Lightning's litlogger advertisement and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.lstrip("💡 ").startswith("Tip:") and "litlogger" in message)


def _is_mlflow_type_hint_warning(message, category, filename: str) -> bool:
    return (issubclass(category, UserWarning) and str(filename).endswith(MLFLOW_TYPE_HINT_FILE)
            and re.match(MLFLOW_TYPE_HINT_MESSAGE, str(message), re.I) is not None)


def _showwarning_without_mlflow_type_hint(show):
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _is_mlflow_type_hint_warning(message, category, filename):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._defect_quiet = True
    showwarning.__wrapped__ = show
    return showwarning


def quiet_third_party() -> None:
    warnings.filterwarnings("ignore", message=LEAFSPEC_MESSAGE, category=FutureWarning,
                            module=LEAFSPEC_MODULE)
    warnings.filterwarnings("ignore", message=MLFLOW_TYPE_HINT_MESSAGE, category=UserWarning,
                            module=MLFLOW_TYPE_HINT_MODULE)
    if not getattr(warnings.showwarning, "_defect_quiet", False):
        warnings.showwarning = _showwarning_without_mlflow_type_hint(warnings.showwarning)
    logger = logging.getLogger(LIGHTNING_TIP_LOGGER)
    if not any(isinstance(f, DropLitLoggerTip) for f in logger.filters):
        logger.addFilter(DropLitLoggerTip())


def mask_credentials_in_mlflow_logs() -> None:
    """MLflow logs through its own handler (not the root's, where Hydra's RedactFilter sits), e.g.
    "View run ... at: <tracking URI>/#/...": mask credentials there too. Called once MLflow is
    imported (tracking/mlflow_run.py), since its handler exists only from then on."""
    from defect_detection.redact import RedactFilter

    for handler in logging.getLogger("mlflow").handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
