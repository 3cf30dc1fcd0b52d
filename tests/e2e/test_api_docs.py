"""``GET /docs``: Swagger UI over /openapi.json, served by the server from the pinned flask-swagger-ui package
(no CDN), under a CSP that forbids inline script; and, in a real headless Chromium when there is one, that it
renders every operation with no CSP violation and takes the token from ``#token=``."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser

import httpx
import pytest
import trio

from tests.conftest import E2E_LIMIT
from web.openapi import APIDOCS_DIR, SWAGGER_UI_DIR
from web.pages import CSP

SWAGGER_UI_VERSION = "v5.34.0"  # flask-swagger-ui==5.34.0 (pyproject.toml) ships this Swagger UI


class Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script":
            if "src" in attributes:
                self.urls.append(attributes["src"])
            else:
                self._in_script = True
        elif tag == "link":
            self.urls.append(attributes["href"])
        elif tag == "style":
            self.inline_styles += 1
        if "style" in attributes or any(name.startswith("on") for name in attributes):
            self.inline_styles += 1

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False


async def test_docs_and_every_asset_it_loads_are_local_with_types_and_csp(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=E2E_LIMIT) as http:
        page = await http.get("/docs")  # public: no token
        assert page.status_code == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
        assert page.headers["Content-Security-Policy"] == CSP and "'unsafe-inline'" not in CSP
        assert page.content == (APIDOCS_DIR / "index.html").read_bytes()
        parser = Assets()
        parser.feed(page.text)
        assert parser.inline_scripts == 0 and parser.inline_styles == 0
        assert sorted(parser.urls) == ["/docs/static/favicon-32x32.png", "/docs/static/swagger-ui-bundle.js",
                                       "/docs/static/swagger-ui.css", "/docs/static/trio-docs.css",
                                       "/docs/static/trio-docs.js"]
        types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
        sent = whole = 0
        for url in parser.urls:
            response = await http.get(url)
            name = url.removeprefix("/docs/static/")
            source = APIDOCS_DIR / name if (APIDOCS_DIR / name).exists() else SWAGGER_UI_DIR / name
            assert response.status_code == 200, url
            assert response.headers["Content-Type"] == types[source.suffix]
            assert response.headers["Content-Security-Policy"] == CSP
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.content == source.read_bytes()  # httpx asked for gzip and undid it
            if source.suffix in (".js", ".css") and source.stat().st_size >= 1024:
                assert response.headers["Content-Encoding"] == "gzip", url
                assert response.num_bytes_downloaded < source.stat().st_size, url
            sent += response.num_bytes_downloaded
            whole += source.stat().st_size
        print(f"\n/docs first load: {sent + len(page.content)} bytes sent (gzip), {whole + len(page.content)} as files")
        # The pinned package's Swagger UI, which reads OpenAPI 3.2 (swagger-ui-bundle's 4.15 reads 3.0 only).
        assert (SWAGGER_UI_DIR / "VERSION").read_text().strip() == SWAGGER_UI_VERSION
        assert (await http.get("/openapi.json")).json()["openapi"] == "3.2.0"
        # Our initializer points at this server's description and turns off the remote validator.
        init = (await http.get("/docs/static/trio-docs.js")).text
        assert 'url: "/openapi.json"' in init and "validatorUrl: null" in init
        assert not re.search(r"https?://", init)
        for path in ("/docs/static/../auth.py", "/docs/static/%2e%2e/openapi.py", "/docs/static/..%2fapp.py"):
            assert (await http.get(path)).status_code == 404, path
        missing = await http.get("/docs/static/nope.js")
        assert missing.status_code == 404 and missing.headers["Content-Security-Policy"] == CSP


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="no chromium: `make test-tools` installs it where apt is there")
async def test_docs_render_every_operation_in_chromium_without_a_csp_violation(server, tmp_path):
    """Headless Chromium loads /docs#token=…, lets the page run (virtual time: Chromium's own clock, which
    waits for the page's requests, not a sleep) and dumps the DOM. Console messages (CSP violations are
    reported there as "Refused to …") go to its log."""
    async with httpx.AsyncClient(base_url=server.url, timeout=E2E_LIMIT) as http:
        spec = (await http.get("/openapi.json")).json()
    operations = sum(len(ops) for ops in spec["paths"].values())
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
            f"{server.url}/docs#token={server.token}"]
    with trio.fail_after(6 * E2E_LIMIT):  # a cold Chromium start on a loaded 2-core machine takes seconds
        result = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    dom, log = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert result.returncode == 0, log[-3000:]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Refused" in line or "Content Security Policy" in line], console
    rendered = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    assert len(rendered) == operations and "/v1/auth/cookie" in rendered
    # The token from the fragment is the bearer authorization: the Authorize button shows it as set.
    assert re.search(r'class="btn authorize locked"', dom), "the #token= was not taken as the bearer token"
