"""The page of ``medseg serve`` in a real browser: headless Chromium (Debian's package) driven by Playwright.

A real server (``python -m medseg serve RUN --port 0``) serves the tiny uns-mini run; the page uploads real frames,
draws each structure's outline on the frame, and shows the numbers ``/v1/predict`` gives for the same file. These
tests never skip: without the browser they fail and say so. The full-page screenshot is kept as a test artefact
(``$MEDSEG_ARTEFACTS/serve-page.png``, by default ``test-artefacts/serve-page.png`` in the project root).
"""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.serve.app import PAGE_POLICY
from serve_client import ServerProcess, post_frames, request, wait_ready
from test_report_browser import CHROMIUM, CHROMIUM_ARGS, NETWORK, artefact_path, sync_playwright

TOKEN = "secret-token-123"
BROWSER_TIMEOUT_MS = 30_000
DRAWN = 'canvas.overlay[data-drawn="true"]'
MIN_GRAY_LEVELS = 50
NOT_AN_IMAGE = b"this is a text file, not a frame\n"


@dataclass
class Server:
    """A ``medseg serve`` process and where it answers.

    Attributes:
        process: The server process (:class:`serve_client.ServerProcess`).
        token: The bearer token it needs, if any.
    """

    process: ServerProcess
    token: str | None = None

    @property
    def url(self) -> str:
        """The page's address, ``http://127.0.0.1:PORT/``."""
        return f"http://127.0.0.1:{self.process.port}/"

    @property
    def origin(self) -> str:
        """The page's origin, ``http://127.0.0.1:PORT`` (no trailing slash)."""
        return self.url.rstrip("/")

    def headers(self) -> dict[str, str]:
        """The Authorization header the server needs (none without a token)."""
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def running_server(run: Path, folder: Path, token: str | None = None) -> Iterator[Server]:
    """``medseg serve`` on a free port in ``folder``, ready; stopped with SIGTERM at the end.

    Args:
        run: The run to serve.
        folder: The process's working directory.
        token: The bearer token (given as ``MEDSEG_SERVE_TOKEN``), or ``None`` for an open server.
    """
    with ServerProcess(run, "--quiet", cwd=folder, env={"MEDSEG_SERVE_TOKEN": token} if token else None) as process:
        server = Server(process, token)
        wait_ready(process.port, server.headers())
        yield server
        process.stop()


def call(server: Server, path: str) -> tuple[int, dict]:
    """``GET`` a route of the server, with its token: the HTTP status and the JSON answer."""
    reply = request(server.process.port, "GET", f"/{path}", headers=server.headers())
    return reply.status, reply.json


def predict(server: Server, files: list[tuple[str, bytes]]) -> tuple[int, dict]:
    """``POST /v1/predict?masks=true&preview=true`` with the files, as the page sends them."""
    reply = post_frames(server.process.port, files, "?masks=true&preview=true", server.headers())
    return reply.status, reply.json


def shown_probability(probability: float | None) -> str:
    """A presence probability as the page shows it: 3 decimals, halves rounded up (JavaScript's ``toFixed``), or a dash."""
    if probability is None:
        return "—"
    return str(Decimal(probability).quantize(Decimal("0.001"), rounding=ROUND_HALF_UP))


def rgb(colour: str) -> tuple[int, int, int]:
    """A ``#rrggbb`` colour as its red, green and blue values."""
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def png_pixels(data_url_or_base64: str) -> np.ndarray:
    """The pixels of a PNG given as a data URL or as base64: RGB ``(H, W, 3)`` or gray ``(H, W)``, ``uint8``."""
    encoded = data_url_or_base64.split(",", 1)[1] if data_url_or_base64.startswith("data:") else data_url_or_base64
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    return np.asarray(image.convert("RGB" if data_url_or_base64.startswith("data:") else "L"))


@dataclass
class Watched:
    """A browser page with what it did: every request's URL, console errors and uncaught script errors."""

    page: object
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def assert_clean(self, server: Server, refused_statuses: tuple[int, ...] = ()) -> None:
        """No request left the server's origin, no script failed, no console error but the refusals expected."""
        outside = [url for url in self.requests if not url.startswith((server.url, "data:", "blob:"))]
        assert not outside, f"the page made requests outside {server.url}: {outside}"
        assert not self.page_errors, f"script errors: {self.page_errors}"
        refusals = [f"the server responded with a status of {status} " for status in refused_statuses]
        unexpected = [line for line in self.console_errors if not any(refusal in line for refusal in refusals)]
        assert not unexpected, f"console errors: {unexpected}"


@pytest.fixture(scope="module")
def server(tiny_uns_run: Path, tmp_path_factory) -> Iterator[Server]:
    """A ``medseg serve`` of the tiny uns-mini run without a token, shared by the module's tests."""
    with running_server(tiny_uns_run, tmp_path_factory.mktemp("serve")) as running:
        yield running


@pytest.fixture(scope="module")
def token_server(tiny_uns_run: Path, tmp_path_factory) -> Iterator[Server]:
    """A ``medseg serve`` of the tiny uns-mini run that needs :data:`TOKEN`."""
    with running_server(tiny_uns_run, tmp_path_factory.mktemp("serve-token"), token=TOKEN) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, shared by the module's tests (each opens its own context)."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=BROWSER_TIMEOUT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_page(browser) -> Iterator:
    """Factory: ``open_page(server)`` opens the server's page in a fresh context and returns it :class:`Watched`."""
    contexts = []

    def open_(server: Server) -> Watched:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.origin)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(BROWSER_TIMEOUT_MS)
        watched = Watched(page)
        page.on("request", lambda request: watched.requests.append(request.url))
        page.on("console", lambda message: watched.console_errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: watched.page_errors.append(str(error)))
        response = page.goto(server.url, wait_until="load")
        assert response is not None and response.status == 200, f"GET / answered {response and response.status}"
        assert response.headers.get("content-security-policy") == PAGE_POLICY
        return watched

    yield open_
    for context in contexts:
        context.close()


def frame_bytes(shared_data: Path, *names: str) -> list[tuple[str, bytes]]:
    """The named uns-mini test frames as (file name, bytes)."""
    return [(name, (shared_data / "uns-mini" / "test" / name).read_bytes()) for name in names]


def wait_for_cards(page, count: int) -> None:
    """Wait until ``count`` frame cards have their overlay drawn (no ``wait_for_function``: the page's CSP forbids eval)."""
    page.locator(f".frame-card {DRAWN}").nth(count - 1).wait_for()
    assert page.locator(".frame-card").count() == count


def assert_card_matches(page, expected: dict, colours: dict[str, str]) -> None:
    """The card of a frame shows the API's numbers, RLE and mask links, and its canvas the frame with the outlines.

    Args:
        page: The browser page.
        expected: The frame's entry in the ``/v1/predict`` answer for the same file.
        colours: Each structure's colour, from the model's metadata.
    """
    card = page.locator(f'.frame-card[data-name="{expected["name"]}"]')
    assert card.count() == 1, f"no single card for {expected['name']!r}"
    for structure in expected["structures"]:
        row = card.locator(f'.structure-row[data-structure="{structure["structure"]}"]')
        shown = {
            "present": row.locator(".present").text_content(),
            "presence": row.locator(".presence").text_content(),
            "area": row.locator(".area").text_content(),
            "rle": row.locator(".rle").text_content(),
        }
        wanted = {
            "present": "yes" if structure["present"] else "no",
            "presence": shown_probability(structure["presence_probability"]),
            "area": str(structure["area"]),
            "rle": structure["rle"],
        }
        assert shown == wanted, f"{expected['name']} {structure['structure']}: the page shows {shown}, the API says {wanted}"
        link = row.locator("a.download-mask")
        stem = expected["name"].rsplit(".", 1)[0]
        assert link.get_attribute("download") == f"{stem}_{structure['structure']}_mask.png"
        assert link.get_attribute("href") == f"data:image/png;base64,{structure['mask_png']}"

    pixels = png_pixels(card.locator(DRAWN).evaluate("canvas => canvas.toDataURL('image/png')"))
    assert pixels.shape == (expected["height"], expected["width"], 3), f"canvas is {pixels.shape}"
    gray = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])
    levels = len(np.unique(pixels[..., 0][gray]))
    assert levels >= MIN_GRAY_LEVELS, f"the canvas of {expected['name']} looks blank: {levels} gray levels"
    preview = png_pixels(expected["preview_png"])
    assert np.array_equal(pixels[..., 0][gray], preview[gray]), f"the canvas of {expected['name']} is not the frame the model saw"
    for structure in expected["structures"]:
        outline = np.all(pixels == rgb(colours[structure["structure"]]), axis=-1)
        if structure["present"]:
            assert outline.any(), f"no outline of {structure['structure']} in the colour {colours[structure['structure']]}"
            assert outline.sum() <= structure["area"], "an outline lies outside its mask"
        else:
            assert not outline.any(), f"an outline of {structure['structure']}, which the API says is absent"


def model_colours(server: Server, answer: dict) -> dict[str, str]:
    """Each structure's colour from ``/v2/models/{name}``."""
    status, metadata = call(server, f"v2/models/{answer['model']}")
    assert status == 200, metadata
    return dict(zip(metadata["parameters"]["structures"], metadata["parameters"]["colours"], strict=True))


def test_page_shows_a_frame_with_its_outlines_and_the_apis_numbers(server: Server, open_page, shared_data: Path):
    watched = open_page(server)
    page = watched.page
    page.wait_for_selector('#ready[data-state="ready"]')
    page.set_input_files("#files", str(shared_data / "uns-mini" / "test" / "1.tif"))
    page.wait_for_selector(f'.frame-card[data-name="1.tif"] {DRAWN}')
    page.wait_for_selector("#model-info dd")
    screenshot = artefact_path("serve-page.png")
    page.screenshot(path=str(screenshot), full_page=True)

    status, answer = predict(server, frame_bytes(shared_data, "1.tif"))
    assert status == 200, answer
    assert_card_matches(page, answer["frames"][0], model_colours(server, answer))
    info = page.text_content("#model-info")
    for fact in (answer["model"], answer["run_id"], "kaggle"):
        assert fact in info, f"{fact!r} missing from the model line {info!r}"
    meta = page.text_content(".frame-card .meta")
    assert "580 × 420 px" in meta and "kB" in meta, f"the card's size line is {meta!r}"

    row = page.locator(".structure-row").first
    row.locator("button.copy-rle").click()
    page.wait_for_selector(".structure-row button.copy-rle:text-is('copied')")
    assert page.evaluate("navigator.clipboard.readText()") == answer["frames"][0]["structures"][0]["rle"]
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    watched.assert_clean(server)

    shot = np.asarray(Image.open(screenshot).convert("L"))
    assert shot.shape[1] >= 1000 and shot.shape[0] >= 600, f"screenshot {screenshot} is only {shot.shape[1]}x{shot.shape[0]} px"
    assert len(np.unique(shot)) >= MIN_GRAY_LEVELS and shot.std() > 10, f"screenshot {screenshot} looks blank"


def test_two_files_give_two_cards_in_order(server: Server, open_page, shared_data: Path):
    watched = open_page(server)
    page = watched.page
    page.set_input_files("#files", [str(shared_data / "uns-mini" / "test" / name) for name in ("1.tif", "2.tif")])
    wait_for_cards(page, 2)
    page.screenshot(path=str(artefact_path("serve-page-two-frames.png")), full_page=True)

    names = page.eval_on_selector_all(".frame-card", "cards => cards.map(card => card.dataset.name)")
    assert names == ["1.tif", "2.tif"]
    status, answer = predict(server, frame_bytes(shared_data, "1.tif", "2.tif"))
    assert status == 200, answer
    colours = model_colours(server, answer)
    for frame in answer["frames"]:
        assert_card_matches(page, frame, colours)
    watched.assert_clean(server)


def test_a_broken_upload_shows_the_servers_error_and_the_page_goes_on(server: Server, open_page, shared_data: Path):
    watched = open_page(server)
    page = watched.page
    page.set_input_files("#files", files=[{"name": "x.png", "mimeType": "image/png", "buffer": NOT_AN_IMAGE}])
    page.wait_for_selector("#error", state="visible")

    status, answer = predict(server, [("x.png", NOT_AN_IMAGE)])
    assert status == 415 and answer["error"], answer
    shown = page.text_content("#error")
    assert answer["error"] in shown and "415" in shown, f"#error shows {shown!r}, the server said {answer['error']!r}"
    assert page.locator(".frame-card").count() == 0

    page.set_input_files("#files", str(shared_data / "uns-mini" / "test" / "1.tif"))
    page.wait_for_selector(f'.frame-card[data-name="1.tif"] {DRAWN}')
    page.wait_for_selector("#error", state="hidden")
    watched.assert_clean(server, refused_statuses=(415,))


def test_no_request_leaves_the_servers_origin(server: Server, open_page, shared_data: Path):
    watched = open_page(server)
    page = watched.page
    page.route(NETWORK, lambda route: route.continue_() if route.request.url.startswith(server.url) else route.abort())
    page.set_input_files("#files", [str(shared_data / "uns-mini" / "test" / name) for name in ("1.tif", "2.tif")])
    wait_for_cards(page, 2)
    page.locator("button.copy-rle").first.click()

    assert watched.requests, "no request recorded"
    assert any(url.startswith(f"{server.url}v1/predict") for url in watched.requests), watched.requests
    assert any(url.startswith(f"{server.url}v2/models/") for url in watched.requests), watched.requests
    watched.assert_clean(server)


def test_a_token_server_asks_for_the_token_and_works_with_it(token_server: Server, open_page, shared_data: Path):
    watched = open_page(token_server)
    page = watched.page
    page.wait_for_selector("#token", state="visible")
    page.set_input_files("#files", str(shared_data / "uns-mini" / "test" / "1.tif"))
    page.wait_for_selector("#error", state="visible")
    shown = page.text_content("#error")
    assert "401" in shown and "missing or wrong token" in shown, f"#error shows {shown!r}"

    page.fill("#token", TOKEN)
    page.press("#token", "Enter")
    page.wait_for_selector('#ready[data-state="ready"]')
    page.set_input_files("#files", str(shared_data / "uns-mini" / "test" / "1.tif"))
    page.wait_for_selector(f'.frame-card[data-name="1.tif"] {DRAWN}')
    page.wait_for_selector("#error", state="hidden")
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    watched.assert_clean(token_server, refused_statuses=(401,))


# A 9x7 mask with a hole and a pixel on the edge; the page draws its outline (2 px, inward) in the structure's colour.
SYNTHETIC_MASK = np.zeros((7, 9), np.uint8)
SYNTHETIC_MASK[1:6, 1:7] = 1
SYNTHETIC_MASK[3, 3] = 0
SYNTHETIC_MASK[0, 8] = 1


def expected_outline(mask: np.ndarray) -> np.ndarray:
    """The page's outline of a mask: mask pixels with a 4-neighbour outside it or off the image, and their inner 4-neighbours."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = inside & ~interior
    grown = np.pad(edge, 1)
    near = grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
    return edge | (inside & near)


def png_base64(array: np.ndarray) -> str:
    """An 8-bit gray array as a base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_the_outline_is_the_masks_border_in_the_structures_colour(server: Server, open_page):
    watched = open_page(server)
    height, width = SYNTHETIC_MASK.shape
    frame = np.full((height, width), 100, np.uint8)
    structure = {"structure": "foreground", "present": True, "mask_png": png_base64(SYNTHETIC_MASK * 255)}
    synthetic = {"name": "synthetic", "width": width, "height": height, "preview_png": png_base64(frame), "structures": [structure]}
    data_url = watched.page.evaluate(
        """async frame => {
            const canvas = document.createElement('canvas');
            canvas.width = frame.width;
            canvas.height = frame.height;
            await drawFrame(canvas, frame);
            return canvas.toDataURL('image/png');
        }""",
        synthetic,
    )
    pixels = png_pixels(data_url)
    drawn = np.all(pixels == rgb("#22c55e"), axis=-1)
    np.testing.assert_array_equal(drawn, expected_outline(SYNTHETIC_MASK))
    assert np.all(pixels[~drawn] == 100), "the frame under the outline changed"
    watched.assert_clean(server)
