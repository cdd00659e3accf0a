"""The tutorials' commands run, so the docs cannot drift from the code.

Every command block of docs/tutorials/*.md lives in examples/tutorials/<name>.sh, between
`# --8<-- [start:<section>]` and `# --8<-- [end:<section>]` markers; the pages include those
sections verbatim (pymdownx.snippets), so what is tested is what is shown. Two checks:

- every `defect-*` command of every section, run or not, composes with the real configs (the
  groups, keys and values it names exist): the default suite, a few seconds;
- every section that can run on the practice data runs, in order, in one bash session in a
  temporary folder (`set -eo pipefail`: a failing command fails the test). The new-line tutorial
  runs in the default suite; the others are @pytest.mark.slow (`pytest -m slow tests/test_tutorials.py`).

How a run is kept small and apart from this checkout, visibly and without editing the text: each
`defect-*` command is a wrapper on PATH that runs the real command with ISOLATE (its outputs and
MLflow store under the temporary folder; MLFLOW_TRACKING_URI points there too) and SHRINK (the
overrides below: one epoch, 64 px, no maps) appended: Hydra lets a later override win.
Sections that cannot run here are listed in NOT_RUN with the reason.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "examples" / "tutorials"
MARK = re.compile(r"^# --8<-- \[(start|end):([\w-]+)\]\s*$")

# command -> (module, config name); defect-export takes argparse flags, not Hydra overrides
HYDRA_COMMANDS = {
    "defect-train": ("train", "train"),
    "defect-data": ("data_cmd", "data_summary"),
    "defect-eval": ("evaluate", "eval"),
    "defect-explain": ("explain_cmd", "explain_cmd"),
    "defect-compare": ("compare", "compare"),
    "defect-promote": ("promote", "promote"),
    "defect-predict": ("predict", "predict"),
    "defect-monitor": ("monitor", "monitor"),
    "defect-review": ("review_cmd", "review"),
    "defect-challenge": ("challenge_cmd", "challenge"),
}
# Appended to a command in the test runs only (never shown on a page): small and quick.
SHRINK = {
    "defect-train": [
        "trainer.max_epochs=1",
        "data.image_size=64",
        "explain=none",
        "auto.budget_minutes=3",
        "callbacks.progress_bar=null",
    ],
}
NOT_RUN = {
    ("new_line", "serve"): "a server that runs until stopped (tests/test_predict_serve.py serves a model)",
    ("deploy", "serve"): "a server that runs until stopped (tests/test_predict_serve.py serves a model)",
    ("deploy", "request"): "needs the server of the section before",
    ("after_deployment", "review"): "a web page that waits for an operator (tests/test_review_page.py "
    "drives it in chromium); the practice-review section answers instead",
    ("line_scan", "aitex"): "needs the AITEX fabric images (not in this repository)",
    ("sweep_promote", "optuna"): "20 trainings (tests/test_sweeps.py runs a 3-trial search and its resume)",
    ("team_server", "server"): "needs a PostgreSQL server and a host for the team's MLflow server "
    "(tests/test_scale_out.py starts a throwaway one)",
    ("team_server", "client"): "needs the team server of the section before",
    ("team_server", "predict"): "needs the team server and /data/line3",
    ("team_server", "after"): "needs the team's PostgreSQL prediction log",
}
DEFAULT_SUITE = {"new_line"}
# What a finished run of each tutorial must have printed (besides exiting 0).
EXPECT = {
    "new_line": ["practice/line: good 60", "auto: winner", "Promoted run", "Scored 50 images"],
    "good_only": ["Promoted run", "overlays.csv"],
    "masks": ["masks 36", "masks: 3 runs by val/auroc"],
    "line_scan": ["scan: 2 runs by val/auroc", "candidates: classifier-tiles"],
    "deploy": ["champion.onnx", "champion.xml"],
    "sweep_promote": ["Promoted run"],
    "after_deployment": ["ALARM", "defect-monitor exit code 3", "Exported", "challenger"],
}


def sections(name: str) -> dict[str, str]:
    """The marked sections of examples/tutorials/<name>.sh, in order."""
    out: dict[str, list[str]] = {}
    current = None
    for line in (TUTORIALS / f"{name}.sh").read_text().splitlines():
        m = MARK.match(line)
        if m:
            current = m.group(2) if m.group(1) == "start" else None
            if current:
                out[current] = []
        elif current:
            out[current].append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def tutorial_names() -> list[str]:
    return sorted(p.stem for p in TUTORIALS.glob("*.sh"))


def commands(text: str) -> list[list[str]]:
    """The defect-* command lines of a section, continuation lines joined, split as bash would
    (shell variables and substitutions stand in as placeholders; what follows a pipe is dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line.startswith("defect-"):
            continue
        line = re.sub(r"\$\(.*\)", "0" * 32, line)
        line = line.replace("$PWD", "/tmp/x").replace("$challenger", "0" * 32)
        words = shlex.split(line)
        for stop in ("|", "||", "2>&1"):
            if stop in words:
                words = words[: words.index(stop)]
        out.append(words)
    return out


def test_every_tutorial_section_is_accounted_for():
    names = tutorial_names()
    assert {
        "new_line",
        "good_only",
        "masks",
        "line_scan",
        "deploy",
        "sweep_promote",
        "team_server",
        "after_deployment",
    } <= set(names)
    for name, section in NOT_RUN:
        assert section in sections(name), f"NOT_RUN names {name}:{section}, which is not a section"
    for name in names:
        assert sections(name), f"{name}.sh has no marked section"


def test_every_command_composes_with_the_real_configs(tmp_path):
    """Each defect-* command of every section names groups, keys and values that exist."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from defect_detection.config import CONFIG_DIR

    checked = 0
    for name in tutorial_names():
        for section, text in sections(name).items():
            for words in commands(text):
                command, args = words[0], [w for w in words[1:] if w != "-m"]
                if command == "defect-export":
                    assert args and (args[0].startswith(("models:/", "runs:/")) or Path(args[0]).suffix)
                    continue
                assert command in HYDRA_COMMANDS, f"{name}:{section}: unknown command {command}"
                # a sweep's comma list composes as its first value; the sweeper's own keys need -m
                args = [a if "[" in a or "," not in a else a.split(",")[0] for a in args]
                args = [a for a in args if not a.startswith(("hydra.sweeper.", "hydra.launcher."))]
                GlobalHydra.instance().clear()
                with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                    try:
                        cfg = compose(
                            HYDRA_COMMANDS[command][1],
                            overrides=[
                                f"paths.root_dir={tmp_path}",
                                f"paths.output_dir={tmp_path}/out",
                                *args,
                            ],
                        )
                    except Exception as err:  # noqa: BLE001 - the message names the bad word
                        pytest.fail(f"{name}:{section}: {' '.join(words)}\n{type(err).__name__}: {err}")
                if command == "defect-train":
                    from defect_detection.schema import validate_train_config

                    validate_train_config(cfg)
                checked += 1
    GlobalHydra.instance().clear()
    assert checked >= 30


def _wrappers(work: Path) -> Path:
    """bin/ with python and every defect-* command: the real one, ISOLATE and SHRINK appended."""
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} "$@"\n')
    for command, (module, _) in [*HYDRA_COMMANDS.items(), ("defect-export", ("export", None))]:
        extra = [] if command == "defect-export" else [f"paths.root_dir={work}", *SHRINK.get(command, [])]
        (bin_dir / command).write_text(
            f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -m defect_detection.{module} "$@" '
            + " ".join(shlex.quote(e) for e in extra)
            + "\n"
        )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def run_tutorial(name: str, work: Path) -> str:
    bin_dir = _wrappers(work)
    (work / "examples").symlink_to(ROOT / "examples")
    script = "".join(text for section, text in sections(name).items() if (name, section) not in NOT_RUN)
    (work / f"{name}.sh").write_text(script)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns' / 'mlflow.db'}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    }
    began = time.perf_counter()
    done = subprocess.run(
        ["bash", "-eo", "pipefail", f"{name}.sh"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    said = done.stdout + done.stderr
    (work / "output.log").write_text(said)  # kept with pytest's temporary folders, to read
    assert done.returncode == 0, f"{name}.sh failed (exit {done.returncode}):\n{said[-6000:]}"
    print(f"{name}: {time.perf_counter() - began:.0f} s")
    for expected in EXPECT.get(name, []):
        assert expected in said, f"{name}: {expected!r} not in the output:\n{said[-4000:]}"
    return said


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=() if n in DEFAULT_SUITE else pytest.mark.slow)
        for n in [
            "new_line",
            "good_only",
            "masks",
            "line_scan",
            "deploy",
            "sweep_promote",
            "after_deployment",
        ]
    ],
)
def test_the_tutorial_runs(name, tmp_path):
    run_tutorial(name, tmp_path)
