"""The live page in headless Chromium (Selenium): send a chat message, watch the reply stream in
and the runtime view's phase counts change. Skipped, with the reason, where no Chromium and
chromedriver are installed (Debian: apt-get install chromium chromium-driver)."""

from __future__ import annotations

import shutil
import time

import pytest

from edgellm.serve.process import ServerProcess

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="no chromium/chromedriver binary on PATH "
                                       "(Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(fn, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_live_page_chat_streams_and_phases_change(browser, smollm2_path):
    with ServerProcess(["--model", "smollm2-135m", "--kv-memory", "64MB", "--threads", "2"]) as server:
        browser.get(server.url + "/")
        by_id = browser.find_element
        wait_for(lambda: by_id("id", "model").text == "smollm2-135m", 30, "the runtime view's first refresh")
        assert by_id("id", "phase-inactive").text == "0"
        assert int(by_id("id", "kv-used-n").text) == 0

        maxtok = by_id("id", "maxtok")
        maxtok.clear()
        maxtok.send_keys("24")
        by_id("id", "input").send_keys("Write a short poem about the sea.")
        by_id("id", "send").click()
        reply = wait_for(lambda: browser.find_elements("css selector", ".msg.assistant"), 10, "the reply bubble")[0]
        lengths = set()
        while reply.get_attribute("data-done") != "1":
            lengths.add(len(reply.text))
            time.sleep(0.02)
        text = reply.text
        assert "[error" not in text, text
        assert "prompt tokens" in text and "phase now inactive" in text     # the turn's figures
        assert len(lengths - {0}) >= 2, "the reply did not arrive in pieces"
        # the session finished its turn: the runtime view counts it as inactive, holding KV blocks
        wait_for(lambda: by_id("id", "phase-inactive").text == "1", 5, "phase count inactive = 1")
        assert int(by_id("id", "kv-used-n").text) > 0
        assert int(by_id("id", "generated").text) > 0
        assert server.alive
