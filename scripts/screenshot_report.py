"""Render a userlens report in headless Chromium with the network cut off, and screenshot it or some of its
sections: the check that the report renders from the file alone (docs/operations.md, "Report";
tests/test_report.py runs it with a proxy that records every request the page makes).

    python scripts/screenshot_report.py reports/userlens-report-2026-10-30.html out.png --sections gate,by_group

Needs a Chromium (Debian: ``apt-get install chromium``; ``make setup`` installs it where apt-get can;
``--chromium`` or $CHROMIUM names another binary). The requested sections are cut out of the report with
its own <head> (styles) into one page; Chromium loads it through a proxy that does not exist (or the one
``--proxy-port`` names) and a resolver that resolves nothing, so anything the page would fetch from a
network fails to render. The picture is trimmed of the blank space below the page.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DISCARD_PORT = 9  # nothing listens there: every proxied request fails


# Chromium's own network calls off, so that whatever reaches the proxy came from the page
BROWSER_QUIET = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,MediaRouter,Translate,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater,SigninInterception",
)


BROWSER_HOSTS = ("*.google.com", "*.googleapis.com", "*.gstatic.com", "*.gvt1.com")


class RenderError(Exception):
    pass


@dataclass(frozen=True)
class Rendered:
    dom: str  # the document after load (Chromium's --dump-dom)
    png: Path
    size: tuple[int, int]


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


def page_of(report: str, sections: list[str] | None) -> str:
    """The report itself (``sections`` None), or its <head> and the named sections as one page."""
    if not sections:
        return report
    head = re.search(r"<head>.*?</head>", report, re.DOTALL)
    if head is None:
        raise RenderError("no <head> in the report: is it a userlens report?")
    parts = []
    for key in sections:
        found = re.search(rf'<section id="{re.escape(key)}">.*?</section>', report, re.DOTALL)
        if found is None:
            ids = re.findall(r'<section id="([^"]+)">', report)
            raise RenderError(f"no section {key!r} in the report (it has: {', '.join(ids)})")
        parts.append(found.group(0))
    return f"<!DOCTYPE html><html>{head.group(0)}<body>{''.join(parts)}</body></html>"


def render(
    page: str,
    png: Path,
    chromium: str,
    proxy_port: int = DISCARD_PORT,
    width: int = 1100,
    height: int = 4000,
) -> Rendered:
    """Load ``page`` (HTML text) from a file in headless Chromium with every network request sent to
    127.0.0.1:``proxy_port``; its DOM after load, and a screenshot trimmed to the content in ``png``."""
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "page.html"
        html.write_text(page, encoding="utf-8")
        common = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            # none of the browser's own calls (updates, network time, sign-in, metrics): the proxy sees the page's
            *BROWSER_QUIET,
            f"--user-data-dir={tmp}/profile",
            f"--proxy-server=127.0.0.1:{proxy_port}",
            # what the browser still calls on its own (component updates, sign-in: Google's hosts) goes around the
            # proxy and resolves nowhere; tests/test_report.py also checks the page names no http(s) URL at all
            f"--proxy-bypass-list={';'.join(BROWSER_HOSTS)}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--window-size={width},{height}",
        ]
        dom = _run([*common, "--dump-dom", html.as_uri()]).stdout
        _run([*common, f"--screenshot={png.resolve()}", html.as_uri()])
    if not png.exists():
        raise RenderError(f"chromium wrote no screenshot to {png}")
    return Rendered(dom, png, trim(png))


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RenderError(f"chromium failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done


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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sections", default="", help="section ids, comma-separated (default: the whole report)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=4000, help="the window; the picture is trimmed to the page")
    parser.add_argument("--chromium")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        sys.exit("screenshot_report: no Chromium found (apt-get install chromium, or pass --chromium)")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        rendered = render(
            page_of(args.report.read_text(encoding="utf-8"), sections),
            args.out,
            chromium,
            width=args.width,
            height=args.height,
        )
    except RenderError as exc:
        sys.exit(f"screenshot_report: {exc}")
    width, height = rendered.size
    print(f"{args.out}: {width}x{height} px, {', '.join(sections) or 'the whole report'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
