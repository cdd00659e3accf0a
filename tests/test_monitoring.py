"""After deployment (issue 37): the prediction log, defect-monitor, the review queue and its export,
retraining with the reviewed parts (lineage), and the challenger against the champion."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from defect_detection.base import UserError
from defect_detection.monitoring.checks import image_checks, psi, reject_rate_check
from defect_detection.monitoring.prediction_log import PredictionLog
from defect_detection.monitoring.review import escape_estimate, export_reviewed, review_queue

SIZE = 96  # 4 epochs at 96 px: val AUROC ~0.97 (at 64 px the small scratches are at chance)


def _parts(
    folder: Path,
    n: int,
    seed: int,
    defect_share: float = 0.3,
    lighting: float = 1.0,
    kinds=("scratch", "spot", "crack"),
) -> list[Path]:
    from defect_detection.data.synthetic import synthetic_part

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = str(rng.choice(kinds)) if rng.random() < defect_share else "good"
        path = folder / f"{i:03d}_{kind}.png"
        Image.fromarray(synthetic_part("disc", kind, rng, SIZE, lighting)).save(path)
        out.append(path)
    return out


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A trained champion (tiny synthetic discs) in its own store: (root, model URI, run id, env)."""
    from defect_detection import fit
    from defect_detection.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("deployed")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"}
    os.environ.update(env)
    try:
        line = generate_synthetic(
            root / "line",
            categories=("disc",),
            n_train_good=30,
            n_test_good=10,
            n_per_defect=6,
            image_size=SIZE,
        )
        result = fit(
            "data=mvtec",
            f"data.root={line}",
            "data.categories=[disc]",
            f"data.image_size={SIZE}",
            "trainer.max_epochs=4",
            "callbacks.early_stopping=null",
            "explain=none",
            "callbacks.progress_bar=null",
            f"paths.root_dir={root}",
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return root, result.model_uri, result.run_id, env


def _predict(deployed, folder: Path, *extra: str) -> pd.DataFrame:
    from defect_detection.api import predict

    root, uri, _, env = deployed
    os.environ.update(env)
    try:
        return predict(
            str(folder),
            f"model={uri}",
            f"output={folder.parent / (folder.name + '.csv')}",
            f"paths.root_dir={root}",
            *extra,
        )
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def _log(deployed) -> PredictionLog:
    return PredictionLog(f"sqlite:///{deployed[0] / 'mlruns' / 'predictions.db'}")


def test_predict_logs_every_part_with_its_model_stats_hash_and_maps(deployed, tmp_path):
    root, uri, run_id, _ = deployed
    before = len(_log(deployed).window())
    parts = _parts(tmp_path / "batch", 12, seed=1)
    table = _predict(deployed, tmp_path / "batch", "prediction_log.audit_fraction=1.0",
                     "prediction_log.map_budget=1000")  # no time budget: every map
    rows = _log(deployed).window()[before:]
    assert len(rows) == len(parts) == len(table)
    by_path = {r.image_path: r for r in rows}
    for _, t in table.iterrows():
        r = by_path[t["path"]]
        assert (r.decision, round(r.p_defect, 6), r.run_id, r.model_uri, r.source) == (
            t["decision"],
            round(t["p_defect"], 6),
            run_id,
            uri,
            "predict",
        )
        assert r.content_hash and set(json.loads(r.stats)) >= {"brightness", "sharpness", "thumb", "height"}
        assert r.audit == (r.decision == "good")  # audit_fraction=1: every passed part drawn
        assert bool(r.map_png) == (r.decision == "defect" or r.borderline)
    again = _predict(deployed, tmp_path / "batch")  # the same files: the same content hashes
    assert len(again) == len(parts)
    hashes = [r.content_hash for r in _log(deployed).window()[-len(parts) :]]
    assert sorted(hashes) == sorted(r.content_hash for r in rows)


def test_maps_keep_to_their_time_budget_most_needed_first(monkeypatch):
    """A map costs a backward pass: the log draws maps only while the time they take stays within
    map_budget of the scoring pass (a fake clock: each map takes 1 s)."""
    from defect_detection.monitoring import recorder as rec

    clock = iter(range(10_000))
    monkeypatch.setattr(rec.time, "perf_counter", lambda: float(next(clock)))

    def rows():
        out = [{"image_path": f"{i}.png", "decision": "good", "borderline": False, "p_defect": 0.1,
                "threshold": 0.5, "map_png": None} for i in range(20)]
        out[3].update(decision="defect", p_defect=0.9)
        out[7].update(borderline=True, p_defect=0.45)
        out[9].update(borderline=True, p_defect=0.3)
        out[12].update(decision="defect", p_defect=0.6)
        return out

    def draw(row):
        next(clock)  # drawing a map takes one tick
        return row["image_path"].encode()

    # each map: one tick to draw, one to read the clock after it (2 s each); a map's first guess
    # is MAP_COST_PER_PART (20) x the scoring time of one part
    for budget, scoring_seconds, n_scored, expected in [
        (0.0, 100.0, 20, []),  # no budget: no map
        (1000.0, 100.0, 20, ["3.png", "12.png", "7.png", "9.png"]),  # flagged, then borderline nearest first
        (0.03, 100.0, 20, []),  # 3 s of budget, the first map guessed at 20 x 5 s: none
        (0.015, 400.0, 1334, ["3.png", "12.png", "7.png"]),  # 6 s: the guess (6 s) fits, then 2 s each
    ]:
        r = rec.Recorder(None, None, "predict", map_budget=budget)
        got = rows()
        made, wanted = r.fill_maps(got, n_scored, scoring_seconds, draw)
        assert (made, wanted) == (len(expected), 4)
        assert {g["image_path"] for g in got if g["map_png"]} == set(expected)
    assert [g["image_path"] for g in rec.map_order(rows())] == ["3.png", "12.png", "7.png", "9.png"]


def test_the_review_page_draws_the_maps_scoring_left(deployed, tmp_path):
    from fastapi.testclient import TestClient

    from defect_detection.monitoring.review_app import create_app
    from defect_detection.pipeline.review import map_drawer

    root, uri, _, env = deployed
    before = len(_log(deployed).window())
    _parts(tmp_path / "nomaps", 10, seed=8, defect_share=0.6)
    _predict(deployed, tmp_path / "nomaps", "prediction_log.map_budget=0")
    rows = _log(deployed).window()[before:]
    wanted = [r for r in rows if r.decision == "defect" or r.borderline]
    assert wanted and not any(r.map_png for r in rows)  # no budget: scoring drew no map
    client = TestClient(create_app(_log(deployed), reviewer="anna",
                                   draw_map=map_drawer(env["MLFLOW_TRACKING_URI"])))
    assert "no map recorded" not in client.get("/").text
    answer = client.get(f"/map/{wanted[0].id}")
    assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    assert _log(deployed).get([wanted[0].id])[0].map_png == answer.content  # kept for next time
    without = TestClient(create_app(_log(deployed), reviewer="anna"))  # no drawer: the note, a 404
    assert without.get(f"/map/{wanted[1].id}").status_code == 404


def test_a_dead_log_costs_no_prediction_and_its_rows_wait(deployed, tmp_path, caplog):
    from sqlalchemy.exc import OperationalError

    _parts(tmp_path / "batch", 4, seed=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        table = _predict(deployed, tmp_path / "batch", f"prediction_log.url=sqlite:///{blocker}/log.db")
    assert len(pd.read_csv(tmp_path / "batch.csv")) == len(table) == 4  # the predictions are all there
    assert "cannot be written" in caplog.text and "could not be logged" in caplog.text
    # a full disk for a while: the rows wait, are written when it clears, and a close spools them
    plog = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", batch_size=1000)
    rows = [
        plog.row(
            source="t",
            model=type("M", (), {"uri": None, "name": None, "version": None, "run_id": "r"})(),
            p_defect=0.2,
            threshold=0.5,
            decision="good",
        )
        for _ in range(3)
    ]
    real = plog._create

    def full_disk():
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    plog._create = full_disk
    plog.record(rows)
    assert plog.flush() == 0 and len(plog._pending) == 3
    plog.close()
    assert (tmp_path / "log.db.pending.jsonl").is_file()
    plog._create = real
    assert len(PredictionLog(f"sqlite:///{tmp_path / 'log.db'}").window()) == 3  # replayed on open
    assert not (tmp_path / "log.db.pending.jsonl").exists()


def test_the_served_model_logs_its_rows_and_keeps_the_images_the_queue_needs(deployed, tmp_path, monkeypatch):
    import mlflow

    from defect_detection.tracking.mlflow_run import fluent_tracking_uri

    root, uri, run_id, env = deployed
    db = tmp_path / "served.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    with fluent_tracking_uri(env["MLFLOW_TRACKING_URI"]):
        model = mlflow.pyfunc.load_model(
            uri,
            model_config={
                "prediction_log": {
                    "enabled": True,
                    "url": f"sqlite:///{db}",
                    "audit_fraction": 1.0,
                    "maps": True,
                }
            },
        )
    parts = _parts(tmp_path / "sent", 5, seed=3, defect_share=0.5)
    out = model.predict(
        pd.DataFrame({"image_b64": [base64.b64encode(p.read_bytes()).decode() for p in parts]})
    )
    rows = PredictionLog(f"sqlite:///{db}").window()
    assert len(rows) == 5 and {r.source for r in rows} == {"serve"} and {r.run_id for r in rows} == {run_id}
    assert sorted(r.decision for r in rows) == sorted(out["decision"])
    assert all(r.image_path and Path(r.image_path).is_file() for r in rows)  # flagged or audited: kept


def test_the_checks_measure_what_they_say():
    rng = np.random.default_rng(0)
    same = rng.normal(0, 1, 400)
    assert psi(same[:200], same[200:]) < 0.25 < 1.0 < psi(same[:200], same[200:] + 1.5)  # 0.25: the default
    assert not reject_rate_check(6, 100, 0.05, 0.02, 0.001).alarm  # 6 % where up to 6.9 % is validated
    assert reject_rate_check(25, 100, 0.05, 0.02, 0.001).alarm
    reference = {
        "stats": {
            "brightness": {"mean": 120.0, "std": 5.0, "p01": 108, "p50": 120, "p99": 132},
            "sharpness": {"mean": 900.0, "std": 200.0, "p01": 500, "p50": 900, "p99": 1500},
            "alignment": {"mean": 0.98, "std": 0.01, "p01": 0.95, "p50": 0.98, "p99": 1.0},
        },
        "thumb": list(np.linspace(0, 255, 64)),
    }
    dim = [
        {"brightness": 84.0 + i % 3, "sharpness": 880.0, "thumb": list(np.linspace(0, 255, 64))}
        for i in range(50)
    ]
    checks = {c.name: c for c in image_checks(dim, reference, 1.0)}
    assert checks["brightness"].alarm and checks["brightness"].cause == "lighting changed"
    assert not checks["sharpness"].alarm and not checks["alignment"].alarm


def test_monitor_is_quiet_on_unchanged_parts_and_names_a_dimmed_lamp_with_exit_3(deployed, tmp_path):
    root, uri, run_id, env = deployed
    _parts(tmp_path / "normal", 40, seed=4, defect_share=0.05)
    _predict(deployed, tmp_path / "normal")
    args = [
        sys.executable,
        "-m",
        "defect_detection.monitor",
        f"model={uri}",
        "window.last=40",
        "min_parts=40",
        "defect_share=0.05",
        f"paths.root_dir={root}",
    ]
    run_env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **env}
    quiet = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    _parts(tmp_path / "dim", 40, seed=5, defect_share=0.05, lighting=0.6)
    _predict(deployed, tmp_path / "dim")
    alarm = subprocess.run(args, env=run_env, capture_output=True, text=True, timeout=600)
    assert alarm.returncode == 3, alarm.stderr[-3000:]
    assert "ALARM lighting changed" in alarm.stdout + alarm.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [latest, *_] = client.search_runs(
        [client.get_experiment_by_name("defect-monitoring").experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    assert latest.data.tags["alarm"] == "true" and "lighting changed" in latest.data.tags["alarms"]
    assert latest.data.metrics["monitor/brightness"] < -1.0
    assert [a.path for a in client.list_artifacts(latest.info.run_id) if a.path == "monitor.html"]
    assert len(client.get_metric_history(latest.info.run_id, "window/brightness")) > 1  # over time


def test_review_queue_verdicts_escapes_and_export(deployed, tmp_path):
    from fastapi.testclient import TestClient

    from defect_detection.monitoring.review_app import create_app

    root = deployed[0]
    plog = PredictionLog(f"sqlite:///{tmp_path / 'review.db'}", audit_fraction=0.5, seed=0)
    model = type("M", (), {"uri": "runs:/r/model", "name": None, "version": None, "run_id": "r"})()
    parts = _parts(tmp_path / "parts", 30, seed=6)
    rows = [
        plog.row(
            source="predict",
            model=model,
            p_defect=p,
            threshold=0.5,
            decision="defect" if p >= 0.5 else "good",
            image_path=str(path),
        )
        for path, p in zip(parts, np.linspace(0.01, 0.99, 30))
    ]
    plog.record(rows)
    plog.close()
    queue = review_queue(plog)
    kinds = [q.queue for q in queue]
    assert kinds == sorted(kinds, key=["flagged", "audit", "borderline"].index)  # flagged, then the audit
    assert {q.prediction.decision for q in queue if q.queue == "flagged"} == {"defect"}
    client = TestClient(create_app(plog, reviewer="anna", defect_types=["dent"]))
    page = client.get("/")
    assert page.status_code == 200 and page.text.count('class="card') == len(queue)
    assert client.get(f"/image/{queue[0].prediction.id}").headers["content-type"] == "image/png"
    for q in queue:
        truth = Path(q.prediction.image_path).stem.split("_")[1]
        answer = {
            "prediction_id": q.prediction.id,
            "queue": q.queue,
            "verdict": "good" if truth == "good" else "defect",
            "defect_type": None if truth == "good" else truth,
        }
        assert client.post("/verdict", json=answer).status_code == 200
    assert client.post("/verdict", json={"prediction_id": 10**6, "verdict": "good"}).status_code == 404
    assert (
        client.post("/verdict", json={"prediction_id": queue[0].prediction.id, "verdict": "meh"}).status_code
        == 422
    )
    assert review_queue(plog) == []  # everything judged
    estimate = escape_estimate(plog)
    audited = [q for q in queue if q.prediction.audit]  # drawn at scoring, whichever queue showed it
    assert estimate.audited == len(audited) and 0 <= estimate.rate <= estimate.upper <= 1
    manifest = export_reviewed(plog, tmp_path / "export", holdout=0.3, seed=0)
    files = {e["file"] for e in manifest["parts"]}
    assert all((tmp_path / "export" / f).is_file() for f in files)
    assert {f.split("/")[0] for f in files} == {"train", "holdout"}
    assert all(f.split("/")[1] in ("good", "defect") for f in files) and manifest["digest"]
    with pytest.raises(UserError, match="exists and is not empty"):
        export_reviewed(plog, tmp_path / "export")
    assert root  # the fixture's store is untouched by this test's own log


def test_reviewed_parts_join_train_only_and_are_the_runs_lineage(deployed, tmp_path):
    from defect_detection import fit

    root, _, _, env = deployed
    extra = tmp_path / "reviewed" / "train"
    _parts(extra / "good", 6, seed=7, defect_share=0.0)
    _parts(extra / "defect" / "dent", 4, seed=8, defect_share=1.0, kinds=("dent",))
    (tmp_path / "reviewed" / "manifest.json").write_text(json.dumps({"digest": "abc123"}))
    line = root / "line"
    os.environ.update(env)
    try:
        common = [
            "data=mvtec",
            f"data.root={line}",
            "data.categories=[disc]",
            f"data.image_size={SIZE}",
            "trainer.max_epochs=1",
            "explain=none",
            "callbacks.progress_bar=null",
            f"paths.root_dir={root}",
        ]
        result = fit(*common, f"data.extra_roots=[{extra}]")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    split = pd.read_csv(client.download_artifacts(result.run_id, "data/splits.csv", str(tmp_path)))
    added = split[split.path.str.startswith(str(extra))]
    assert len(added) == 10 and set(added.split) == {"train"}  # val and test stay the original ones
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags} for i in inputs}
    assert contexts["base"]["mlflow.data.context"] == "training"
    assert contexts["train"]["mlflow.data.context"] == "reviewed"
    assert contexts["train"]["review_batch_digest"] == "abc123"


def test_a_challenger_is_compared_on_the_same_parts_and_promoted_only_through_the_guard(deployed, tmp_path):
    from defect_detection import fit
    from defect_detection.api import challenge
    from defect_detection.tracking.registry import PromotionRefused

    root, champion_uri, champion_run, env = deployed
    holdout = tmp_path / "holdout"
    _parts(holdout / "good", 6, seed=9, defect_share=0.0)
    _parts(holdout / "defect" / "dent", 4, seed=10, defect_share=1.0, kinds=("dent",))
    os.environ.update(env)
    try:
        weak = fit(
            "data=mvtec",
            f"data.root={root / 'line'}",
            "data.categories=[disc]",
            f"data.image_size={SIZE}",
            "trainer.max_epochs=4",
            "callbacks.early_stopping=null",
            "explain=none",
            "callbacks.progress_bar=null",
            f"paths.root_dir={root}",
            "seed=3",
        )  # another champion-like run: a challenger
        result = challenge(
            f"challenger={weak.model_uri}",
            f"champion={champion_uri}",
            f"holdout={holdout}",
            f"paths.root_dir={root}",
        )
        table = result.table.set_index(["set", "metric"])
        assert {"test", "holdout", "all"} <= {s for s, _ in table.index}
        assert table.loc[("all", "n"), "champion"] == table.loc[("all", "n"), "challenger"]  # the same parts
        assert set(result.per_type.defect_type) >= {"dent"}
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        for run in (champion_run, weak.run_id):
            assert "challenge/all/recall" in client.get_run(run).data.metrics
        page = Path(result.page).read_text()
        assert "champion" in page and "challenger" in page and weak.run_id in page
        from defect_detection.api import promote

        # the guard ranks on the challenge's numbers: the better of the two becomes champion first, then
        # the other is refused (whichever way the tiny models came out)
        runs = {"champion": champion_run, "challenger": weak.run_id}
        better = max(runs, key=lambda who: table.loc[("all", "auroc"), who])
        worse = "challenger" if better == "champion" else "champion"
        guard = ("metric=challenge/all/auroc", "registered_model_name=chal", f"paths.root_dir={root}")
        assert promote(*guard, f"run_id={runs[better]}").action == "promoted"
        if table.loc[("all", "auroc"), worse] < table.loc[("all", "auroc"), better]:
            with pytest.raises(PromotionRefused, match="worse than the current champion|at or below chance"):
                promote(*guard, f"run_id={runs[worse]}")
        assert client.get_model_version_by_alias("chal", "champion").run_id == runs[better]
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
