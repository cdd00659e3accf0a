"""report.html: one self-contained page per run, rendered from the run's artifacts, checked in a real
browser (Debian's chromium, headless) when one is installed."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow import MlflowClient
from PIL import Image

from defect_detection.data.records import ImageRecord
from defect_detection.evaluation.reports import prediction_table, write_report
from defect_detection.evaluation.thresholds import ThresholdChoice
from defect_detection.reports.html import REPORT_FILE, log_html_report
from defect_detection.tracking.mlflow_run import RunTracker

DATA_URI = re.compile(r'src="data:image/(png|jpeg);base64,([^"]+)"')


def _tracker(tmp_path: Path) -> RunTracker:
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    client = MlflowClient(uri)
    exp = client.create_experiment("defect-detection", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, run_name="tiny", tags={"git_commit": "abc1234", "dataset": "synthetic",
                                                        "categories": "disc,plate", "backbone": "lite0"})
    return RunTracker(client, run.info.run_id, uri)


@pytest.fixture
def logged_run(tmp_path):
    """A run with what defect-train logs, written without training: reports/, data/, gradcam/, config."""
    tracker = _tracker(tmp_path)
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.05, 0.2, 0.45, 0.55, 0.7, 0.35, 0.52, 0.6, 0.8, 0.9, 0.95]
    records = []
    for i, label in enumerate(labels):
        path = tmp_path / "img" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((24, 24, 3), 20 * i, np.uint8)).save(path)
        defect_type = "good" if label == 0 else "scratch"
        records.append(ImageRecord(str(path), label, ["disc", "plate"][i % 2], defect_type))
    choice = ThresholdChoice(0.5, "f1_max", "val")
    tracker.log_dict({"value": 0.5, "policy": "f1_max", "chosen_on": "val",
                      "counts_on_val": {"tp": 3, "fp": 0, "fn": 1, "tn": 4},
                      "warnings": ["all val scores are equal"], "config": {"policy": "f1_max"}},
                     "reports/threshold.json")
    write_report(prediction_table(records, p, 0.5), choice, tracker=tracker, log_core_metrics=False)
    tracker.log_dict([{"check": "duplicates_across_splits", "message": "2 identical files in train and test",
                       "paths": ["a.png", "b.png"]}], "data/audit.json")
    tracker.log_table_csv(__import__("pandas").DataFrame(
        [{"path": r.path, "category": r.category, "defect_type": r.defect_type,
          "label": ["good", "defect"][r.label], "split": "test"} for r in records]), "data/splits.csv")
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().imshow(np.random.default_rng(0).random((8, 8)))
    tracker.log_figure(fig, "gradcam/gallery_defects.png")
    tracker.log_dict({"stage": "test", "layer": "net.conv_head", "target": "defect", "n_masked": 6,
                      "metrics": {"test/cam_pointing_game": 0.8333, "test/cam_pixel_auroc": 0.9123}},
                     "gradcam/summary.json")
    tracker.log_text("seed: 42\nbackbone:\n  name: lite0\n", "config.yaml")
    tracker.set_tags({"leaky_protocol": True, "warning": "seed split: val = test"})
    return tracker


def _page(tracker: RunTracker, tmp_path: Path) -> tuple[str, Path]:
    uri = log_html_report(tracker)
    assert uri and uri.endswith("/" + REPORT_FILE)
    path = Path(tracker.client.download_artifacts(tracker.run_id, REPORT_FILE, str(tmp_path / "dl")))
    return path.read_text(encoding="utf-8"), path


def test_report_html_is_logged_self_contained_and_holds_every_section(logged_run, tmp_path):
    html, _ = _page(logged_run, tmp_path)
    assert "<script" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing loaded from the network
    images = DATA_URI.findall(html)
    assert len(images) >= 8  # confusion, ROC, PR, histogram, sweep, reliability, errors, Grad-CAM
    for _, payload in images:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            image.load()
            assert image.width > 10 and image.height > 10
    head = html[:html.index('id="decision"')]  # warnings come first
    for text in ("Leaky protocol", "all val scores are equal", "duplicates_across_splits", "a.png"):
        assert text in head, text
    assert 'id="threshold">0.5000<' in html and "f1_max" in html and "chosen on <b>val</b>" in html
    assert "TN 3" in html and "FP 2" in html and "FN 1" in html and "TP 5" in html
    assert "0.8333" in html and "0.9123" in html  # localisation scores
    assert "abc1234" in html and "name: lite0" in html  # git commit and config
    assert "Recall per category" in html and "plate" in html
    summary = json.loads(Path(logged_run.client.download_artifacts(
        logged_run.run_id, "reports/summary.json", str(tmp_path / "s"))).read_text())
    assert f'id="kpi-auroc"><b>{summary["metrics"]["auroc"]:.4f}<' in html


def test_a_run_without_artifacts_gets_a_page_with_notes_not_an_error(tmp_path):
    tracker = _tracker(tmp_path)
    html, _ = _page(tracker, tmp_path)
    assert "Not in this run: reports/summary.json" in html
    assert "Not in this run: data/" in html and "Not in this run: gradcam/" in html


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = "images=" + imgs.length + " broken=" + bad.length + " text=" +
      document.body.innerText.length;
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_html_renders_in_headless_chromium(logged_run, tmp_path):
    html, _ = _page(logged_run, tmp_path)
    probe = tmp_path / "probe.html"  # the logged page has no script: the probe adds one
    probe.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    common = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'id="render-check">images=(\d+) broken=(\d+) text=(\d+)<', dom)
    assert found, dom[-2000:]
    n_images, broken, n_text = map(int, found.groups())
    assert n_images == len(DATA_URI.findall(html)) >= 8 and broken == 0
    assert n_text > 1000
    assert 'id="threshold">0.5000<' in dom and "Leaky protocol" in dom and "TP 5" in dom
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--hide-scrollbars", "--window-size=1280,2000", f"--screenshot={shot}",
                    probe.as_uri()], capture_output=True, timeout=120)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert image.size == (1280, 2000) and pixels.std() > 10  # something was drawn, not a blank page
