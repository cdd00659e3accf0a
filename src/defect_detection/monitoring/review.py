"""The review queue, the escape-rate estimate, and the export of verdicts as training data.

The queue is what an operator should look at: the flagged parts (rejected: were they really
defective?), the borderline band around the threshold (where the model is least sure), and a
random audit sample of passed parts drawn when they were scored (the only way to see escapes,
defects the model passed). Verdicts (good / defect + type / unsure) go to the prediction log with
who and when; the audit sample's verdicts give the escape rate with a Clopper-Pearson bound;
the export writes a folder dataset (train/good, train/defect/<type>, and a held-back part the
next model is judged on) that `data.extra_roots` reads.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from scipy import stats as scipy_stats

from defect_detection.base import UserError
from defect_detection.monitoring.prediction_log import Prediction, PredictionLog
from defect_detection.naming import file_safe

# The audit sample comes before the borderline band: it is small by construction (predict.log.
# audit_fraction of passed parts) and the only estimate of escapes, so a short review session must
# not spend itself on the band first (in the loop simulation, flagged and borderline cards took the
# whole budget and one audited part was reviewed in 160).
QUEUES = ("flagged", "audit", "borderline")


@dataclass
class QueueItem:
    prediction: Prediction
    queue: str


def review_queue(
    plog: PredictionLog, *, run_id: str | None = None, limit: int = 200, include_reviewed: bool = False
) -> list[QueueItem]:
    """Flagged parts first, then the audit sample, then the borderline ones (newest first in each);
    a part already judged is left out unless include_reviewed."""
    rows = plog.window(run_id=run_id)
    judged = set() if include_reviewed else set(plog.verdicts())
    out: dict[int, QueueItem] = {}
    for queue in QUEUES:
        for r in reversed(rows):
            if r.id in out or r.id in judged or not r.image_path:
                continue
            if (
                (queue == "flagged" and r.decision == "defect")
                or (queue == "borderline" and r.borderline)
                or (queue == "audit" and r.audit)
            ):
                out[r.id] = QueueItem(r, queue)
    return list(out.values())[:limit]


@dataclass
class EscapeEstimate:
    audited: int  # audit-sample parts (all passed) with a good/defect verdict
    escapes: int  # of them judged defect
    rate: float
    upper: float  # one-sided upper confidence bound
    confidence: float

    def describe(self) -> str:
        if not self.audited:
            return "no audited part reviewed yet: the escape rate is unknown"
        return (
            f"{self.escapes} escape(s) in {self.audited} audited passed part(s): escape rate "
            f"{self.rate:.2%}, at most {self.upper:.2%} ({self.confidence:.0%} confidence)"
        )


def escape_estimate(
    plog: PredictionLog, run_id: str | None = None, confidence: float = 0.95
) -> EscapeEstimate:
    """Defects among the passed parts, from the audit sample's verdicts (unsure ones left out)."""
    verdicts = plog.verdicts()
    audited = [
        r
        for r in plog.window(run_id=run_id)
        if r.audit and r.id in verdicts and verdicts[r.id].verdict in ("good", "defect")
    ]
    n, k = len(audited), sum(verdicts[r.id].verdict == "defect" for r in audited)
    upper = float(scipy_stats.beta.ppf(confidence, k + 1, n - k)) if n else 1.0
    return EscapeEstimate(n, k, k / n if n else float("nan"), upper, confidence)


def export_reviewed(
    plog: PredictionLog, out: str | Path, *, holdout: float = 0.3, seed: int = 0, run_id: str | None = None
) -> dict:
    """Write the judged parts as a folder dataset: <out>/train/{good,defect/<type>}/ for training
    (data.extra_roots=[<out>/train]) and <out>/holdout/... held back to judge the next model on,
    split per class (and defect type) with `seed`; unsure verdicts are left out. Returns the
    manifest (also <out>/manifest.json: every part, its verdict, reviewer and digests)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(
            f"export={out} exists and is not empty: export each reviewed batch into a new folder "
            "(the batch's digest is what a training run's lineage names)."
        )
    verdicts = plog.verdicts()
    rows = {r.id: r for r in plog.window(run_id=run_id) if r.id in verdicts}
    groups: dict[str, list[int]] = {}
    for pid, v in verdicts.items():
        if pid in rows and v.verdict in ("good", "defect") and rows[pid].image_path:
            key = "good" if v.verdict == "good" else f"defect/{file_safe(v.defect_type or 'defect')}"
            groups.setdefault(key, []).append(pid)
    if not groups:
        raise UserError("No reviewed part to export: review some parts first (defect-review).")
    rng = random.Random(seed)
    entries = []
    for key in sorted(groups):
        ids = sorted(groups[key])
        rng.shuffle(ids)
        n_hold = int(round(holdout * len(ids))) if len(ids) > 1 else 0
        for i, pid in enumerate(ids):
            part = "holdout" if i < n_hold else "train"
            row, v = rows[pid], verdicts[pid]
            source = Path(row.image_path)
            if not source.is_file():
                continue
            target = out / part / key / f"{pid}_{file_safe(source.name)}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            entries.append(
                {
                    "prediction_id": pid,
                    "file": str(target.relative_to(out)),
                    "split": part,
                    "verdict": v.verdict,
                    "defect_type": v.defect_type,
                    "reviewer": v.reviewer,
                    "queue": v.queue,
                    "reviewed": v.created.isoformat(),
                    "p_defect": row.p_defect,
                    "decision": row.decision,
                    "content_hash": row.content_hash,
                    "run_id": row.run_id,
                    "source_path": row.image_path,
                }
            )
    for part in ("train", "holdout"):  # a folder dataset always has both (read_folder needs them)
        for folder in ("good", "defect"):
            (out / part / folder).mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(
        json.dumps([(e["file"], e["content_hash"], e["verdict"], e["defect_type"]) for e in entries]).encode()
    ).hexdigest()[:16]
    manifest = {
        "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "digest": digest,
        "holdout": holdout,
        "seed": seed,
        "counts": _counts(entries),
        "parts": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _counts(entries: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for e in entries:
        key = f"{e['split']}/{e['verdict']}" + (f"/{e['defect_type']}" if e["defect_type"] else "")
        counts[key] = counts.get(key, 0) + 1
    return counts
