"""The Runtime tab's MCP panel in a real headless Chromium against a real ``trio-runtime serve`` with real
stdio MCP servers (issue 17: "servers with status and error, tools").

Servers are added over HTTP (POST /v1/mcp/servers answers once a server is ready or has failed), so what the
panel must show is known before the tab opens; every wait is a condition (Page.wait), screenshots go to
tests/browser/screenshots/<test name>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from selenium.webdriver.common.by import By

from tests.browser.conftest import Page
from tests.e2e.test_mcp_http import TOOLBOX
from tests.procs import alive, children_of

MISSING = "/nonexistent/mcp-server"


def panel(page: Page) -> dict[str, tuple[str, str, str | None]]:
    """{name: (data-status, shown status, shown error)} of every server row, read in one script."""
    rows = page.driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=mcp-server]')].map(li => [li.dataset.name,"
        " li.dataset.status, li.querySelector('[data-testid=mcp-server-status]').textContent,"
        " (li.querySelector('[data-testid=mcp-server-error]') || {}).textContent || null])")
    return {name: (status, shown, error) for name, status, shown, error in rows}


def test_the_mcp_panel_shows_a_ready_server_with_its_tools_and_a_failed_one_with_its_error(page: Page,
                                                                                         tmp_path: Path):
    marks = tmp_path / "marks"
    marks.mkdir()
    with page.server.client() as http:
        added = http.post("/v1/mcp/servers", json={
            "name": "box", "command": sys.executable, "args": [str(TOOLBOX)],
            "env": {"TOOLBOX_MARKS": str(marks)}, "approval": "writes"})
        assert added.status_code == 201 and added.json()["status"] == "ready", added.text
        broken = http.post("/v1/mcp/servers", json={"name": "broken", "command": MISSING})
        assert broken.status_code == 201 and broken.json()["status"] == "failed", broken.text
        error = broken.json()["error"]
        assert MISSING in error
        expected_tools = sorted(t["name"] for t in http.get("/v1/mcp/tools").json()["tools"])
    assert len(expected_tools) == 9 and "box__echo" in expected_tools and "box__peek" in expected_tools

    page.driver.find_element(By.ID, "runtime-tab").click()
    page.visible("mcp-servers")
    page.wait(lambda d: len(panel(page)) == 2, "the MCP panel never listed the two servers")
    assert panel(page) == {"box": ("ready", "ready", None), "broken": ("failed", "failed", error)}
    # The tools under the names the model sees, each with the server it belongs to.
    assert sorted(page.attrs("mcp-tool", "name")) == expected_tools
    assert set(page.attrs("mcp-tool", "server")) == {"box"}
    peek = page.driver.find_element(By.CSS_SELECTOR, '[data-testid=mcp-tool][data-name=box__peek]')
    assert peek.find_element(By.TAG_NAME, "code").text == "box__peek"
    assert peek.find_element(By.TAG_NAME, "small").text == "read-only · Reads nothing, changes nothing."
    page.screenshot("mcp-panel")

    # Reconnect restarts the server's process (a new child of the runtime), and the panel shows it ready again.
    pid = page.server.process.pid
    (before,) = children_of(pid)
    box = page.driver.find_element(By.CSS_SELECTOR, '[data-testid=mcp-server][data-name=box]')
    page.hook("mcp-reconnect", within=box).click()
    # The click disabled the button at once; the re-rendered row has a new, enabled one.
    page.wait(lambda d: before not in children_of(pid) and len(children_of(pid)) == 1,
              "reconnect never restarted the server")
    page.wait(lambda d: d.execute_script(
        "const b = document.querySelector('[data-testid=mcp-server][data-name=box] [data-testid=mcp-reconnect]');"
        " return !!b && !b.disabled"), "the panel never showed the reconnected server")
    assert not alive(before)
    assert panel(page) == {"box": ("ready", "ready", None), "broken": ("failed", "failed", error)}
    assert page.driver.find_element(By.ID, "notice").text == ""
    page.screenshot("mcp-panel-after-reconnect")
