"""Champion promotion: candidate selection, registration, aliases, refusal, and the registered pyfunc.

Runs are written straight to a temporary sqlite store with a real pyfunc model (an untrained
EfficientNet-Lite0 bundle at 32 px): what promotion sees is the same as after training, minus the wait.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.tracking.mlflow_run import fluent_tracking_uri
from defect_detection.tracking.registry import (
    PromotionRefused,
    TieBreak,
    best_candidate,
    find_candidates,
    promote,
    version_by_alias,
)

NAME = "defect-classifier"
TIE = [TieBreak("val/loss", "min")]


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root}/mlruns/mlflow.db"


def make_bundle(path: Path, threshold: float = 0.4, image_size: int = 32) -> Path:
    import torch

    from defect_detection.models.backbones import build_network
    from defect_detection.models.inference import save_bundle

    torch.manual_seed(0)
    net = build_network("efficientnet_lite0", pretrained=False)
    return save_bundle(path, net, backbone="efficientnet_lite0", image_size=image_size,
                       mean=[0.498] * 3, std=[0.502] * 3, threshold=threshold, threshold_policy="f1_max")


def make_run(root: Path, metrics: dict[str, float], *, status: str = "FINISHED", bundle: Path | None = None,
             experiment: str = "defect-detection", tags: dict[str, str] | None = None) -> str:
    """A run like training leaves: metrics, a threshold_policy tag and (when bundle) a pyfunc model."""
    from defect_detection.tracking.pyfunc import log_pyfunc

    client = MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=(root / "mlruns" / "artifacts").as_uri())
    run = client.create_run(exp_id, tags={"threshold_policy": "f1_max", **(tags or {})})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    if bundle is not None:
        with fluent_tracking_uri(tracking_uri(root)), mlflow.start_run(run_id=run.info.run_id):
            log_pyfunc(bundle)
    client.set_terminated(run.info.run_id, status)
    time.sleep(0.01)  # distinct start times for the age tie-break
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Five runs: A 0.80, B 0.90 (loss .3), C 0.90 (loss .2), D 0.99 without a model, E 1.0 but FAILED."""
    root = tmp_path_factory.mktemp("project")
    bundle = make_bundle(root / "bundle.pt", threshold=0.4)
    ids = {
        "A": make_run(root, {"val/auroc": 0.80, "val/loss": 0.5, "test/threshold": 0.4}, bundle=bundle),
        "B": make_run(root, {"val/auroc": 0.90, "val/loss": 0.3, "test/threshold": 0.4}, bundle=bundle),
        "C": make_run(root, {"val/auroc": 0.90, "val/loss": 0.2, "test/threshold": 0.4}, bundle=bundle),
        "D": make_run(root, {"val/auroc": 0.99, "val/loss": 0.1}),
        "E": make_run(root, {"val/auroc": 1.0, "val/loss": 0.0}, status="FAILED", bundle=bundle),
    }
    client = MlflowClient(tracking_uri(root))
    return root, client, ids


def candidates(client: MlflowClient, **kw):
    exp = client.get_experiment_by_name("defect-detection").experiment_id
    return find_candidates(client, [exp], "val/auroc", **kw)


def test_candidates_are_finished_runs_that_logged_a_model(store):
    root, client, ids = store
    assert {c.run_id for c in candidates(client)} == {ids["A"], ids["B"], ids["C"]}
    assert all(c.model_uri.startswith("models:/m-") for c in candidates(client))


def test_best_candidate_uses_direction_then_tie_breaks_then_age(store):
    root, client, ids = store
    found = candidates(client)
    assert best_candidate(found, "val/auroc", "max", TIE).run_id == ids["C"]
    assert best_candidate(found, "val/auroc", "max", [TieBreak("val/loss", "max")]).run_id == ids["B"]
    assert best_candidate(found, "val/auroc", "min", TIE).run_id == ids["A"]
    # B and C tie on val/auroc: without a tie-break metric the age decides
    assert best_candidate(found, "val/auroc", "max", [], prefer="newer").run_id == ids["C"]
    assert best_candidate(found, "val/auroc", "max", [], prefer="older").run_id == ids["B"]
    with pytest.raises(UserError, match="No candidate"):
        best_candidate([], "val/auroc")


def test_promotion_moves_champion_keeps_previous_and_refuses_a_worse_candidate(store):
    root, client, ids = store
    by_id = {c.run_id: c for c in candidates(client)}
    kw = dict(name=NAME, metric="val/auroc", direction="max", tie_break=TIE)

    first = promote(client, by_id[ids["C"]], **kw)
    assert first.action == "promoted" and first.previous_version is None
    champion = version_by_alias(client, NAME, "champion")
    assert champion.version == first.version and champion.run_id == ids["C"]
    assert champion.tags["metric"] == "val/auroc" and float(champion.tags["metric_value"]) == 0.90
    assert champion.tags["run_id"] == ids["C"] and float(champion.tags["threshold"]) == 0.4
    assert champion.tags["threshold_policy"] == "f1_max"

    assert promote(client, by_id[ids["C"]], **kw).action == "already_champion"
    with pytest.raises(PromotionRefused, match="worse than the current champion"):
        promote(client, by_id[ids["A"]], **kw)
    with pytest.raises(PromotionRefused):  # equal auroc, worse tie-break
        promote(client, by_id[ids["B"]], **kw)
    assert version_by_alias(client, NAME, "champion").version == first.version  # untouched

    dry = promote(client, by_id[ids["A"]], **kw, force=True, dry_run=True)
    assert dry.action == "dry_run" and version_by_alias(client, NAME, "champion").version == first.version

    forced = promote(client, by_id[ids["A"]], **kw, force=True)
    assert forced.previous_version == first.version
    assert version_by_alias(client, NAME, "champion").run_id == ids["A"]
    assert version_by_alias(client, NAME, "previous").version == first.version
    assert version_by_alias(client, NAME, "champion").tags["forced"] == "true"

    back = promote(client, by_id[ids["C"]], **kw)  # better again: C's existing version is reused
    assert back.version == first.version
    assert version_by_alias(client, NAME, "previous").version == forced.version
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2


def test_promote_command_on_a_sweep_with_config_names(store):
    from defect_detection.pipeline.promote import run_promotion

    root, client, ids = store
    sweep_runs = [make_run(root, {"val/auroc": v, "val/loss": 0.1, "test/threshold": 0.3},
                           bundle=root / "bundle.pt", tags={"sweep_id": "S9"}) for v in (0.7, 0.75)]
    client.create_run(client.get_experiment_by_name("defect-detection").experiment_id,
                      tags={"run_role": "sweep", "sweep_id": "S9"})
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("promote", overrides=[f"paths.root_dir={root}", "sweep=latest",
                                            "registered_model_name=line-2"])
    result = run_promotion(cfg)
    assert result.action == "promoted" and result.run_id == sweep_runs[1]
    assert client.get_model_version_by_alias("line-2", "champion").run_id == sweep_runs[1]

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("promote", overrides=[f"paths.root_dir={root}", f"run_id={ids['D']}"])
    with pytest.raises(UserError, match="not a candidate"):  # D logged no model
        run_promotion(cfg)


def test_registered_champion_predicts_paths_and_arrays_of_any_size(store, synthetic_root):
    root, client, ids = store
    if version_by_alias(client, NAME, "champion") is None:
        promote(client, candidates(client)[0], name=NAME, metric="val/auroc", force=True)
    with fluent_tracking_uri(tracking_uri(root)):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    paths = sorted(str(p) for p in synthetic_root.glob("disc/test/*/*.png"))[:4]
    out = model.predict(pd.DataFrame({"path": paths}))
    assert list(out["path"]) == paths
    assert out["p_defect"].between(0, 1).all() and set(out["decision"]) <= {"good", "defect"}
    assert (out["decision"].eq("defect") == (out["p_defect"] >= 0.4)).all()
    assert np.allclose(out["threshold"], 0.4)
    rng = np.random.default_rng(0)
    assert len(model.predict(rng.integers(0, 255, (301, 123, 3), dtype=np.uint8))) == 1
    arrays = [rng.integers(0, 255, (s, s + 7, 3), dtype=np.uint8) for s in (20, 64, 500)]
    assert len(model.predict(arrays)) == 3
    assert len(model.predict(paths[:2])) == 2
