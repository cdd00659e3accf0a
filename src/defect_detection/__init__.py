"""Industrial good/defect image classification: configs in, a tracked, calibrated model out."""

from pathlib import Path

__version__ = "0.1.0"

GOOD, DEFECT = 0, 1
CLASS_NAMES = ("good", "defect")


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, missing weights); shown without traceback."""


def project_root() -> Path:
    """The checkout that holds conf/: where outputs and the MLflow store live by default."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "conf" / "train.yaml").is_file():
            return parent
    return Path.cwd()


def _quiet() -> None:
    from defect_detection.quiet import quiet_third_party

    quiet_third_party()  # three known third-party messages, filtered by message and module


_quiet()
