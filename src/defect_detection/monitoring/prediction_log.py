"""The prediction log: every scored part, written in batches to SQLite beside the MLflow store (or
a team's PostgreSQL), and read back by defect-monitor and defect-review.

A row holds the time, the image path and a content hash, the model (URI, registered name and
version, training run), p_defect, the decision and the threshold, whether the part is borderline
(within `borderline_log_odds` of the threshold) or drawn for the random audit of passed parts,
the image statistics (monitoring/image_stats.py) and, for flagged and borderline parts, a small
evidence map (PNG). Operators' verdicts go to a second table.

Writing never costs a prediction: rows are buffered and written `batch_size` at a time in one
transaction; when the database is unreachable or the disk is full the rows wait (a warning says
so) and are retried at the next flush, and at close whatever still could not be written goes to a
`.pending.jsonl` file beside a SQLite database, replayed by the next log that opens it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from defect_detection.redact import redact

log = logging.getLogger(__name__)
VERDICTS = ("good", "defect", "unsure")
MAX_PENDING = 200_000  # rows kept in memory while the database is away


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    source: Mapped[str] = mapped_column(String(16))
    image_path: Mapped[str | None] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    model_uri: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(255), index=True)
    model_version: Mapped[str | None] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(64), index=True)
    p_defect: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    borderline: Mapped[bool] = mapped_column(Boolean, default=False)
    audit: Mapped[bool] = mapped_column(Boolean, default=False)
    stats: Mapped[str | None] = mapped_column(Text)  # JSON of image_stats()
    map_png: Mapped[bytes | None] = mapped_column(LargeBinary)


class Verdict(Base):
    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(16))
    defect_type: Mapped[str | None] = mapped_column(String(255))
    reviewer: Mapped[str] = mapped_column(String(255))
    queue: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def default_url(tracking_uri: str, fallback_dir: Path) -> str:
    """SQLite beside a sqlite MLflow store (X/mlflow.db -> X/predictions.db), else in fallback_dir."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///') :]).expanduser().parent / 'predictions.db'}"
    return f"sqlite:///{Path(fallback_dir) / 'predictions.db'}"


def engine_for(url: str):
    """An engine; SQLite gets its folder, WAL (readers never block the writer) and a busy timeout."""
    if url.startswith("sqlite:///"):
        try:
            Path(url[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # the writes then fail and their rows wait: a warning, not a crash
            log.warning("prediction log %s: cannot create its folder (%s)", redact(url), err)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@dataclass
class ModelInfo:
    """Which model scored: what the row records."""

    uri: str | None = None
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


class PredictionLog:
    """Buffered writer (and reader) of one prediction log database."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 256,
        audit_fraction: float = 0.02,
        borderline_log_odds: float = 1.0,
        seed: int | None = None,
        image_dir: str | None = None,
    ) -> None:
        self.url, self.batch_size = url, max(1, int(batch_size))
        local = Path(url[len("sqlite:///") :]).expanduser().parent if url.startswith("sqlite:///") else None
        self.image_dir = Path(image_dir) if image_dir else (local / "predictions_images" if local else None)
        self.audit_fraction, self.borderline_log_odds = float(audit_fraction), float(borderline_log_odds)
        self.engine = engine_for(url)
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._warned = False
        self._ready = False

    # -- writing -------------------------------------------------------------------------------
    def _create(self) -> None:
        if not self._ready:
            Base.metadata.create_all(self.engine)
            self._ready = True
            self._replay()

    def row(
        self,
        *,
        source: str,
        model: ModelInfo,
        p_defect: float,
        threshold: float,
        decision: str,
        image_path: str | None = None,
        content_hash: str | None = None,
        stats: dict | None = None,
        map_png: bytes | None = None,
    ) -> dict:
        """One row to record (borderline and the audit draw decided here)."""
        import math

        def logit(p: float) -> float:
            p = min(max(p, 1e-7), 1 - 1e-7)
            return math.log(p / (1 - p))

        borderline = abs(logit(p_defect) - logit(threshold)) < self.borderline_log_odds
        audit = decision == "good" and self._rng.random() < self.audit_fraction
        return {
            "created": datetime.now(timezone.utc),
            "source": source,
            "image_path": image_path,
            "content_hash": content_hash,
            "model_uri": model.uri,
            "model_name": model.name,
            "model_version": model.version,
            "run_id": model.run_id,
            "p_defect": float(p_defect),
            "decision": decision,
            "threshold": float(threshold),
            "borderline": bool(borderline),
            "audit": bool(audit),
            "stats": json.dumps(stats) if stats is not None else None,
            "map_png": map_png,
        }

    def keep_image(self, data: bytes, digest: str | None) -> str | None:
        """Keep the bytes of a part sent without a path (base64 to the server) that the review queue
        will show: <image_dir>/<digest>.img; returns its path (None when there is no image_dir)."""
        if self.image_dir is None or not digest:
            return None
        try:
            self.image_dir.mkdir(parents=True, exist_ok=True)
            path = self.image_dir / f"{digest}.img"
            if not path.exists():
                path.write_bytes(data)
            return str(path)
        except OSError as err:
            log.warning("prediction log: cannot keep the image of %s (%s)", digest, err)
            return None

    def record(self, rows: Iterable[dict]) -> None:
        with self._lock:
            self._pending.extend(rows)
            del self._pending[:-MAX_PENDING]
            full = len(self._pending) >= self.batch_size
        if full:
            self.flush()

    def flush(self) -> int:
        """Write what is buffered in one transaction; on failure keep it, warn once, return 0."""
        with self._lock:
            rows, self._pending = self._pending, []
        if not rows:
            return 0
        try:
            self._create()
            with Session(self.engine) as session, session.begin():
                session.execute(Prediction.__table__.insert(), rows)
            if self._warned:
                log.info(
                    "prediction log %s is writable again: %d waiting rows written",
                    redact(self.url),
                    len(rows),
                )
                self._warned = False
            return len(rows)
        except (SQLAlchemyError, OSError) as err:
            with self._lock:
                self._pending = rows + self._pending
            if not self._warned:
                log.warning(
                    "prediction log %s cannot be written (%s): predictions go on, %d row(s) wait "
                    "and are retried",
                    redact(self.url),
                    str(err).splitlines()[0][:200],
                    len(rows),
                )
                self._warned = True
            return 0

    def close(self) -> None:
        """Flush; rows that still cannot be written go to the pending file (SQLite) or are reported."""
        self.flush()
        with self._lock:
            rows, self._pending = self._pending, []
        if not rows:
            return
        spool = self._spool_path()
        try:
            if spool is None:
                raise OSError("no local folder for a pending file")
            with open(spool, "a") as f:
                for r in rows:
                    f.write(
                        json.dumps(
                            {
                                **r,
                                "created": r["created"].isoformat(),
                                "map_png": r["map_png"].hex() if r.get("map_png") else None,
                            }
                        )
                        + "\n"
                    )
            log.warning(
                "prediction log: %d row(s) kept in %s until the database can be written", len(rows), spool
            )
        except OSError as err:
            log.warning(
                "prediction log: %d row(s) could not be logged (%s); the predictions themselves "
                "were returned and written as usual",
                len(rows),
                err,
            )

    def _spool_path(self) -> Path | None:
        if self.url.startswith("sqlite:///"):
            db = Path(self.url[len("sqlite:///") :]).expanduser()
            return db.with_name(db.name + ".pending.jsonl")
        return None

    def _replay(self) -> None:
        spool = self._spool_path()
        if spool is None or not spool.is_file():
            return
        rows = []
        for line in spool.read_text().splitlines():
            r = json.loads(line)
            r["created"] = datetime.fromisoformat(r["created"])
            r["map_png"] = bytes.fromhex(r["map_png"]) if r.get("map_png") else None
            rows.append(r)
        with Session(self.engine) as session, session.begin():
            session.execute(Prediction.__table__.insert(), rows)
        spool.unlink()
        log.info("prediction log: %d pending row(s) from %s written", len(rows), spool)

    # -- reading -------------------------------------------------------------------------------
    def window(
        self,
        *,
        last: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_name: str | None = None,
        run_id: str | None = None,
    ) -> list[Prediction]:
        """The rows of a window (oldest first): the last N, or a time range, of one model."""
        self._create()
        query = select(Prediction)
        if model_name:
            query = query.where(Prediction.model_name == model_name)
        if run_id:
            query = query.where(Prediction.run_id == run_id)
        if since:
            query = query.where(Prediction.created >= since)
        if until:
            query = query.where(Prediction.created <= until)
        query = query.order_by(Prediction.id.desc())
        if last:
            query = query.limit(int(last))
        with Session(self.engine) as session:
            rows = list(session.scalars(query))
            session.expunge_all()
        return rows[::-1]

    def add_verdict(
        self, prediction_id: int, verdict: str, reviewer: str, queue: str, defect_type: str | None = None
    ) -> int:
        if verdict not in VERDICTS:
            raise ValueError(f"verdict {verdict!r}: use one of {VERDICTS}")
        self._create()
        with Session(self.engine) as session, session.begin():
            if session.get(Prediction, prediction_id) is None:
                raise KeyError(prediction_id)
            row = Verdict(
                prediction_id=prediction_id,
                verdict=verdict,
                reviewer=reviewer,
                queue=queue,
                defect_type=defect_type if verdict == "defect" else None,
                created=datetime.now(timezone.utc),
            )
            session.add(row)
            session.flush()
            return row.id

    def verdicts(self) -> dict[int, Verdict]:
        """The latest verdict of each reviewed prediction."""
        self._create()
        with Session(self.engine) as session:
            rows = list(session.scalars(select(Verdict).order_by(Verdict.id)))
            session.expunge_all()
        return {v.prediction_id: v for v in rows}

    def set_map(self, prediction_id: int, png: bytes) -> None:
        """Keep a map drawn later (the review page draws the ones scoring had no time for)."""
        self._create()
        with Session(self.engine) as session, session.begin():
            session.execute(update(Prediction).where(Prediction.id == prediction_id).values(map_png=png))

    def get(self, ids: Sequence[int]) -> list[Prediction]:
        self._create()
        with Session(self.engine) as session:
            rows = list(session.scalars(select(Prediction).where(Prediction.id.in_(list(ids)))))
            session.expunge_all()
        return rows
