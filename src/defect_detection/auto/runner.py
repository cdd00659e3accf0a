"""Run the auto recipe's candidates under one parent MLflow run, within a wall-clock budget.

Candidates are ranked on validation only. A small val split cannot tell close candidates apart
(AITEX: 9 good and 11 defect val images; the best-on-val candidates' mean test AUROC over 5
split seeds, 0.699, was below the default recipe's, 0.725), so the rules' order is the prior:
the winner is the first candidate, in that order, whose val AUROC is within `auto.tie_se`
standard errors of the best one (Hanley & McNeil's SE at the best AUROC and the val counts);
`auto.tie_se=0` ranks on val AUROC, then val margin, then time. The parent run's table shows
validation numbers for every candidate and the test numbers of the winner alone, so nothing is
chosen on test. Candidates are ordinary runs nested under the parent (tagged like a
sweep's trials: `defect-promote sweep=latest` or `run_id=<winner>` promotes the winner).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
from mlflow import MlflowClient
from omegaconf import DictConfig

from defect_detection.auto.candidates import Candidate, candidates
from defect_detection.auto.precision import describe, precision_overrides, trains_on_cpu
from defect_detection.auto.profile import DataProfile, profile_split
from defect_detection.base import UserError
from defect_detection.data.geometry import size_hw
from defect_detection.data.summary import markdown_table
from defect_detection.data.validate import screened_records
from defect_detection.models.families import family
from defect_detection.schema import ModelSettings, data_settings, validate_train_config
from defect_detection.tracking.comparison import ROLE_TAG
from defect_detection.tracking.mlflow_run import ensure_local_store, get_or_create_experiment, stop_signal

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    candidate: Candidate
    status: str  # finished, failed, skipped
    seconds: float = 0.0
    estimate_s: float | None = None
    result: dict = field(default_factory=dict)
    note: str = ""
    work: float = 0.0  # what the run's time scales with (work_units)

    def val(self, key: str) -> float:
        v = self.result.get("val", {}).get(key)
        return float(v) if v is not None else float("nan")


def work_units(c: Candidate, detector: DictConfig, n_train_good: int) -> float:
    """What a candidate's time scales with, comparable within its family.

    Trained families: input pixels per image. PatchCore: bank-patches x bank size, the greedy
    coreset's cost, which dominates its run (bottle: 61 of 76 s square, 17 of 20 min on tiles,
    where pixels alone predicted 9x the square run's time and it took 13-16x)."""
    if c.family != "patchcore":
        return float(c.pixels)
    stride = min(int(s) for s in detector.get("strides", [8]))
    patches = 0.8 * n_train_good * c.pixels / stride**2  # every 5th good input is held out of the bank
    ratio = float(detector.get("coreset_ratio", 0.1))
    bank = min(int(detector.get("max_bank", 16384)), math.ceil(ratio * patches))
    return patches * max(1, bank)


def estimate_seconds(c: Candidate, work: float, done: Sequence[Outcome],
                     probe: Callable[[], float] | None = None) -> float | None:
    """A finished candidate of the same family scaled by work units, else the family's own probe
    (Family.estimate_seconds), else the first finished candidate scaled by pixels per image;
    None before any finished."""
    finished = [o for o in done if o.status == "finished"]
    if not finished:
        return None
    same = [o for o in finished if o.candidate.family == c.family and o.work > 0]
    if same:
        return same[0].seconds * work / same[0].work
    if probe is not None:
        return probe()
    ref = finished[0]
    return ref.seconds * c.pixels / max(1, ref.candidate.pixels)


def family_probe(
    c: Candidate, c_cfg: DictConfig, profile: DataProfile, records: Sequence
) -> Callable[[], float] | None:
    """The candidate family's own timed estimate of its run, where it has one."""
    fam = family(c.family)
    if fam.estimate_seconds is None:
        return None
    device = torch.device("cpu" if trains_on_cpu(c_cfg.trainer) else "cuda")

    def probe() -> float:
        settings = ModelSettings.of(validate_train_config(c_cfg))
        return fam.estimate_seconds(settings, size_hw(c_cfg.data.image_size), profile.counts,
                                    [r.path for r in records[:3]], device, int(c_cfg.data.batch_size))

    return probe


def auroc_se(auroc: float, n_good: int, n_defect: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC from n_good x n_defect pairs."""
    if n_good < 1 or n_defect < 1 or math.isnan(auroc):
        return float("nan")
    a = min(max(auroc, 0.0), 1.0)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_defect - 1) * (q1 - a * a) + (n_good - 1) * (q2 - a * a)) / (n_good * n_defect)
    return math.sqrt(max(var, 0.0))


def within_noise(outcomes: Sequence[Outcome], n_val_good: int, n_val_defect: int,
                 tie_se: float) -> tuple[float, list[Outcome]]:
    """The allowance below the best val AUROC, and the finished candidates within it (in order)."""
    finished = [o for o in outcomes if o.status == "finished" and not math.isnan(o.val("val/auroc"))]
    if not finished or tie_se <= 0:
        return 0.0, []
    best = max(o.val("val/auroc") for o in finished)
    allowance = tie_se * auroc_se(best, n_val_good, n_val_defect)
    if math.isnan(allowance):
        return 0.0, []
    return allowance, [o for o in finished if o.val("val/auroc") >= best - allowance - 1e-6]  # float32 AUROCs


def rank(outcomes: Sequence[Outcome], n_val_good: int = 0, n_val_defect: int = 0,
         tie_se: float = 0.0) -> list[Outcome]:
    """Finished candidates, best first: those within `tie_se` SE of the best val AUROC in the
    rules' order, then the rest by val AUROC, then val margin, then the faster."""
    _, first = within_noise(outcomes, n_val_good, n_val_defect, tie_se)

    def key(o: Outcome):
        auroc, margin = o.val("val/auroc"), o.val("val/margin")
        return (
            -(auroc if not math.isnan(auroc) else -1),
            -(margin if not math.isnan(margin) else -1e9),
            o.seconds,
        )

    ids = {id(o) for o in first}
    rest = sorted([o for o in outcomes if o.status == "finished" and id(o) not in ids], key=key)
    return [*first, *rest]


def table(outcomes: Sequence[Outcome], winner: Outcome | None,
          tied: Sequence[Outcome] = ()) -> pd.DataFrame:
    rows = []
    for k, o in enumerate(outcomes, 1):
        row = {
            "order": k,
            "candidate": o.candidate.label,
            "status": o.status,
            "val AUROC": o.val("val/auroc"),
            "val margin": o.val("val/margin"),
            "within noise of best": any(o is t for t in tied),
            "minutes": round(o.seconds / 60, 2),
            "estimate minutes": None if o.estimate_s is None else round(o.estimate_s / 60, 2),
            "winner": o is winner,
            "why": o.candidate.reason,
            "note": o.note,
            "run_id": o.result.get("run_id", ""),
            "overrides": " ".join(o.candidate.overrides),
        }
        for key in ("test/auroc", "test/recall", "test/fp", "test/fn"):  # the winner's alone
            row[key] = (
                float(o.result["test"][key]) if o is winner and key in o.result.get("test", {}) else None
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _result_of(run) -> dict:
    """A finished candidate's result as train() returns it, read back from its MLflow run."""
    metrics = run.data.metrics
    return {"val": {k: v for k, v in metrics.items() if k.startswith("val/")},
            "test": {k: v for k, v in metrics.items() if k.startswith("test/")},
            "threshold": metrics.get("test/threshold"), "run_id": run.info.run_id}


OUTCOME_TAG = "auto.outcome.{}"  # on the parent, per candidate (its order): JSON of how it ended


def _record(client: MlflowClient, parent: str, k: int, o: Outcome) -> None:
    """What the parent keeps of a candidate once it has ended: what a resume skips."""
    client.set_tag(parent, OUTCOME_TAG.format(k), json.dumps({
        "label": o.candidate.label, "status": o.status, "seconds": o.seconds, "estimate_s": o.estimate_s,
        "note": o.note, "work": o.work, "run_id": o.result.get("run_id", "")}))


def _recorded(client: MlflowClient, parent, todo: Sequence[Candidate]) -> dict[int, Outcome]:
    """The outcomes a stopped auto run recorded, rebuilt (finished ones with their runs' metrics)."""
    out = {}
    for k, c in enumerate(todo, 1):
        text = parent.data.tags.get(OUTCOME_TAG.format(k))
        if not text:
            continue
        saved = json.loads(text)
        if saved["label"] != c.label:
            raise UserError(f"Auto run {parent.info.run_id} planned other candidates ({saved['label']} where "
                            f"the data now give {c.label}): the data or the overrides changed since it "
                            "started. Start a new auto run.")
        result = _result_of(client.get_run(saved["run_id"])) if saved["status"] == "finished" else {}
        out[k] = Outcome(c, saved["status"], saved["seconds"], saved["estimate_s"], result, saved["note"],
                         saved["work"])
    return out


def _interrupted_run(client: MlflowClient, experiment_id: str, parent: str, label: str) -> str | None:
    """The newest run of candidate `label` under `parent` that stopped unfinished with a last.ckpt
    to continue from (None: the candidate starts afresh)."""
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}' AND "
                              f"tags.auto_candidate = '{label}' AND attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    folder = runs[0].data.tags.get("checkpoint_dir") if runs else None
    return runs[0].info.run_id if folder and (Path(folder) / "last.ckpt").is_file() else None


def auto_parent_of(client: MlflowClient, run_id: str) -> str:
    """The auto parent run that `run_id` is, or belongs to (a pasted candidate's resume hint)."""
    try:
        run = client.get_run(run_id)
    except Exception:
        raise UserError(f"resume_run_id={run_id}: no such run in this tracking store.") from None
    tags = run.data.tags
    if tags.get("auto") == "parent":
        return run_id
    if tags.get("mlflow.parentRunId") and tags.get("auto_candidate"):
        return tags["mlflow.parentRunId"]
    raise UserError(f"resume_run_id={run_id} is not an auto run: continue it without experiment=auto, "
                    "with its own overrides (its tag resume_with).")


def resume_hint(user_overrides: Sequence[str], parent: str) -> str:
    keep = [o for o in user_overrides if o.split("=", 1)[0].lstrip("+~") not in RESUME_KEYS]
    return " ".join(["defect-train", *map(shlex.quote, keep), f"resume_run_id={parent}"])


RESUME_KEYS = ("ckpt_path", "resume_run_id")


def run_auto(
    cfg: DictConfig,
    user_overrides: Sequence[str],
    train_one: Callable[[DictConfig], dict],
    compose_one: Callable[[str, list[str]], DictConfig],
) -> dict:
    """Profile the data, run the candidates within `auto.budget_minutes`, return the winner's result.

    `compose_one(label, overrides)` composes a candidate's config (its run named `label`),
    `train_one(cfg)` trains it (the real train); both injected so the entry point stays thin.
    Each candidate is linked to the parent run from its start, and the parent records every
    candidate's outcome as it ends, so a stopped auto run (KILLED, candidates.md as far as it got)
    resumes as a whole with `resume_run_id=<parent>`: finished candidates are kept, the interrupted
    one continues from its last.ckpt, the rest run."""
    from hydra.utils import instantiate

    auto = cfg.auto
    began = time.perf_counter()
    budget_s = 60.0 * float(auto.budget_minutes)
    records, _ = screened_records(data_settings(cfg.data))
    profile: DataProfile = profile_split(instantiate(cfg.split.make)(records))
    size = max(size_hw(cfg.data.image_size))
    todo = candidates(
        profile,
        size,
        elongated_aspect=float(auto.elongated_aspect),
        large_factor=float(auto.large_factor),
        min_train_defects=int(auto.min_train_defects),
        native_factor=float(auto.get("native_factor", 1.5)),
        native_max_pixels=int(auto.get("native_max_pixels", 500_000)),
        only=list(auto.only) if auto.get("only") else None,
    )
    if auto.get("max_candidates"):
        todo = todo[: int(auto.max_candidates)]
    precision = str(auto.get("precision", "auto"))
    precision_why = describe(precision, cfg.trainer)
    log.info("auto: %s -> %d candidates: %s; %s", profile.describe(), len(todo),
             ", ".join(c.label for c in todo), precision_why)

    uri = cfg.logger.tracking_uri
    ensure_local_store(uri)
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, cfg.experiment_name, cfg.logger)
    base = [o for o in user_overrides if o.split("=", 1)[0].lstrip("+~") not in RESUME_KEYS]
    done: dict[int, Outcome] = {}
    if cfg.get("resume_run_id"):
        parent = auto_parent_of(client, str(cfg.resume_run_id))
        run = client.get_run(parent)
        if run.info.status == "FINISHED":
            raise UserError(f"Auto run {parent} already FINISHED (winner: {run.data.tags.get('winner')}, run "
                            f"{run.data.tags.get('winner_run_id')}): nothing to resume.")
        done = _recorded(client, run, todo)
        group = run.data.tags.get("sweep_id", parent)
        began -= 60.0 * float(run.data.metrics.get("auto/minutes", 0.0))  # the budget already spent
        client.update_run(parent, status="RUNNING")
        count = int(run.data.tags.get("resume_count", "0")) + 1
        client.set_tag(parent, "resume_count", count)
        if "error" in run.data.tags:  # the stop being resumed is history
            client.set_tag(parent, f"resume.{count}.after_error", run.data.tags["error"])
            client.delete_tag(parent, "error")
        log.info("auto: resuming %s: %d of %d candidates already ended", parent, len(done), len(todo))
    else:
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        group = f"auto-{stamp}"
        parent = client.create_run(
            exp_id,
            run_name=cfg.get("run_name") or group,
            tags={ROLE_TAG: "sweep", "sweep_id": group, "auto": "parent", "data_profile": profile.describe(),
                  "auto_precision": precision_why, "auto_candidates": json.dumps([c.label for c in todo])},
        ).info.run_id
        client.log_dict(parent, profile.to_dict(), "auto/profile.json")
    link = [f"auto.parent_run_id={parent}", f"auto.sweep_id={group}"]
    outcomes: list[Outcome] = []
    status, winner, frame = "FAILED", None, None
    try:
        for k, c in enumerate(todo, 1):
            if k in done:
                outcomes.append(done[k])
                continue
            used = time.perf_counter() - began
            resume = _interrupted_run(client, exp_id, parent, c.label) if cfg.get("resume_run_id") else None
            try:
                c_cfg = compose_one(c.label, [*precision_overrides(precision, cfg.trainer, c.family),
                                              *base, *c.overrides, "auto.enabled=false", *link,
                                              f"auto.candidate={c.label}",
                                              *([f"resume_run_id={resume}"] if resume else [])])
            except Exception as err:  # a candidate that does not compose fails alone
                log.error("auto: candidate %s failed to compose: %s: %s", c.label, type(err).__name__, err)
                outcomes.append(Outcome(c, "failed", note=f"{err}"[:300]))
                _record(client, parent, k, outcomes[-1])
                continue
            work = work_units(c, c_cfg.detector, profile.counts["train"]["good"])
            estimate = estimate_seconds(c, work, outcomes, family_probe(c, c_cfg, profile, records))
            # the likeliest candidate always runs; later ones only while the budget lasts
            if outcomes and (used >= budget_s or (estimate is not None and used + estimate > budget_s)):
                why = f"skipped: {used / 60:.1f} of {budget_s / 60:g} min used" + (
                    f", estimated {estimate / 60:.1f} min more" if estimate is not None else ""
                )
                log.info("auto: candidate %d of %d (%s) %s", k, len(todo), c.label, why)
                outcomes.append(Outcome(c, "skipped", estimate_s=estimate, note=why, work=work))
                _record(client, parent, k, outcomes[-1])
                continue
            log.info(
                "auto: candidate %d of %d: %s (%.1f min left%s)%s -- %s",
                k,
                len(todo),
                c.label,
                (budget_s - used) / 60,
                "" if estimate is None else f", estimated {estimate / 60:.1f} min",
                f", continuing run {resume}" if resume else "",
                c.reason,
            )
            t0 = time.perf_counter()
            try:
                result = train_one(c_cfg)
            except Exception as err:  # one failing candidate must not end the search
                log.error("auto: candidate %s failed: %s: %s", c.label, type(err).__name__, err)
                outcomes.append(
                    Outcome(c, "failed", time.perf_counter() - t0, estimate, note=f"{err}"[:300], work=work)
                )
                _record(client, parent, k, outcomes[-1])
                continue
            finally:
                client.log_metric(parent, "auto/minutes", (time.perf_counter() - began) / 60)
            outcomes.append(Outcome(c, "finished", time.perf_counter() - t0, estimate, result, work=work))
            client.set_tag(result["run_id"], "auto_reason", c.reason)
            _record(client, parent, k, outcomes[-1])
        val = profile.counts["val"]
        tie_se = float(auto.get("tie_se", 0.0))
        allowance, tied = within_noise(outcomes, val["good"], val["defect"], tie_se)
        ranked = rank(outcomes, val["good"], val["defect"], tie_se)
        winner = ranked[0] if ranked else None
        frame = table(outcomes, winner, tied)
        client.log_metric(parent, "auto/val_auroc_allowance", allowance)
        if winner is None:
            raise RuntimeError(
                "auto: no candidate finished: see the failed runs' errors in auto/candidates.md"
            )
        client.set_tag(parent, "winner_run_id", winner.result["run_id"])
        client.set_tag(parent, "winner", winner.candidate.label)
        client.set_tag(winner.result["run_id"], "auto", "winner")
        for key in ("val/auroc", "val/margin"):
            client.log_metric(parent, f"winner_{key}", winner.val(key))
        for key in ("test/auroc", "test/recall", "test/fp", "test/fn"):  # reported once, for the winner
            if key in winner.result["test"]:
                client.log_metric(parent, f"winner_{key}", float(winner.result["test"][key]))
        status = "FINISHED"
    except BaseException as err:
        signal_name = stop_signal(err)
        status = "KILLED" if signal_name else "FAILED"
        hint = resume_hint(user_overrides, parent)
        why = f"stopped by {signal_name}" if signal_name else f"{type(err).__name__}: {err}"
        client.set_tag(parent, "error", why[:5000])
        client.set_tag(parent, "resume_with", hint)
        log.warning("auto stopped (%s) after %d of %d candidates. Resume with: %s",
                    signal_name or type(err).__name__, len(outcomes), len(todo), hint)
        raise
    finally:
        frame = frame if frame is not None else table(outcomes, winner, ())
        client.log_table(parent, frame, "auto/candidates.json")
        client.log_text(parent, markdown_table(frame), "auto/candidates.md")
        client.log_metric(parent, "auto/minutes", (time.perf_counter() - began) / 60)
        if status == "FINISHED" and "resume_with" in client.get_run(parent).data.tags:
            client.delete_tag(parent, "resume_with")  # the hint of an earlier stop, now acted on
        client.set_terminated(parent, status)
    log.info(
        "auto: winner %s (val AUROC %.4f, margin %.2f) -> test AUROC %.4f, recall %.3f, FP %d. "
        "Promote it: defect-promote run_id=%s",
        winner.candidate.label,
        winner.val("val/auroc"),
        winner.val("val/margin"),
        winner.result["test"].get("test/auroc", float("nan")),
        winner.result["test"].get("test/recall", float("nan")),
        int(winner.result["test"].get("test/fp", -1)),
        winner.result["run_id"],
    )
    return {**winner.result, "auto_parent_run_id": parent, "candidates": frame}
