"""Fixtures for the dashboard's browser tests: a real ``trio-runtime serve`` subprocess (the arguments of
tests/e2e/process.py's ServerProcess) and a headless Debian Chromium driven by Selenium.

The tests are plain synchronous functions: Selenium blocks, so they do not run inside trio. Every wait is a
WebDriverWait on a condition, bounded by BROWSER_LIMIT; nothing sleeps. One Chromium serves a whole module
(starting it costs seconds on a busy machine); every test gets its own server and data dir, so no state is
shared but the browser's, and each server has its own origin (port), hence its own cookie.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.e2e.process import ServerProcess
from tests.support import E2E_LIMIT

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "browser-token"
# Any one wait for the page (a reply streamed, a reconnect after a restart): generous because up to eight
# helpers share two cores here, and CI is busy too; a wait ends as soon as its condition holds.
BROWSER_LIMIT = 3 * E2E_LIMIT
# How often a wait re-checks its condition: short, so a fast page is not slowed down by the test.
POLL = 0.05
# The desktop size the issue names, as the page's viewport (a window of that size has a smaller viewport).
DESKTOP = {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
# Flags needed on this kind of machine (root in a container, no GPU, no network beyond 127.0.0.1): the
# background services would otherwise try to reach Google and slow the start down.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,800",
)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class Server:
    """``trio-runtime serve`` in a subprocess; ``start`` reads its startup line (the URL), and a thread keeps
    reading the output (kept in ``output``) so that the pipe never fills."""

    def __init__(self, data_dir: Path, *extra: str, port: int = 0, token: str = TOKEN, log_level: str = "warning"
                 ) -> None:
        args = ServerProcess(data_dir, *extra, token=token).args
        self.token = token
        args[args.index("--port") + 1] = str(port)
        args[args.index("--log-level") + 1] = log_level  # debug: an access log line per request, whole URL
        self.args = args
        self.data_dir = data_dir
        self.process: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = port
        self.output: list[str] = []

    def start(self) -> "Server":
        self.output = []
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue[str | None] = queue.Queue()

        def read(stream=self.process.stdout) -> None:
            for line in stream:
                self.output.append(line)
                lines.put(line)
            lines.put(None)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        while True:
            try:
                line = lines.get(timeout=E2E_LIMIT)
            except queue.Empty:
                raise AssertionError(f"no startup line in {E2E_LIMIT} s: {''.join(self.output)}") from None
            if line is None:
                raise AssertionError(f"server exited before listening: {''.join(self.output)}")
            if line.startswith("trio-runtime listening on "):
                self.url = line.split(" on ", 1)[1].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                return self

    def stop(self) -> int:
        """SIGTERM and wait for the exit (kill after E2E_LIMIT) and for the end of its output (all of it is
        in ``output`` then); returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(timeout=E2E_LIMIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not stop within {E2E_LIMIT} s of SIGTERM") from None
        self.reader.join(timeout=E2E_LIMIT)
        assert not self.reader.is_alive(), "the server's output did not end with it"
        return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=E2E_LIMIT)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    paths = chromium_paths()
    if paths is None:
        pytest.skip("chromium and chromedriver are not installed (make browser-tools installs them with apt)")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="trio-runtime-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)
    driver.set_page_load_timeout(BROWSER_LIMIT)
    driver.set_script_timeout(BROWSER_LIMIT)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and every chromium process it started
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    # The access log (debug) lets a test read every URL the page made the server receive.
    running = Server(tmp_path / "data", "--tools", "demo", log_level="debug").start()
    try:
        yield running
    finally:
        running.kill()


@pytest.fixture
def page(browser: webdriver.Chrome, server: Server, request: pytest.FixtureRequest) -> Iterator["Page"]:
    """The browser, signed in to ``server`` through the ``#token=`` link, at desktop size. Leaves a last
    screenshot in screenshots/<test name>/ (also after a failure)."""
    p = Page(browser, server, SCREENSHOTS / re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    p.sign_in()
    try:
        yield p
    finally:
        p.screenshot("last")
        browser.get("about:blank")  # closes the page's event stream before its server goes away


class Page:
    """The dashboard as a test sees it: elements by their data-testid hooks, waits on conditions."""

    def __init__(self, driver: webdriver.Chrome, server: Server, shots: Path) -> None:
        self.driver = driver
        self.server = server
        self.shots = shots
        shutil.rmtree(shots, ignore_errors=True)
        shots.mkdir(parents=True)

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def wait(self, condition, message: str = ""):
        """Waits until ``condition(driver)`` is truthy and returns its value; the message says what failed."""
        return WebDriverWait(self.driver, BROWSER_LIMIT, poll_frequency=POLL).until(condition, message)

    def hook(self, testid: str, within=None):
        return (within or self.driver).find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def hooks(self, testid: str, within=None) -> list:
        return (within or self.driver).find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def attrs(self, testid: str, name: str) -> list[str]:
        """``data-<name>`` of every element with that hook, read in one script (no stale elements while the
        page re-renders a list)."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll(`[data-testid='${arguments[0]}']`)]"
            ".map(e => e.getAttribute(arguments[1]))", testid, f"data-{name}")

    def texts(self, testid: str, selector: str = ":scope") -> list[str]:
        """The text of ``selector`` inside every element with that hook, read in one script."""
        return self.driver.execute_script(
            "return [...document.querySelectorAll(`[data-testid='${arguments[0]}']`)]"
            ".map(e => (e.querySelector(arguments[1]) || {}).textContent)", testid, selector)

    def visible(self, testid: str):
        return self.wait(lambda d: (els := [e for e in self.hooks(testid) if e.is_displayed()]) and els[0],
                         f"{testid} never became visible")

    def text_is(self, testid: str, text: str) -> None:
        self.wait(lambda d: self.hook(testid).text == text,
                  f"{testid} never read {text!r} (last: {self.hook(testid).text!r})")

    def sign_in(self) -> None:
        self.driver.get(f"{self.server.url}/#token={TOKEN}")
        self.visible("thread-list")

    def new_thread(self) -> str:
        """Creates a thread with the button; returns its id once its view is open and its stream is live."""
        before = set(self.attrs("thread-item", "thread-id"))
        self.hook("new-thread").click()
        self.wait(lambda d: set(self.attrs("thread-item", "thread-id")) - before,
                  "the new thread never appeared in the list")
        thread_id = self.wait(lambda d: (t := self.current_thread()) not in before and t, "the new thread never opened")
        self.text_is("connection-status", "live")
        return thread_id

    def current_thread(self) -> str | None:
        """The thread in the address (#/thread/ID), or None."""
        match = re.search(r"#/thread/([A-Za-z0-9_-]+)$", self.driver.current_url)
        return match.group(1) if match else None

    def messages(self) -> list[tuple[str, str, str]]:
        """(role, status, text) of every message in the transcript, in order; reasoning read from the DOM
        (a folded <details> has no visible text)."""
        return [tuple(row) for row in self.driver.execute_script(
            "return [...document.querySelectorAll('[data-testid=transcript] [data-testid=message]')]"
            ".map(m => [m.dataset.role, m.dataset.status,"
            " (m.querySelector('.text, .tool-result') || m).textContent])")]

    def send(self, prompt: str) -> None:
        """Types ``prompt`` (its newlines as Shift+Enter) and presses Enter."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys
        box = self.hook("prompt-input")
        box.click()
        lines = prompt.split("\n")
        for index, line in enumerate(lines):
            box.send_keys(line)
            if index < len(lines) - 1:
                ActionChains(self.driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        assert box.get_attribute("value") == prompt  # Shift+Enter made new lines, sent nothing
        box.send_keys(Keys.ENTER)
        self.wait(lambda d: box.get_attribute("value") == "", "the prompt was never sent")

    def turn_ends(self, status: str = "completed") -> None:
        self.text_is("turn-status", status)
