# %% [markdown]
# # Quickstart: a pass/fail inspector from Python
#
# The same configs and pipeline as the `defect-*` commands, from a notebook or a script (this file
# opens as a notebook with jupytext; `python examples/quickstart.py` runs it as it is).
# It makes a tiny synthetic line, trains, inspects new parts with maps, explains, exports and
# evaluates. On your own line, point `data.root` at a folder with `good/` and `defect/<type>/`.

# %%
import os
import tempfile
from pathlib import Path

from defect_detection import Inspector, evaluate, fit
from defect_detection.data.synthetic import generate_synthetic

work = Path(os.environ.get("QUICKSTART_DIR") or tempfile.mkdtemp(prefix="quickstart-"))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns' / 'mlflow.db'}")
line = generate_synthetic(work / "line", categories=("disc",), n_train_good=12, n_test_good=6, n_per_defect=4,
                          image_size=64)

# %% [markdown]
# ## Train: overrides as on the command line, results as an object

# %%
result = fit("data=mvtec", f"data.root={line}", "data.categories=[disc]", "data.image_size=64",
             "trainer.max_epochs=2", "explain=none", "callbacks.progress_bar=null", f"paths.root_dir={work}")
print(result.run_id, f"test AUROC {result.metrics['test/auroc']:.3f}", f"threshold {result.threshold:.3f}",
      result.model_uri)

# %% [markdown]
# ## Inspect parts: the decision at the threshold chosen on validation, and where the evidence is

# %%
inspector = Inspector.load(result.model_uri)
parts = sorted((line / "disc" / "test").rglob("*.png"))[:4]
table = inspector.predict(parts, maps=True)
print(table[["path", "p_defect", "decision"]])
print("map of the first part:", table["map"].iloc[0].shape)

# %% [markdown]
# ## Explain, export, evaluate

# %%
overlays = inspector.explain(parts, work / "overlays")
exported = inspector.export(work / "model.onnx")
print(len(overlays), "overlays;", "ONNX parity max |delta p|", exported["parity"]["max_abs_diff_p_defect"])
report = evaluate(result.model_uri, "data=mvtec", f"data.root={line}", "data.categories=[disc]",
                  f"paths.root_dir={work}", f"report_dir={work / 'eval'}")
print("evaluation run", report["run_id"], "test AUROC", round(report["metrics"]["auroc"], 3))
