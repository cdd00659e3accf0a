"""Screenshots of the pages after deployment: the review queue (defect-review) and the newest
alarming monitor page (defect-monitor's monitor.html), from a loop-simulation working folder.

    python scripts/loop_simulation.py --seeds 2 --work /tmp/loop
    python scripts/screenshots_after_deployment.py /tmp/loop/seed2 --out docs/assets/screenshots

Starts `defect-review` on the folder's prediction log (every model's parts, 127.0.0.1, a free
port), shoots the page in Debian's chromium through Playwright, stops the server, then shoots the
newest monitor.html that raised an alarm. Needs Debian's chromium (`apt-get install -y chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from screenshots import free_port, wait_for  # noqa: E402  (the MLflow UI screenshots' helpers)


def newest_alarm_page(root: Path) -> Path | None:
    """The newest monitor.html whose page names an alarm (else the newest one)."""
    pages = sorted(root.glob("mlruns/artifacts/*/artifacts/monitor.html"), key=lambda p: p.stat().st_mtime)
    alarming = [p for p in pages if "ALARM" in p.read_text(errors="replace").upper()]
    return (alarming or pages or [None])[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", type=Path, help="a loop-simulation seed folder (mlruns/ with predictions.db)")
    parser.add_argument("--out", type=Path, default=Path("docs/assets/screenshots"))
    parser.add_argument("--width", type=int, default=1280)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    work = args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    review = Path(sys.executable).with_name("defect-review")
    server = subprocess.Popen(
        [str(review), "model=null", f"port={port}", "reviewer=operator", f"paths.root_dir={work}",
         "hydra.run.dir=" + str(work / "outputs" / "review")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(args.out / "review_page.png"), full_page=False)
            monitor = newest_alarm_page(work)
            if monitor is not None:
                page.set_viewport_size({"width": args.width, "height": 1400})
                page.goto(monitor.as_uri())
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(args.out / "monitor_page.png"), full_page=False)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    shots = ["review_page.png"] + (["monitor_page.png"] if monitor else [])
    print("wrote", ", ".join(str(args.out / name) for name in shots))


if __name__ == "__main__":
    main()
