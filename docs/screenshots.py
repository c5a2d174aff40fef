"""Take the README's screenshots from a real run: the live view in a real terminal (tmux), and report.html in Chromium.

    python docs/screenshots.py            # writes docs/live_view.png and docs/report.png

The run is `metaagent exec examples/business_plan.json --llm fake` with unequal latencies, in a
120x40 tmux pane with embedded Ray. The pane is captured with its colours, drawn by rich as HTML,
and photographed by headless Chromium, so the picture shows exactly what the terminal showed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from rich.console import Console
from rich.terminal_theme import MONOKAI
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LATENCY = {"default": 1.5, "coordinator": 1.0, "1": 3.0, "5": 2.5, "8": 3.0}
COLUMNS, ROWS = 120, 40


def chromium_screenshot(page: Path, png: Path, width: int, height: int) -> None:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}"]
    subprocess.run([shutil.which("chromium") or "chromium", *flags, f"--screenshot={png}", page.as_uri()], check=True, capture_output=True)


def terminal_html(ansi: str) -> str:
    console = Console(record=True, width=COLUMNS, force_terminal=True, color_system="truecolor", file=open("/dev/null", "w"))
    console.print(Text.from_ansi(ansi), end="")
    background = MONOKAI.background_color.hex
    return console.export_html(
        theme=MONOKAI,
        inline_styles=True,
        code_format=(
            f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>body {{{{ margin: 0; background: {background}; }}}}'
            f' pre {{{{ margin: 0; padding: 12px; color: #f8f8f2; background: {background}; font: 15px/1.25 "DejaVu Sans Mono", monospace; }}}}</style>'
            "</head><body><pre>{code}</pre></body></html>"
        ),
    )


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="metaagent-shots-"))
    latency = work / "latency.json"
    latency.write_text(json.dumps(LATENCY))
    run_dir = work / "run"
    command = [
        sys.executable,
        "-m",
        "metaagent_ray",
        "exec",
        str(ROOT / "examples" / "business_plan.json"),
        "--llm",
        "fake",
        "--fake-latency",
        str(latency),
        "--slots",
        "3",
        "--run-dir",
        str(run_dir),
    ]
    socket = f"shots-{uuid.uuid4().hex[:6]}"
    tmux = ["tmux", "-L", socket]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "run",
            "-x",
            str(COLUMNS),
            "-y",
            str(ROWS),
            f"cd {shlex.quote(str(work))}; {shlex.join(command)}; echo EXIT=$?; sleep 600",
        ],
        check=True,
    )
    best, best_score = "", 0
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-e", "-p", "-t", "run"], capture_output=True, text=True).stdout
            plain = re.sub(r"\x1b\[[0-9;]*m", "", screen)
            if "EXIT=" in plain:
                break
            # the most telling moment: agents in the most different states at once
            score = len(set(re.findall(r"^\s*\d+\s+[A-Z]+\s+\d+\s+(\w+)", plain, re.MULTILINE)))
            if score >= best_score:
                best, best_score = screen, score
            time.sleep(0.25)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    page = work / "live.html"
    page.write_text(terminal_html(best.rstrip("\n")))
    chromium_screenshot(page, DOCS / "live_view.png", 1120, 800)
    chromium_screenshot(run_dir / "report.html", DOCS / "report.png", 1200, 1900)
    print(f"{DOCS / 'live_view.png'}\n{DOCS / 'report.png'}\n(run kept in {run_dir})")


if __name__ == "__main__":
    main()
