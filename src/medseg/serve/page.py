"""The page ``medseg serve`` shows at ``/``: one self-contained HTML file (``page.html``, beside this module).

Nothing in it is fetched from elsewhere: its script and styles are inline, and it talks only to the server that
served it (``/v2/models/{name}`` for the structures and their colours, ``/v1/predict`` for the frames).
"""

from __future__ import annotations

from importlib.resources import files


def page_html() -> str:
    """The page's HTML."""
    return files(__package__).joinpath("page.html").read_text(encoding="utf-8")
