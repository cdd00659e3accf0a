"""The review page in a real browser (Debian's chromium driven by Playwright; skipped, with the
reason, when either is absent): cards render with their image and map, the keys answer, and the
verdicts land in the prediction log with who answered."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_detection.monitoring.prediction_log import ModelInfo, PredictionLog

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def served(tmp_path):
    """The review app over a log of 4 parts (2 flagged with maps, 2 audited), on a free local port."""
    pytest.importorskip("uvicorn")
    import io

    import uvicorn

    from defect_detection.monitoring.review_app import create_app

    plog = PredictionLog(f"sqlite:///{tmp_path / 'log.db'}", audit_fraction=1.0, seed=0)
    rows = []
    for i, p in enumerate((0.9, 0.8, 0.1, 0.2)):
        path = tmp_path / f"part{i}.png"
        Image.fromarray(np.full((48, 48, 3), 60 * i, np.uint8)).save(path)
        row = plog.row(
            source="predict",
            model=ModelInfo("runs:/r/model", run_id="r"),
            p_defect=p,
            threshold=0.5,
            decision="defect" if p >= 0.5 else "good",
            image_path=str(path),
        )
        if p >= 0.5:
            buf = io.BytesIO()
            Image.fromarray(np.eye(16, dtype=np.uint8) * 255).save(buf, format="PNG")
            row["map_png"] = buf.getvalue()
        rows.append(row)
    plog.record(rows)
    plog.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(plog, reviewer="anna", defect_types=["dent"]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    yield plog, f"http://127.0.0.1:{port}/", tmp_path
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_keys_answer_the_cards_and_the_verdicts_are_stored(served):
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is not installed (pip install "
        "playwright; no browser download: Debian's chromium is used)",
    )
    plog, url, tmp_path = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            cards = page.locator(".card")
            assert cards.count() == 4
            assert (
                page.locator(".card .queue-flagged").count() == 2
                and page.locator(".card .queue-audit").count() == 2
            )
            images = page.locator(".card img")
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert images.count() == 6  # 4 parts + 2 maps
            page.fill("#defect-type", "dent")
            page.keyboard.press("Enter")  # back from the type field to the cards
            page.keyboard.press("d")  # first card (flagged): defect, type dent
            page.wait_for_selector(".card.done")
            page.keyboard.press("g")  # second flagged: good (a false reject)
            page.locator(".card").nth(2).locator("button[data-verdict=unsure]").click()
            page.wait_for_function("document.querySelectorAll('.card.done').length === 3")
            page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        finally:
            browser.close()
    verdicts = sorted((v.verdict, v.defect_type, v.reviewer, v.queue) for v in plog.verdicts().values())
    assert verdicts == [
        ("defect", "dent", "anna", "flagged"),
        ("good", None, "anna", "flagged"),
        ("unsure", None, "anna", "audit"),
    ]
    assert Path(tmp_path / "review.png").stat().st_size > 10_000
