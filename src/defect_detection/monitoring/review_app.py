"""The review page: a local web app (FastAPI, Jinja2, no external assets) over the prediction log.

Cards of the queue (flagged, audit, borderline) with the part and its evidence map; the operator
answers good / defect (with a type) / unsure by button or key (g, d, u; j/k move between cards).
It serves only images the log recorded (by prediction id, never a path from the client) and binds
to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel

from defect_detection.monitoring.prediction_log import VERDICTS, Prediction, PredictionLog
from defect_detection.monitoring.review import escape_estimate, review_queue
from defect_detection.reports.html import environment

PREVIEW_SIDE = 640  # long side of the image a card shows


class VerdictIn(BaseModel):
    prediction_id: int
    verdict: str
    queue: str = "flagged"
    defect_type: str | None = None
    who: str | None = None


def create_app(
    plog: PredictionLog,
    *,
    reviewer: str,
    defect_types: list[str] | None = None,
    run_id: str | None = None,
    limit: int = 200,
    draw_map: Callable[[Prediction], bytes | None] | None = None,
) -> FastAPI:
    """The page's app; `draw_map` draws (and the log keeps) the map of a part that scoring left
    without one (its time budget), when its card is shown."""
    app = FastAPI(title="defect-review", docs_url=None, redoc_url=None, openapi_url=None)
    env = environment()
    types = list(defect_types or [])

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        queue = review_queue(plog, run_id=run_id, limit=limit)
        known = sorted({*types, *(v.defect_type for v in plog.verdicts().values() if v.defect_type)})
        return env.get_template("review.html.j2").render(
            items=queue,
            reviewer=reviewer,
            defect_types=known,
            escape=escape_estimate(plog, run_id),
            reviewed=len(plog.verdicts()),
            draws_maps=draw_map is not None,
        )

    @app.get("/image/{prediction_id}")
    def image(prediction_id: int) -> Response:
        row = _row(prediction_id)
        if not row.image_path or not Path(row.image_path).is_file():
            raise HTTPException(404, "the image of this part is no longer on disk")
        from defect_detection.data.images import load_rgb

        im = load_rgb(row.image_path)
        im.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png")

    @app.get("/map/{prediction_id}")
    def evidence(prediction_id: int) -> Response:
        row = _row(prediction_id)
        png = row.map_png
        if not png and draw_map is not None:
            try:
                png = draw_map(row)
            except Exception as err:  # noqa: BLE001  (the card shows the part without its map)
                raise HTTPException(404, f"no map for this part: {type(err).__name__}: {err}") from err
            if png:
                plog.set_map(prediction_id, png)
        if not png:
            raise HTTPException(404, "no map was recorded for this part")
        return Response(png, media_type="image/png")

    @app.post("/verdict")
    def verdict(body: VerdictIn) -> JSONResponse:
        if body.verdict not in VERDICTS:
            raise HTTPException(422, f"verdict must be one of {VERDICTS}")
        _row(body.prediction_id)
        kind = (body.defect_type or "").strip() or None
        vid = plog.add_verdict(
            body.prediction_id, body.verdict, (body.who or "").strip() or reviewer, body.queue, kind
        )
        return JSONResponse(
            {"id": vid, "prediction_id": body.prediction_id, "verdict": body.verdict, "defect_type": kind}
        )

    @app.get("/summary")
    def summary() -> JSONResponse:
        e = escape_estimate(plog, run_id)
        return JSONResponse(
            {
                "reviewed": len(plog.verdicts()),
                "queue": len(review_queue(plog, run_id=run_id, limit=limit)),
                "escape": {
                    "audited": e.audited,
                    "escapes": e.escapes,
                    "rate": e.rate if e.audited else None,
                    "upper": e.upper,
                    "text": e.describe(),
                },
            }
        )

    def _row(prediction_id: int):
        rows = plog.get([prediction_id])
        if not rows:
            raise HTTPException(404, f"no prediction {prediction_id} in the log")
        return rows[0]

    return app
