"""Screenshot sections of a userlens report in headless Chromium with the network cut off: the check that the
report renders from the file alone (docs/operations.md, "The report").

    python scripts/screenshot_report.py reports/userlens-report-2026-10-30.html out.png --sections gate,by_group

Needs a Chromium (Debian: ``apt-get install chromium``; ``--chromium`` or $CHROMIUM names another binary).
The requested sections are cut out of the report with its own <head> (styles) into one page; Chromium
loads it through a proxy that does not exist and a resolver that resolves nothing, so anything the page
would fetch from a network fails to render. The picture is trimmed of the blank space below the page.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NO_NETWORK = ["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]


def page_of(report: str, sections: list[str]) -> str:
    head = re.search(r"<head>.*?</head>", report, re.DOTALL)
    if head is None:
        sys.exit("screenshot_report: no <head> in the report: is it a userlens report?")
    parts = []
    for key in sections:
        found = re.search(rf'<section id="{re.escape(key)}">.*?</section>', report, re.DOTALL)
        if found is None:
            ids = re.findall(r'<section id="([^"]+)">', report)
            sys.exit(f"screenshot_report: no section {key!r} in the report (it has: {', '.join(ids)})")
        parts.append(found.group(0))
    return f"<!DOCTYPE html><html>{head.group(0)}<body>{''.join(parts)}</body></html>"


def trim(png: Path, margin: int = 16) -> tuple[int, int]:
    """Cut the blank rows below the content; returns the new size."""
    from PIL import Image, ImageChops

    image = Image.open(png).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None:
        image = image.crop((0, 0, image.width, min(image.height, box[3] + margin)))
    image.save(png, optimize=True)
    return image.size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sections", default="gate,by_group", help="section ids, comma-separated")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=4000, help="the window; the picture is trimmed to the page")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM"))
    args = parser.parse_args(argv)
    chromium = args.chromium or next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )
    if chromium is None:
        sys.exit("screenshot_report: no Chromium found (apt-get install chromium, or pass --chromium)")
    page = page_of(args.report.read_text(encoding="utf-8"), [s.strip() for s in args.sections.split(",") if s.strip()])
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "sections.html"
        html.write_text(page, encoding="utf-8")
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp}/profile",
            *NO_NETWORK,
            f"--window-size={args.width},{args.height}",
            f"--screenshot={args.out.resolve()}",
            html.as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not args.out.exists():
        sys.exit(f"screenshot_report: chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    width, height = trim(args.out)
    print(f"{args.out}: {width}x{height} px, sections {args.sections}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
