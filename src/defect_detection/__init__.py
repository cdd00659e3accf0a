"""Industrial visual defect detection: photos of parts in; a trained, calibrated, explained and
registered pass/fail inspector out.

The Python API (the `defect-*` commands are thin shells over it):

    from defect_detection import fit, evaluate, Inspector
    result = fit("data=folder", "data.root=/lines/l3", experiment="auto")
    inspector = Inspector.load(result.model_uri)      # or "models:/defect-classifier@champion"
    table = inspector.predict(["part.png"])           # decision, p_defect, threshold per image
"""

from defect_detection.base import CLASS_NAMES, DEFECT, GOOD, UserError, __version__, project_root

__all__ = ["CLASS_NAMES", "DEFECT", "GOOD", "UserError", "project_root", "__version__",
           "fit", "evaluate", "Inspector", "FitResult"]

_API = ("fit", "evaluate", "Inspector", "FitResult")


def __getattr__(name: str):
    """The API is imported on first use: `import defect_detection` stays light (no torch, no MLflow)."""
    if name in _API:
        from defect_detection import api

        return getattr(api, name)
    raise AttributeError(f"module 'defect_detection' has no attribute {name!r}")


def _quiet() -> None:
    from defect_detection.quiet import quiet_third_party

    quiet_third_party()  # known third-party messages, filtered by message and module


_quiet()
