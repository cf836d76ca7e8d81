"""The HTML report in a real browser: headless Chromium (Debian's package) driven by Playwright.

``make test`` installs Chromium when it is missing; these tests never skip: without the browser they fail
and say so. The full-page screenshot is kept as a test artefact (``$MEDSEG_ARTEFACTS/report.png``, by
default ``test-artefacts/report.png`` in the project root) for a person to look at.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SECTION_IDS = ("warnings", "headline", "data", "config", "training", "folds", "tuning", "evaluation", "gallery")
MIN_IMAGES = 6
NETWORK = re.compile(r"^(https?|wss?|ftp)://", re.IGNORECASE)

# Scroll through the page (so that nothing lazy stays unloaded), then wait until every image is decoded or broken.
SETTLE_IMAGES = """async () => {
    for (let y = 0; y < document.body.scrollHeight; y += window.innerHeight) {
        window.scrollTo(0, y);
        await new Promise(requestAnimationFrame);
    }
    window.scrollTo(0, 0);
    await Promise.all(Array.from(document.images, img => img.decode().catch(() => null)));
}"""
IMAGE_STATES = """() => Array.from(document.images, (img, i) => ({
    index: i,
    alt: img.alt || img.id || '',
    src: (img.getAttribute('src') || '').slice(0, 40),
    complete: img.complete,
    width: img.naturalWidth,
    height: img.naturalHeight,
}))"""


def artefact_path(name: str) -> Path:
    """Where a test artefact goes: ``$MEDSEG_ARTEFACTS`` (default ``test-artefacts``), relative to the project root."""
    folder = ROOT / os.environ.get("MEDSEG_ARTEFACTS", "test-artefacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def sync_playwright():
    """Playwright's sync API, or a failure that says how to get it (never a skip)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `make test`, which installs it (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError as error:
        pytest.fail(f"Playwright is not installed ({error}): run `make test`, which installs the dev extra")
    return start()


@pytest.fixture(scope="module")
def report_run(tiny_uns_run: Path, tmp_path_factory) -> Path:
    """A tuned copy of the tiny uns-mini run with its report built by ``build_report``."""
    from medseg.cli import main
    from medseg.report.page import ReportRequest, build_report

    run = tmp_path_factory.mktemp("report") / "uns"
    shutil.copytree(tiny_uns_run, run, ignore=shutil.ignore_patterns("last.ckpt"))
    assert main(["tune", str(run), "--quiet", "--no-report"]) == 0
    assert not (run / "report.html").exists()
    html = build_report(ReportRequest(run))
    assert html == run / "report.html" and html.is_file()
    return run


def test_report_opens_in_chromium_without_errors_or_network(report_run: Path):
    html = report_run / "report.html"
    console_errors: list[str] = []
    page_errors: list[str] = []
    failed: list[str] = []
    outside: list[str] = []

    def on_request(request) -> None:
        if not request.url.startswith(("file:", "data:")):
            outside.append(request.url)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("requestfailed", lambda request: failed.append(f"{request.url[:100]}: {request.failure}"))
            page.on("request", on_request)
            page.route(NETWORK, lambda route: route.abort())  # recorded above; never let one leave the machine
            page.goto(html.as_uri(), wait_until="load")
            page.evaluate(SETTLE_IMAGES)
            images = page.evaluate(IMAGE_STATES)
            missing_ids = [name for name in SECTION_IDS if not page.evaluate("id => document.getElementById(id) !== null", name)]
            screenshot = artefact_path("report.png")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert not outside, f"the report made network requests: {outside}"
    assert not failed, f"requests failed: {failed}"
    assert not console_errors, f"console errors: {console_errors}"
    assert not page_errors, f"page errors: {page_errors}"
    assert len(images) >= MIN_IMAGES, f"only {len(images)} <img> in the report, expected at least {MIN_IMAGES}"
    broken = [image for image in images if not (image["complete"] and image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"{len(broken)} of {len(images)} images did not load: {broken}"
    assert not missing_ids, f"sections missing from the report: {missing_ids}"

    shot = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert shot.shape[1] >= 1000 and shot.shape[0] >= 900, f"screenshot {screenshot} is only {shot.shape[1]}x{shot.shape[0]} px"
    assert shot.std() > 10, f"screenshot {screenshot} looks blank (gray standard deviation {shot.std():.1f})"


class _References(HTMLParser):
    """Every src (and a <link>'s href, an <img>'s srcset) of the tags that load something."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.counts = {"img": 0, "script": 0, "link": 0}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.counts:
            return
        self.counts[tag] += 1
        names = {"img": ("src", "srcset"), "script": ("src",), "link": ("src", "href")}[tag]
        self.found += [(tag, name, value or "") for name, value in attrs if name in names]


def test_report_references_nothing_outside_itself(report_run: Path):
    parser = _References()
    parser.feed((report_run / "report.html").read_text(encoding="utf-8"))
    parser.close()
    outside = [(tag, name, value[:100]) for tag, name, value in parser.found if not value.strip().startswith("data:")]
    assert not outside, f"the report refers to files or URLs: {outside}"
    assert parser.counts["img"] >= MIN_IMAGES, f"only {parser.counts['img']} <img> tags in the report"


def test_report_figures_are_saved_as_the_pngs_it_shows(report_run: Path):
    page = (report_run / "report.html").read_text(encoding="utf-8")
    pngs = sorted((report_run / "report").glob("*.png"))
    assert len(pngs) >= MIN_IMAGES, f"only {len(pngs)} PNGs in {report_run / 'report'}"
    not_shown = [png.name for png in pngs if base64.b64encode(png.read_bytes()).decode("ascii") not in page]
    assert not not_shown, f"PNGs in report/ that report.html does not show inline: {not_shown}"
