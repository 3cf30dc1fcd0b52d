"""``python -m tests.browser.readme_screenshot [PATH]``: the README's picture of the thread view
(docs/dashboard.png by default), taken in headless Chromium against a real server, so it shows what the
page really draws. Not a test; rerun it when the page's look changes."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.browser.conftest import CHROMIUM_FLAGS, DESKTOP, Page, Server, chromium_paths


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "docs/dashboard.png").resolve()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        print("chromium and chromedriver are needed (make browser-tools)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp) / "data", "--tools", "demo").start()
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={tmp}/profile")
        driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)
        try:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", DESKTOP)
            page = Page(driver, server, Path(tmp) / "shots")
            page.sign_in()
            page.new_thread()
            title = driver.find_element("id", "thread-title")
            title.send_keys("Trip notes")
            page.send("/think The user wants a packing list; keep it short.\nWhat should I pack for two days?")
            page.turn_ends()
            page.send('/tool write_note {"name": "packing", "text": "socks, charger, book"}')
            page.hook("approval-allow", within=page.visible("approval-card")).click()
            page.turn_ends()
            page.send('/tool write_note {"name": "second", "text": "umbrella"}')
            page.visible("approval-card")
            page.text_is("turn-status", "awaiting_approval")
            driver.save_screenshot(str(target))
        finally:
            driver.quit()
            server.kill()
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
