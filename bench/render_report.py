"""Open an HTML report (``accord report RUN_DIR``, the demo's) in headless Chromium: a screenshot, the console.

    python bench/render_report.py runs/clip/report.html --out shot.png

Fails (exit 1) when the page logs a console error, when an image of the page does not decode, or when the
screenshot is blank. Needs Debian's ``chromium`` (``apt-get install chromium``; not installed by launch/setup.sh:
the suite does not need it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

# the flags Chromium needs on a machine without network or display (as root: no sandbox)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# a script appended to a copy of the page: logs an error for every image that did not decode
CHECK_IMAGES = """<script>window.addEventListener("load", () => { for (const img of document.images) {
  if (!img.complete || img.naturalWidth === 0) console.error("image did not decode: " + img.src.slice(0, 60)); }
  console.log("accord-report-checked " + document.images.length + " images"); });</script>"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report")
    p.add_argument("--out", default="report.png")
    p.add_argument("--size", default="1400,6000", help="window width,height of the screenshot")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("render_report: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(Path(args.report).read_text().replace("</body>", CHECK_IMAGES + "</body>"))
        profile = ["--user-data-dir=" + str(Path(tmp) / "profile")]
        log = subprocess.run(
            [browser, *FLAGS, *profile, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
             "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        shot = subprocess.run(
            [browser, *FLAGS, *profile, f"--window-size={args.size}", f"--screenshot={Path(args.out).resolve()}",
             page.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    console = [line for line in log.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    errors = [line for line in console if "accord-report-checked" not in line]
    checked = next((line for line in console if "accord-report-checked" in line), None)
    ok = shot.returncode == 0 and Path(args.out).is_file()
    if ok:
        image = Image.open(args.out).convert("L")
        lo, hi = image.getextrema()
        dark = sum(image.histogram()[:128]) if hi > lo else 0
        print(f"screenshot {args.out}: {image.size[0]}x{image.size[1]}, {dark} dark pixels")
        ok = dark > 1000
    found = re.search(r"checked (\d+) images", checked or "")
    print(
        f"console: {len(errors)} error line(s); images checked: {found.group(1) if found else 'none (no load event)'}"
    )
    for line in errors:
        print("  " + line)
    return 0 if ok and not errors and found else 1


if __name__ == "__main__":
    sys.exit(main())
