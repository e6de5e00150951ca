"""/docs and /redoc work on a host without internet: every asset a page references comes from the service."""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import httpx
import pytest

from meds_service.app import STATIC_DIR

# URLs written in the pages' inline scripts and attributes (Swagger UI's `url: '...'`, ReDoc's spec-url).
_SCRIPT_URL = re.compile(r"""(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""")
_OAUTH_REDIRECT = re.compile(r"""oauth2RedirectUrl:\s*window\.location\.origin\s*\+\s*'([^']+)'""")


class _References(HTMLParser):
    """Every URL a page makes the browser fetch: script src, link href, img src, ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and name in ("src", "href", "spec-url"):
                self.urls.append(value)


def _references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return [*parser.urls, *_SCRIPT_URL.findall(html), *_OAUTH_REDIRECT.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_asset_of_the_docs_page_comes_from_the_service(page: str, start_server: Callable[..., str]) -> None:
    base = start_server(refit_processes=False, refit_workers=1)
    response = httpx.get(base + page, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text and "//cdn" not in response.text
    urls = _references(response.text)
    assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls
    for url in set(urls):
        assert not urlparse(url).netloc, f"{page} references {url} on another host"
        fetched = httpx.get(urljoin(base + page, url), timeout=30)
        assert fetched.status_code == 200, url
        assert fetched.content, url
        if url.startswith("/static/"):
            assert fetched.content == (STATIC_DIR / url.removeprefix("/static/")).read_bytes()


def test_vendored_assets_carry_their_licenses() -> None:
    for folder in ("swagger-ui", "redoc"):
        assert (STATIC_DIR / folder / "LICENSE").read_text().strip()
    assert "Apache License" in (STATIC_DIR / "swagger-ui" / "LICENSE").read_text()
    assert "MIT" in (STATIC_DIR / "redoc" / "LICENSE").read_text()
    total = sum(p.stat().st_size for p in Path(STATIC_DIR).rglob("*") if p.is_file())
    assert total < 4_000_000, f"vendored assets grew to {total} bytes"
