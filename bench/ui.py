"""Benchmark ui (issue 14): the dashboard's weight and the speed of its thread view, in headless Chromium
(Debian's chromium + chromium-driver, driven by Selenium; ``make browser-tools`` installs them).

ui-a: the first load's bytes on the wire, every file the page fetched (Chromium's navigation and resource
timing: encodedBodySize, gzip as the server sends it to a browser). Target: under 200 KB. Baseline: the
same files unpacked (decodedBodySize).

ui-b: the thread view of a 1,000-turn thread (2,000 messages, stored by bench/datagen.py): from the click
on the thread to the first frame after the transcript is laid out (the page's own ``thread-view``
performance measure, app.js), which includes GET /v1/threads/{id}. Median of a few opens. Target: under
1 s. Baseline: the same for a 10-turn thread.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from bench import datagen
from bench.util import TOKEN, ours, temp_dir

FIRST_LOAD_LIMIT_KB = 200.0  # the numbers
RENDER_LIMIT_MS = 1000.0
TURNS = 1000
SMALL_TURNS = 10
OPENS = 5  # opens per thread; the median is reported
LIMIT_S = 60.0  # any one wait for the page


def _driver(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError("chromium and chromedriver are needed (make browser-tools installs them with apt)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _open_ms(d, thread_id: str) -> float:
    """Clicks the thread in the list and returns the page's ``thread-view`` measure of that open."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d.execute_script("performance.clearMeasures('thread-view')")
    d.find_element(By.CSS_SELECTOR, f'[data-testid="thread-item"][data-thread-id="{thread_id}"] button').click()
    return WebDriverWait(d, LIMIT_S, poll_frequency=0.05).until(lambda d: d.execute_script(
        "const m = performance.getEntriesByName('thread-view').filter(m => m.detail.threadId === arguments[0]);"
        "return m.length ? m[0].duration : null", thread_id))


def bench_ui(sz) -> list:
    from selenium.webdriver.support.ui import WebDriverWait

    from bench.cases import Row

    opens = sz.pick(OPENS, 3)
    with temp_dir("ui") as data, tempfile.TemporaryDirectory(prefix="trio-bench-chromium-") as profile:
        conn = datagen.open_db(data)
        (big,) = datagen.add_threads(conn, 1, turns=TURNS, events_per_thread=1 + TURNS * 6, prefix="thr_big")
        (small,) = datagen.add_threads(conn, 1, turns=SMALL_TURNS, events_per_thread=1 + SMALL_TURNS * 6,
                                       prefix="thr_small")
        conn.close()
        with ours(data) as srv:
            url = f"http://127.0.0.1:{srv.port}"
            d = _driver(Path(profile))
            try:
                d.set_page_load_timeout(LIMIT_S)
                d.get(f"{url}/#token={TOKEN}")
                WebDriverWait(d, LIMIT_S).until(lambda d: d.execute_script(
                    "return document.querySelectorAll('[data-testid=thread-item]').length") == 2)
                # Every file of the first load as Chromium fetched it: the page (navigation entry) and each
                # resource it loaded (the API's fetches and the event stream left out): the bytes on the wire
                # (encodedBodySize: gzip when the server sent it so) and unpacked (decodedBodySize).
                entries = d.execute_script(
                    "return [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')"
                    ".filter(r => !['fetch', 'xmlhttprequest', 'other'].includes(r.initiatorType))]"
                    ".map(r => [r.name, r.encodedBodySize, r.decodedBodySize])")
                names = [name for name, _, _ in entries]
                packed = sum(encoded for _, encoded, _ in entries)
                raw = sum(decoded for _, _, decoded in entries)
                big_ms, small_ms = [], []
                for _ in range(opens):  # alternate, so both see the same machine
                    big_ms.append(_open_ms(d, big))
                    assert d.execute_script("return document.querySelectorAll('section.turn').length") == TURNS
                    small_ms.append(_open_ms(d, small))
                    assert d.execute_script("return document.querySelectorAll('section.turn').length") == SMALL_TURNS
            finally:
                d.quit()
    files = len(names)
    return [
        Row("ui-a", f"dashboard first load, {files} files (bytes on the wire)", "unpacked", raw / 1024,
            packed / 1024, "KB", 1.0, False, generator="chromium", absolute_target=FIRST_LOAD_LIMIT_KB,
            notes=", ".join(n.split("#")[0].rsplit("/", 1)[-1] or "index.html" for n in names)),
        Row("ui-b", f"thread view of a {TURNS:,}-turn thread (click to laid out)", f"{SMALL_TURNS}-turn thread",
            statistics.median(small_ms), statistics.median(big_ms), "ms", 1.0, False, generator="chromium",
            absolute_target=RENDER_LIMIT_MS,
            notes=f"median of {opens}; all {', '.join(f'{m:.0f}' for m in big_ms)} ms"),
    ]
