"""Bad inputs and misuses, tried as a careless or hostile user would, through the real commands.

    python scripts/misuse_probe.py                       # every case, this checkout's code
    python scripts/misuse_probe.py --code /tmp/old-tree  # the same cases against another tree
    python scripts/misuse_probe.py --only 1a 9           # some cases

Each case builds its own tiny data and store under one temporary folder, runs the commands a user
would (`python -m defect_detection.<entry>`, in-process MLflow for serving), and says whether the
outcome was clean: the data safe, the run intact, and either a correct result or one clear line
(no traceback). The table (markdown) goes to stdout and, with --out, to a file; the exit code is
the number of cases that were not clean. Cases follow issue 33's numbering. The code under test
comes first on PYTHONPATH, so an older tree is probed with this tree's probe.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1]
SECRET = "s3cretPW"
STOP = "+callbacks.stop={_target_:tests.test_resume.SignalAt,epoch:%d,name:SIGTERM,once:%s}"


def _png(path: Path, rng: np.random.Generator, size=(48, 48), defect: bool = False) -> None:
    h, w = size
    arr = (120 + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    if defect:
        y = int(rng.integers(h // 4, 3 * h // 4))
        arr[y : y + 3, w // 4 : 3 * w // 4] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_line(root: Path, n_good: int = 20, n_defect: int = 10, seed: int = 0, size=(48, 48)) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        _png(root / "good" / f"g{i:03d}.png", rng, size)
    for i in range(n_defect):
        _png(root / "defect" / "scratch" / f"d{i:03d}.png", rng, size, defect=True)
    return root



def matching(root: Path, pattern: str) -> list[Path]:
    """Paths under `root` whose name matches `pattern`; folders that other processes remove while
    this walks (the temporary folder is shared) are skipped, not an error."""
    out = []
    for folder, dirs, files in os.walk(root, onerror=lambda err: None):
        out += [Path(folder) / n for n in fnmatch.filter(dirs + files, pattern)]
    return out

class Probe:
    def __init__(self, code: Path, work: Path) -> None:
        self.code, self.work = code, work
        self.python = sys.executable
        self.results: list[tuple[str, str, bool, str]] = []

    # -- plumbing --------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PYTHONPATH"] = os.pathsep.join([str(self.code / "src"), str(self.code)])
        env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
        env.update(extra)
        return env

    def cmd(
        self, entry: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900
    ) -> tuple[int, str]:
        proc = subprocess.run(
            [self.python, "-m", f"defect_detection.{entry}", *args],
            cwd=cwd or self.work,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            errors="replace",
        )
        return proc.returncode, proc.stdout + proc.stderr

    def py(self, code: str, env: dict | None = None, timeout: float = 900) -> tuple[int, str]:
        proc = subprocess.run(
            [self.python, "-c", textwrap.dedent(code)],
            cwd=self.work,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            errors="replace",
        )
        return proc.returncode, proc.stdout + proc.stderr

    def folder(self, name: str, **kw) -> Path:
        return make_line(self.work / name, **kw)

    def train_args(self, data: Path, root: Path, *extra: str) -> list[str]:
        return [
            f"paths.root_dir={root}",
            "data=folder",
            f"data.root={data}",
            "data.image_size=32",
            "data.batch_size=8",
            "trainer.max_epochs=1",
            "callbacks.progress_bar=null",
            "callbacks.early_stopping=null",
            "explain=none",
            *extra,
        ]

    def train(self, data: Path, root: Path, *extra: str, env: dict | None = None) -> tuple[int, str]:
        return self.cmd("train", *self.train_args(data, root, *extra), env=env)

    @staticmethod
    def client(root: Path):
        from mlflow import MlflowClient

        return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")

    def runs(self, root: Path, experiment: str = "defect-detection"):
        client = self.client(root)
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []

    def record(self, case: str, what: str, clean: bool, detail: str) -> None:
        detail = " ".join(detail.split())[:300]
        self.results.append((case, what, clean, detail))
        print(f"[{'clean' if clean else 'NOT CLEAN'}] {case}: {what} -- {detail}", flush=True)

    @staticmethod
    def raw(out: str) -> bool:
        """A traceback in the output (Hydra's short form included)."""
        return "Traceback" in out or "HYDRA_FULL_ERROR" in out or "Error executing job" in out

    @classmethod
    def one_line_error(cls, rc: int, out: str) -> bool:
        """Stopped with our one-line `error: ...`, not a traceback."""
        return rc != 0 and not cls.raw(out) and any(ln.startswith("error:") for ln in out.splitlines())

    @staticmethod
    def last_error(out: str) -> str:
        lines = [ln for ln in out.splitlines() if ln.strip()]
        errs = [ln for ln in lines if "error" in ln.lower()]
        return (errs or lines or [""])[-1]

    def trained(self, name: str, *extra: str, data: Path | None = None) -> tuple[Path, Path, object]:
        """A finished run on its own store: (data, root, run)."""
        data = data or self.folder(f"{name}-data")
        root = self.work / name
        rc, out = self.train(data, root, *extra)
        if rc != 0:
            raise RuntimeError(f"setup training failed: {out[-2000:]}")
        return data, root, self.runs(root)[-1]

    # -- the cases ----------------------------------------------------------------------------------

    def c1a(self):
        data = self.folder("c1-data")
        victim = self.work / "c1-victim"
        victim.mkdir()
        (victim / "x.png").write_bytes(b"precious")
        rc, out = self.cmd(
            "data_cmd",
            "data=folder",
            f"data.root={data}",
            f"data.category={victim}/x",
            f"out_dir={self.work / 'c1-out'}",
            f"paths.root_dir={self.work / 'c1'}",
        )
        intact = (victim / "x.png").read_bytes() == b"precious"
        clean = intact and (rc == 0 or self.one_line_error(rc, out))
        self.record(
            "1a",
            "defect-data data.category=<existing file path>",
            clean,
            f"victim intact={intact}, rc={rc}: {self.last_error(out)}",
        )

    def c1b(self):
        data = self.folder("c1b-data")
        out_dir = self.work / "c1b" / "a" / "b" / "out"
        rc, out = self.cmd(
            "data_cmd",
            "data=folder",
            f"data.root={data}",
            "data.category=../../X",
            f"out_dir={out_dir}",
            f"paths.root_dir={self.work / 'c1b'}",
        )
        outside = [p for p in (self.work / "c1b").rglob("X*") if out_dir not in p.parents]
        clean = not outside and (rc == 0 or self.one_line_error(rc, out))
        self.record(
            "1b",
            "defect-data data.category=../../X",
            clean,
            f"files outside out_dir: {[str(p) for p in outside]}, rc={rc}: {self.last_error(out)}",
        )

    def c1c(self):
        data = self.folder("c1c-data")
        root = self.work / "c1c"
        before = set(self.work.rglob("*"))
        rc, out = self.train(data, root, "data.category=../../../../X")
        new = [p for p in set(self.work.rglob("*")) - before if p.name.startswith("X")]
        stray = [p for p in new if root not in p.parents]
        clean = not stray and (rc == 0 or self.one_line_error(rc, out))
        self.record(
            "1c",
            "defect-train data.category=../../../../X",
            clean,
            f"written outside the run folder: {[str(p) for p in stray]}, rc={rc}: {self.last_error(out)}",
        )

    def c1d(self):
        data = self.folder("c1d-data")
        root = self.work / "c1d"
        before = set(matching(self.work.parent, "*EVIL*"))
        rc, out = self.train(data, root, "run_name=../../../EVIL", "experiment_name=../../EVIL2")
        stray = [p for p in set(matching(self.work.parent, "*EVIL*")) - before if root not in p.parents]
        clean = not stray and (rc == 0 or self.one_line_error(rc, out))
        self.record(
            "1d",
            "defect-train run_name=../../../EVIL experiment_name=../../EVIL2",
            clean,
            f"paths outside: {[str(p) for p in stray]}, rc={rc}: {self.last_error(out)}",
        )

    def c2(self):
        data = self.folder("c2-data")
        root = self.work / "c2"
        same = [f"paths.output_dir={root / 'out'}"]
        rc1, _ = self.train(data, root, *same)
        first = self.runs(root)[-1]
        client = self.client(root)
        report = client.download_artifacts(first.info.run_id, "report.html", str(self.work / "c2-rep1"))
        before = Path(report).read_bytes()
        time.sleep(1)
        rc2, _ = self.train(data, root, *same, "trainer.max_epochs=2")  # another run, same output_dir
        rc3, out = self.train(data, root, *same, "ckpt_path=last", f"resume_run_id={first.info.run_id}")
        after = Path(
            client.download_artifacts(first.info.run_id, "report.html", str(self.work / "c2-rep2"))
        ).read_bytes()
        models = client.search_logged_models(
            [first.info.experiment_id], filter_string=f"source_run_id = '{first.info.run_id}'"
        )
        history = client.get_metric_history(first.info.run_id, "test/auroc")
        intact = before == after and len(models) == 1 and len(history) == 1
        clean = intact and not self.raw(out)
        self.record(
            "2",
            "resume a FINISHED run whose output_dir another run reused",
            clean,
            f"report unchanged={before == after}, models={len(models)}, test/auroc values="
            f"{len(history)}, rc={rc3}: {self.last_error(out)}",
        )

    def c3(self):
        data = self.folder("c3-data", n_good=60, n_defect=30)
        root = self.work / "c3"
        args = self.train_args(data, root, "trainer.max_epochs=400", "experiment_name=live")
        live = subprocess.Popen(
            [self.python, "-m", "defect_detection.train", *args],
            cwd=self.work,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.time() + 300
            last = None
            while time.time() < deadline and live.poll() is None:
                runs = self.runs(root, "live")
                folder = runs[-1].data.tags.get("checkpoint_dir") if runs else None
                if folder and (Path(folder) / "last.ckpt").is_file():
                    last = Path(folder) / "last.ckpt"
                    break
                time.sleep(2)
            if last is None:
                self.record("3", "ckpt_path=last while the run trains", False, "setup: no last.ckpt appeared")
                return
            try:
                rc, out = self.cmd(
                    "train",
                    *self.train_args(
                        data, root, "trainer.max_epochs=400", "experiment_name=live", "ckpt_path=last"
                    ),
                    timeout=180,
                )
            except subprocess.TimeoutExpired:  # it attached to the live run and trains beside it
                rc, out = -1, "still training beside the live run after 180 s"
            still = live.poll() is None
        finally:
            live.terminate()
            live.wait(60)
        refused = self.one_line_error(rc, out) and any(w in out.lower() for w in ("running", "live", "still"))
        self.record(
            "3",
            "ckpt_path=last while the same run is still training",
            refused and still,
            f"rc={rc}, first still running={still}: {self.last_error(out)}",
        )

    def c4(self):
        data = self.folder("c4-data")
        root = self.work / "c4"
        root.mkdir()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [
                str(Path(self.python).parent / "mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root}/srv.db",
                "--artifacts-destination",
                str(root / "srv-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=root,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            import urllib.request

            for _ in range(120):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(1)
            uri = f"http://probe:{SECRET}@127.0.0.1:{port}"
            rc, out = self.train(data, root, env=self.env(MLFLOW_TRACKING_URI=uri))
            leaks = ["console"] if SECRET in out else []
            for path in root.rglob("*"):
                if path.is_file() and "srv" not in path.name and SECRET.encode() in path.read_bytes():
                    leaks.append(str(path.relative_to(root)))
            from mlflow import MlflowClient

            client = MlflowClient(f"http://127.0.0.1:{port}")
            exp = client.get_experiment_by_name("defect-detection")
            for run in client.search_runs([exp.experiment_id]) if exp else []:
                if any(SECRET in v for v in [*run.data.params.values(), *run.data.tags.values()]):
                    leaks.append(f"run {run.info.run_id} params/tags")
                for name in ("config.yaml", "report.html"):
                    try:
                        text = Path(
                            client.download_artifacts(run.info.run_id, name, tempfile.mkdtemp(dir=self.work))
                        ).read_text()
                    except Exception:
                        continue
                    if SECRET in text:
                        leaks.append(f"artifact {name}")
        finally:
            server.terminate()
            server.wait(30)
        self.record(
            "4",
            "credentials in MLFLOW_TRACKING_URI",
            rc == 0 and not leaks,
            f"rc={rc}, the password appears in: {leaks[:8] or 'nothing'}",
        )

    def c5(self):
        data, root, run = self.trained("c5")
        big = self.work / "c5-big.png"
        Image.new("RGB", (9000, 9000), (120, 120, 120)).save(big)
        code = f"""
        import base64, json, os, resource, time
        os.environ["_MLFLOW_IS_IN_SERVING_ENVIRONMENT"] = "true"
        import mlflow, pandas as pd
        mlflow.set_tracking_uri("sqlite:///{root}/mlruns/mlflow.db")
        model = mlflow.pyfunc.load_model("runs:/{run.info.run_id}/model")
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
        b64 = base64.b64encode(open("{big}", "rb").read()).decode()
        frame = pd.DataFrame({{"image_b64": [b64] * 6}})
        before, t0 = rss(), time.time()
        out = model.predict(frame)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(json.dumps({{"before": before, "after": rss(), "peak": peak, "s": time.time() - t0,
                           "decisions": out["decision"].tolist(), "errors": out["error"].tolist()}}))
        """
        rc, out = self.py(code)
        try:
            res = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        except (ValueError, IndexError):
            self.record("5", "serving: six 9000 x 9000 PNGs in one request", False, f"rc={rc}: {out[-300:]}")
            return
        grew, held = res["peak"] - res["before"], res["after"] - res["before"]
        clean = grew < 1.0 and held < 0.5
        self.record(
            "5",
            "serving: six 9000 x 9000 PNGs in one request (1.6 MB of base64)",
            clean,
            f"peak +{grew:.2f} GB, held +{held:.2f} GB after, {res['s']:.1f} s, decisions "
            f"{res['decisions']}, first error: {next((e for e in res['errors'] if e), None)}",
        )

    def c6(self):
        data = self.folder("c6-data")
        root = self.work / "c6"
        same = ["trainer.max_epochs=2", STOP % (1, self.work / "c6-fired")]
        rc, out = self.train(data, root, *same)
        run = self.runs(root)[-1]
        hint = run.data.tags.get("resume_with", "")
        rng = np.random.default_rng(5)
        for i in range(4):
            _png(data / "good" / f"new{i}.png", rng)
        rc2, out2 = self.train(data, root, *same, "ckpt_path=last", f"resume_run_id={run.info.run_id}")
        refused = self.one_line_error(rc2, out2) and ("added" in out2 or "changed" in out2)
        self.record(
            "6",
            "resume after images were added to the data folder",
            refused,
            f"first rc={rc} (hint: {bool(hint)}), resume rc={rc2}: {self.last_error(out2)}",
        )

    def c7(self):
        data, root, run = self.trained("c7")
        client = self.client(root)
        split_csv = client.download_artifacts(run.info.run_id, "data/splits.csv", str(self.work / "c7-split"))
        import pandas as pd

        split = pd.read_csv(split_csv)
        seen = set(split.loc[split.split.isin(["train", "val"]), "path"])
        rng = np.random.default_rng(7)
        for i in range(6):
            _png(data / "good" / f"added{i}.png", rng)
        rep = self.work / "c7-report"
        rc, out = self.cmd(
            "evaluate",
            f"model=runs:/{run.info.run_id}/model",
            "data=folder",
            f"data.root={data}",
            f"paths.root_dir={root}",
            f"report_dir={rep}",
        )
        scored = set()
        for csv in rep.rglob("*.csv"):
            frame = pd.read_csv(csv)
            if "path" in frame.columns and "p_defect" in frame.columns:
                scored |= set(frame["path"])
        leaked = scored & seen
        warned = "train" in out.lower() and "warn" in out.lower() and leaked
        clean = rc == 0 and (not leaked or warned) and bool(scored)
        self.record(
            "7",
            "defect-eval after images were added to the folder",
            clean,
            f"rc={rc}, scored {len(scored)} images as test, {len(leaked)} of them the run's train/val images",
        )

    def c8a(self):
        data = self.folder("c8a-data")
        root = self.work / "c8a"
        cache = ["data.cache=disk", f"data.cache_dir={self.work / 'c8a-cache'}"]
        rc1, _ = self.train(data, root, *cache)
        damaged = 0
        for npy in (self.work / "c8a-cache").glob("*.npy"):
            raw = bytearray(npy.read_bytes())
            half = len(raw) // 2
            raw[half:] = bytes(len(raw) - half)
            npy.write_bytes(bytes(raw))
            damaged += 1
        rc2, out = self.train(data, root, *cache)
        noticed = any(w in out.lower() for w in ("checksum", "damaged", "corrupt", "re-decod"))
        self.record(
            "8a",
            "disk cache damaged in place (same size)",
            rc2 == 0 and noticed and damaged > 0,
            f"{damaged} cache files zeroed, rerun rc={rc2}, warned={noticed}",
        )

    def c8b(self):
        data, root, run = self.trained("c8b")
        ckpt = sorted(Path(run.data.tags["checkpoint_dir"]).glob("best*.ckpt"))[0]
        flipped = self.work / "c8b-flipped.ckpt"
        raw = bytearray(ckpt.read_bytes())
        raw[int(len(raw) * 0.6)] ^= 0x40
        flipped.write_bytes(bytes(raw))
        rc, out = self.cmd(
            "predict",
            f"model={flipped}",
            f"images={data / 'good'}",
            f"output={self.work / 'c8b.csv'}",
            f"paths.root_dir={root}",
        )
        clean = self.one_line_error(rc, out)
        self.record(
            "8b",
            "a bit-flipped checkpoint given to defect-predict",
            clean,
            f"rc={rc}: {self.last_error(out)}",
        )

    def _model_dir(self, root: Path, run) -> Path:
        client = self.client(root)
        [model] = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        loc = model.artifact_location
        return Path(loc[len("file://") :] if loc.startswith("file://") else loc)

    def c9(self):
        data, root, run = self.trained("c9")
        model_dir = self._model_dir(root, run)
        marker = self.work / "c9-PWNED"
        payload = pickle.dumps(_Payload(str(marker)))
        replaced = []
        for name in ("python_model.pkl", "python_model.py", "artifacts/bundle.pt"):
            target = model_dir / name
            if target.exists() or name == "python_model.pkl":
                target.write_bytes(payload) if name != "python_model.py" else target.write_text(
                    f"open({str(marker)!r}, 'w').write('x')\n"
                )
                replaced.append(name)
            rc, out = self.cmd(
                "predict",
                f"model=runs:/{run.info.run_id}/model",
                f"images={data / 'good'}",
                f"output={self.work / 'c9.csv'}",
                f"paths.root_dir={root}",
            )
            ran = marker.exists()
            self.record(
                f"9-{name.split('/')[-1]}",
                f"defect-predict runs:/ with a malicious {name}",
                not ran and not self.raw(out),
                f"payload ran={ran}, rc={rc}: {self.last_error(out)}",
            )
            marker.unlink(missing_ok=True)

    def c10(self):
        data, root, run = self.trained("c10")
        ckpt = sorted(Path(run.data.tags["checkpoint_dir"]).glob("best*.ckpt"))[0]
        csv = self.work / "c10.csv"
        rc, out = self.cmd(
            "predict", f"model={ckpt}", f"images={data / 'good'}", f"output={csv}", f"paths.root_dir={root}"
        )
        import pandas as pd

        used = float(pd.read_csv(csv)["threshold"].iloc[0]) if csv.exists() else float("nan")
        chosen = run.data.metrics.get("test/threshold")
        same = abs(used - chosen) < 1e-6
        warned = "threshold" in out.lower() and "warn" in out.lower()
        self.record(
            "10",
            "defect-predict model=<the run's best checkpoint>",
            rc == 0 and (same or warned),
            f"decided at {used:.4f}, the run chose {chosen:.4f} on val, warned={warned}",
        )

    def c11a(self):
        data = self.folder("c11-data", n_good=3, n_defect=6)
        root = self.work / "c11"
        rc, out = self.train(data, root, "detector=patchcore")
        runs = self.runs(root)
        auroc = runs[-1].data.metrics.get("val/auroc") if runs else None
        clean = self.one_line_error(rc, out) and "good" in self.last_error(out).lower()
        self.record(
            "11a",
            "detector=patchcore with one good training image",
            clean,
            f"rc={rc}, val/auroc={auroc}: {self.last_error(out)}",
        )

    def c11b(self):
        root = self.work / "c11b"
        code = f"""
        from pathlib import Path
        from tests.test_promote import make_bundle, make_run
        root = Path("{root}")
        (root / "mlruns").mkdir(parents=True, exist_ok=True)
        print(make_run(root, {{"val/auroc": 0.5, "test/auroc": 0.5}}, bundle=make_bundle(root / "b.pt")))
        """
        rc0, out0 = self.py(code)
        rc, out = self.cmd("promote", f"paths.root_dir={root}", "registered_model_name=chance")
        self.record(
            "11b",
            "defect-promote with only a val-AUROC-0.5 run",
            self.one_line_error(rc, out),
            f"setup rc={rc0}, rc={rc}: {self.last_error(out)}",
        )

    def c12(self):
        data = self.folder("c12-data")
        cwd = self.work / "c12-cwd"
        cwd.mkdir()
        store = self.work / "c12-store"
        rc, out = self.cmd(
            "train",
            *self.train_args(data, self.work / "c12", "experiment=auto", "auto.max_candidates=1"),
            cwd=cwd,
            env=self.env(MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db"),
        )
        stray = (cwd / "mlruns").exists()
        self.record(
            "12",
            "experiment=auto on a new store",
            rc == 0 and not stray,
            f"rc={rc}, artifacts in the current folder's mlruns/: {stray}",
        )

    def c13(self):
        data = self.folder("c13-data")
        root = self.work / "c13"
        same = [
            "experiment=auto",
            "auto.max_candidates=2",
            "trainer.max_epochs=2",
            STOP % (1, self.work / "c13-fired"),
        ]
        rc, out = self.train(data, root, *same)
        runs = self.runs(root)
        parents = [r for r in runs if r.data.tags.get("auto") == "parent"]
        parent = parents[-1] if parents else None
        children = [r for r in runs if r.data.tags.get("auto") != "parent"]
        linked = bool(children) and all(r.data.tags.get("mlflow.parentRunId") for r in children)
        client = self.client(root)
        files = [a.path for a in client.list_artifacts(parent.info.run_id, "auto")] if parent else []
        first = (
            parent is not None
            and parent.info.status == "KILLED"
            and "auto/candidates.md" in files
            and linked
            and rc == 143
        )
        self.record(
            "13a",
            "experiment=auto stopped by SIGTERM",
            first,
            f"rc={rc}, parent {parent.info.status if parent else None}, candidates.md="
            f"{'auto/candidates.md' in files}, candidates linked to the parent={linked}",
        )
        hint = next(
            (ln.split("Resume with: ", 1)[1] for ln in out.splitlines()[::-1] if "Resume with: " in ln), None
        )
        if not hint:
            self.record("13b", "pasting the auto resume hint", False, "no resume hint printed")
            return
        import shlex

        args = shlex.split(hint)[1:]
        rc2, out2 = self.cmd("train", *args)
        runs = self.runs(root)
        finished = [
            r
            for r in runs
            if r.data.tags.get("auto") in ("candidate", "winner") and r.info.status == "FINISHED"
        ]
        failed = [r for r in runs if r.info.status == "FAILED"]
        self.record(
            "13b",
            "pasting the auto resume hint",
            rc2 == 0 and len(finished) == 2 and not failed,
            f"rc={rc2}, finished candidates={len(finished)}, failed runs={len(failed)}: "
            f"{self.last_error(out2) if rc2 else ''}",
        )

    def c14(self):
        data = self.folder("c14-data")
        ok = []
        for value in ("0", "-5"):
            rc, out = self.train(data, self.work / "c14", "experiment=auto", f"auto.budget_minutes={value}")
            ok.append(self.one_line_error(rc, out) and "budget" in out)
        self.record("14", "auto.budget_minutes=0 / -5", all(ok), f"refused: {ok}")

    def _tiles_run(self):
        data = self.folder("c15-data", size=(48, 96))
        return self.trained(
            "c15",
            "input=tiles",
            "input.tile_size=[48,48]",
            "input.overlap=0",
            "data.image_size=48",
            data=data,
        )

    def c15(self):
        data, root, run = self._tiles_run()
        batch = self.work / "c15-batch"
        batch.mkdir()
        for i, p in enumerate(sorted((data / "good").glob("*.png"))[:3]):
            shutil.copy(p, batch / f"ok{i}.png")
        _png(batch / "small.png", np.random.default_rng(1), (20, 20))
        csv = self.work / "c15.csv"
        rc, out = self.cmd(
            "predict",
            f"model=runs:/{run.info.run_id}/model",
            f"images={batch}",
            f"output={csv}",
            f"paths.root_dir={root}",
        )
        import pandas as pd

        rows = pd.read_csv(csv) if csv.exists() else None
        scored = int((rows["decision"] != "error").sum()) if rows is not None else 0
        self.record(
            "15a",
            "tiles model: predict a batch with an image smaller than a tile",
            rc == 0 and scored >= 3,
            f"rc={rc}, rows scored {scored} of 4: {self.last_error(out)}",
        )
        rc, out = self.cmd(
            "explain_cmd",
            f"model=runs:/{run.info.run_id}/model",
            f"inputs={batch}",
            f"output_dir={self.work / 'c15-overlays'}",
            f"paths.root_dir={root}",
        )
        overlays = len(list((self.work / "c15-overlays").rglob("*_gradcam.png")))
        self.record(
            "15b",
            "tiles model: explain the same batch",
            not self.raw(out) and overlays >= 3,
            f"rc={rc}, overlays {overlays}: {self.last_error(out)}",
        )
        small_b64 = base64.b64encode((batch / "small.png").read_bytes()).decode()
        ok_b64 = base64.b64encode((batch / "ok0.png").read_bytes()).decode()
        rc, out = self._serve(root, run, f'pd.DataFrame({{"image_b64": ["{small_b64}", "{ok_b64}"]}})')
        self.record(
            "15c",
            "tiles model served: a small image beside a good one",
            rc == 0 and ('"ok_rows": 1' in out or '"ok_rows": 2' in out),
            out.strip()[-250:],
        )

    def _serve(self, root: Path, run, frame: str, extra_env: dict | None = None) -> tuple[int, str]:
        code = f"""
        import json, os
        os.environ["_MLFLOW_IS_IN_SERVING_ENVIRONMENT"] = "true"
        import mlflow, pandas as pd
        mlflow.set_tracking_uri("sqlite:///{root}/mlruns/mlflow.db")
        model = mlflow.pyfunc.load_model("runs:/{run.info.run_id}/model")
        out = model.predict({frame})
        print(json.dumps({{"ok_rows": int((out["decision"] != "error").sum()),
                          "errors": [e for e in out["error"].tolist() if e]}}))
        """
        return self.py(code, env=self.env(**(extra_env or {})))

    def c16(self):
        data, root, run = self.trained("c16")
        good = sorted((data / "good").glob("*.png"))[0]
        rc, out = self._serve(
            root,
            run,
            f'pd.DataFrame({{"path": ["{data}/good/a\\x00b.png", "{good}"]}})',
            {"DEFECT_SERVE_ROOTS": str(data)},
        )
        self.record(
            "16a",
            "served: a path with a NUL byte beside a good path",
            rc == 0 and '"ok_rows": 1' in out,
            out.strip()[-250:],
        )
        batch = self.work / "c16-batch"
        batch.mkdir()
        shutil.copy(good, batch / "fine.png")
        bad_name = os.fsdecode(b"bad\xff.png")
        shutil.copy(good, batch / bad_name)
        csv = self.work / "c16.csv"
        rc, out = self.cmd(
            "predict",
            f"model=runs:/{run.info.run_id}/model",
            f"images={batch}",
            f"output={csv}",
            f"paths.root_dir={root}",
        )
        self.record(
            "16b",
            "predict a folder holding a non-UTF-8 file name",
            rc == 0 and csv.exists(),
            f"rc={rc}, csv written={csv.exists()}: {self.last_error(out)}",
        )
        data2 = self.folder("c16c-data")
        shutil.copy(good, data2 / "good" / bad_name)
        rc, out = self.train(data2, self.work / "c16c")
        clean = rc == 0 or (self.one_line_error(rc, out) and "bad" in self.last_error(out))
        self.record(
            "16c",
            "train on a folder holding a non-UTF-8 file name",
            clean and not self.raw(out),
            f"rc={rc}: {self.last_error(out)}",
        )

    def c17(self):
        data, root, run = self.trained("c17")
        folder = self.work / "c17-out"
        folder.mkdir()
        t0 = time.time()
        rc, out = self.cmd(
            "predict",
            f"model=runs:/{run.info.run_id}/model",
            f"images={data}",
            f"output={folder}",
            f"paths.root_dir={root}",
        )
        self.record(
            "17",
            "defect-predict output=<a folder>",
            self.one_line_error(rc, out),
            f"rc={rc} after {time.time() - t0:.0f} s: {self.last_error(out)}",
        )

    def c18(self):
        data = self.folder("c18-data")
        store = self.work / "c18-store"
        env = self.env(MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db")
        procs = [
            subprocess.Popen(
                [self.python, "-m", "defect_detection.train", *self.train_args(data, self.work / f"c18-{i}")],
                cwd=self.work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        rcs = [p.returncode for p in procs]
        clean = all(rc == 0 or self.one_line_error(rc, o) for rc, o in zip(rcs, outs))
        self.record(
            "18",
            "two first runs at once on a new sqlite store",
            clean,
            f"rcs={rcs}: {[self.last_error(o) for o, rc in zip(outs, rcs) if rc]}",
        )

    def c19(self):
        rc, out = self.cmd("predict", f"paths.root_dir={self.work / 'c19'}")
        self.record(
            "19a",
            "defect-predict without images=",
            self.one_line_error(rc, out) and "images" in out,
            f"rc={rc}: {self.last_error(out)}",
        )
        rc, out = self.cmd("explain_cmd", "model=x.pt", f"paths.root_dir={self.work / 'c19'}")
        self.record(
            "19b",
            "defect-explain without inputs=",
            self.one_line_error(rc, out) and "inputs" in out,
            f"rc={rc}: {self.last_error(out)}",
        )
        data = self.folder("c19-data")
        rc, out = self.train(data, self.work / "c19", "data.image_size=abc")
        self.record(
            "19c",
            "data.image_size=abc",
            self.one_line_error(rc, out) and "abc" in out and "None" not in self.last_error(out),
            f"rc={rc}: {self.last_error(out)}",
        )

    def c19d(self):
        data, root, run = self.trained("c19d")
        batch = self.work / "c19d-batch"
        batch.mkdir()
        good = sorted((data / "good").glob("*.png"))
        shutil.copy(good[0], batch / "a.png")
        os.symlink(good[1], batch / "link.png")
        csv = self.work / "c19d.csv"
        rc, out = self.cmd(
            "predict",
            f"model=runs:/{run.info.run_id}/model",
            f"images={batch}",
            f"output={csv}",
            f"paths.root_dir={root}",
        )
        import pandas as pd

        reason = next((e for e in pd.read_csv(csv)["error"].dropna()), "") if csv.exists() else out
        options = (self.code / "conf" / "predict.yaml").read_text()
        advised = [w.split("=")[0] for w in reason.replace("`", " ").split() if "=" in w]
        real = bool(advised) and all(f"\n{a}:" in options for a in advised)
        self.record(
            "19d",
            "symlink refusal: the advice names a real option",
            real,
            f"reason: {reason}; options named: {advised}",
        )
        rc, out = self.cmd(
            "predict",
            f"model=runs:/{run.info.run_id}/model",
            f"images={batch}",
            f"output={csv}",
            f"paths.root_dir={root}",
            "device=cuda",
        )
        line = self.last_error(out)
        self.record(
            "19e",
            "device=cuda without a GPU",
            self.one_line_error(rc, out)
            and ("cuda" in line.lower() or "gpu" in line.lower())
            and "alias" not in line,
            f"rc={rc}: {line}",
        )


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


CASES: dict[str, Callable[[Probe], None]] = {
    name[1:]: getattr(Probe, name) for name in dir(Probe) if name.startswith("c") and name[1:2].isdigit()
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--code", type=Path, default=HERE, help="the tree whose src/ and conf/ are probed")
    parser.add_argument("--only", nargs="*", help="case names (1a, 2, 9, ...)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="misuse-probe-"))
    probe = Probe(args.code.resolve(), work)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for name in sorted(CASES, key=lambda n: (int("".join(c for c in n if c.isdigit())), n)):
            if args.only and name not in args.only:
                continue
            try:
                CASES[name](probe)
            except Exception as err:  # the probe itself failed: not clean, say why
                probe.record(name, "(probe error)", False, f"{type(err).__name__}: {err}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    clean = sum(r[2] for r in probe.results)
    lines = [
        f"{clean} of {len(probe.results)} cases clean (code: {args.code})",
        "",
        "| case | misuse | clean | what happened |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {c} | {w} | {'yes' if ok else '**no**'} | {d.replace('|', '/')} |"
        for c, w, ok, d in probe.results
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return len(probe.results) - clean


if __name__ == "__main__":
    sys.exit(main())
