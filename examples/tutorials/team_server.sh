# --8<-- [start:server]
# on the server host: MLflow with a PostgreSQL backend store and a shared artifact root
pip install "mlflow>=3.1" "psycopg[binary]>=3.1" boto3
mlflow server --backend-store-uri postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
    --artifacts-destination s3://bucket/mlflow --serve-artifacts --host 0.0.0.0 --port 5000
    # or --artifacts-destination /mnt/shared/mlflow-artifacts
# --8<-- [end:server]
# --8<-- [start:client]
# on every workstation: the checkout (or the wheel) with the PostgreSQL driver, pointed at the server
pip install -e '.[postgres]'
export MLFLOW_TRACKING_URI=http://mlflow-host:5000
defect-train logger=mlflow_server data=folder data.root=/data/line3 data.category=line3
defect-promote logger=mlflow_server
# --8<-- [end:client]
# --8<-- [start:predict]
# the line PC: the champion from the server, every scored part in the team's prediction log
export MLFLOW_TRACKING_URI=http://mlflow-host:5000
defect-predict images=/data/line3/today prediction_log.url=postgresql://mlflow:PASSWORD@db-host:5432/mlflow
# --8<-- [end:predict]
# --8<-- [start:after]
# monitor and review read the same log
defect-monitor prediction_log_url=postgresql://mlflow:PASSWORD@db-host:5432/mlflow window.last=500 defect_share=0.02
defect-review prediction_log_url=postgresql://mlflow:PASSWORD@db-host:5432/mlflow reviewer=anna
# --8<-- [end:after]
