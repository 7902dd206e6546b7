"""Shared pieces of the browser tests: Chromium through Playwright, page helpers, selectors.

Debian's ``/usr/bin/chromium`` is driven through Playwright's Python API (never a downloaded
browser).  Screenshots of the pages are kept in ``test-artifacts/browser/``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import TIMEOUT_UNIT, require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
VIEWPORT = {"width": 1360, "height": 1000}


def ms(seconds: float) -> float:
    """A Playwright timeout in milliseconds, scaled by the suite's timeout unit."""
    return seconds * 1000 * TIMEOUT_UNIT


def tid(name: str) -> str:
    return f'[data-testid="{name}"]'


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def launch_browser(extra_args: tuple[str, ...] = ()) -> Iterator[Any]:
    """Headless Chromium for a module-scoped ``browser`` fixture (``yield from`` this)."""
    require(os.path.exists(CHROMIUM), f"Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright Python package")
        raise
    with sync_playwright() as pw:
        args = [*CHROMIUM_ARGS, *extra_args]
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser context with one page, collecting uncaught page errors."""

    def __init__(self, browser: Any, url: str | None = None) -> None:
        self.context = browser.new_context(
            viewport=VIEWPORT, color_scheme="light", accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.on("websocket", lambda ws: self.requests.append(ws.url))
        if url is not None:
            self.page.goto(url)

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def open_page(browser: Any, url: str | None = None, own_origin_only: bool = True) -> Iterator[Any]:
    """A page at ``url``; afterwards no uncaught JS error and (by default) no request that left
    the page's own origin: the UI loads nothing from a CDN or any other site."""
    p = Page(browser, url)
    try:
        yield p.page
        assert p.errors == [], f"uncaught errors in the page: {p.errors}"
        if url is not None and own_origin_only:
            origin = url.split("/")[2]
            foreign = [
                r
                for r in p.requests
                if not r.startswith(("data:", "blob:")) and r.split("/")[2:3] != [origin]
            ]
            assert foreign == [], f"requests outside {origin}: {foreign}"
    finally:
        p.close()


def wait_linked(page: Any, timeout: float = 20) -> None:
    page.wait_for_selector(f'{tid("status-state")}[data-state="connected"]', timeout=ms(timeout))


def result_rows(page: Any) -> list[dict[str, str]]:
    """The result table as ``data-field -> data-value`` dicts (raw values, not display text)."""
    rows: list[dict[str, str]] = page.eval_on_selector_all(
        tid("bench-row"),
        """rows => rows.map(r => Object.fromEntries(
            Array.from(r.querySelectorAll('td[data-field]'),
                       td => [td.dataset.field, td.dataset.value])))""",
    )
    return rows


def chart(page: Any, attr: str) -> str:
    return str(page.get_attribute(tid("bench-chart"), f"data-{attr}"))


SERIES_PIXELS_JS = """
role => {
  const c = document.querySelector('[data-testid=bench-chart]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const h = getComputedStyle(document.documentElement).getPropertyValue('--series-' + role).trim();
  const [r, g, b] = [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 200 && Math.abs(d[i] - r) < 24 && Math.abs(d[i + 1] - g) < 24
        && Math.abs(d[i + 2] - b) < 24) n++;
  }
  return n;
}
"""
