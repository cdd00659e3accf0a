"""Screenshots of the MLflow UI and of a run's report.html, taken with headless chromium.

    python scripts/screenshots.py --store mlruns/mlflow.db --out docs/images/ui

Starts `mlflow ui` on the store (a free port on 127.0.0.1), shoots the runs table of the
experiment, the newest finished run's overview and metric charts, its artifact view with
report.html selected, the registered model (when one exists) and report.html itself, then stops
the server. Needs Debian's chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"nothing answered at {url} within {seconds:.0f} s")


def shoot(chromium: str, url: str, out: Path, size: str, profile: Path, budget_ms: int,
          charts: bool = False) -> None:
    # charts: the metric charts draw only with every compositor stage run (which blanks iframes)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--hide-scrollbars", *(["--run-all-compositor-stages-before-draw"] if charts else []),
                    f"--user-data-dir={profile}", f"--window-size={size}",
                    f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"{out}  <- {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="mlruns/mlflow.db", help="sqlite file or tracking URI")
    parser.add_argument("--experiment", default="defect-detection")
    parser.add_argument("--run-id", default=None, help="default: the newest FINISHED run with report.html")
    parser.add_argument("--model", default="defect-classifier", help="registered model to shoot")
    parser.add_argument("--out", default="docs/images/ui")
    parser.add_argument("--budget-ms", type=int, default=30000, help="chromium virtual time per page")
    args = parser.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    uri = args.store if "://" in args.store else f"sqlite:///{Path(args.store).resolve()}"
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {uri}")
    eid = experiment.experiment_id
    run_id = args.run_id
    if run_id is None:
        for run in client.search_runs([eid], "attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"]):
            if any(a.path == "report.html" for a in client.list_artifacts(run.info.run_id)):
                run_id = run.info.run_id
                break
    if run_id is None:
        raise SystemExit("no finished run with report.html: train one first (defect-train)")
    models = [m.name for m in client.search_registered_models() if m.name == args.model]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"{base}/health")
        with tempfile.TemporaryDirectory() as profile:
            profile = Path(profile)
            run = f"{base}/#/experiments/{eid}/runs/{run_id}"
            pages = [("mlflow_runs_table.png", f"{base}/#/experiments/{eid}/runs", "1900,900"),
                     ("mlflow_run_overview.png", run, "1600,1100"),
                     ("mlflow_run_metrics.png", f"{run}/model-metrics", "1600,1100"),
                     ("mlflow_artifact_report_html.png", f"{run}/artifacts/report.html", "1600,1100")]
            if models:
                pages.append(("mlflow_registered_model.png", f"{base}/#/models/{args.model}", "1600,800"))
            for name, url, size in pages:
                charts = name.endswith("metrics.png")
                shoot(chromium, url, out / name, size, profile, args.budget_ms, charts=charts)
            with tempfile.TemporaryDirectory() as tmp:
                page = client.download_artifacts(run_id, "report.html", tmp)
                shoot(chromium, Path(page).as_uri(), out / "report_html.png", "1280,2400", profile, 5000)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # mlflow ui runs its server in child processes
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
