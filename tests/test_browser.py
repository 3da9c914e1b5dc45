"""The report in a real browser: headless Chromium driven by Debian's chromedriver through
Selenium (WebDriver, the W3C protocol that the browser's makers keep working). No console
errors, plotly's SVG rendered, a click on a front point shows that trial, and a screenshot is
saved under the test's temporary directory.

Nothing here waits a fixed time or decides by a short timeout: chromedriver starts Chromium and
waits for its DevTools endpoint itself, ``driver.get`` returns after the page's load event,
and each later check polls a DOM condition that the page's script sets, bounded only by
``DEADLINE`` (a stuck browser fails in minutes; a slow one passes).
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from test_dashboard import hand_made

from autoprune.report.page import write_report

try:
    from selenium import webdriver
    from selenium.webdriver.chromium.remote_connection import ChromiumRemoteConnection
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.remote.client_config import ClientConfig
    from selenium.webdriver.remote.command import Command
    from selenium.webdriver.support.wait import WebDriverWait
except ImportError:  # the test extra brings it; without it the tests skip, saying so
    webdriver = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# The one bound on any wait, start-up included: generous, so that only a stuck browser hits it.
DEADLINE = 300


def _missing() -> str | None:
    if webdriver is None:
        return "selenium is not installed (it is in the test extra: pip install -e '.[test]')"
    if CHROMIUM is None:
        return (
            "headless Chromium is not installed (Debian: apt-get install chromium "
            "chromium-driver; .ci/run installs them when it runs as root or with passwordless "
            "sudo)"
        )
    if CHROMEDRIVER is None:
        return (
            "chromedriver is not installed (Debian: apt-get install chromium-driver; .ci/run "
            "installs it when it runs as root or with passwordless sudo)"
        )
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_missing() is not None, reason=_missing() or ""),
]


def listening(process: subprocess.Popen[str]) -> str:
    """chromedriver's URL, once it says it listens (``--port=0``: it picks a free port, so no
    other process can take the port between choosing and binding it).

    A thread reads its stdout line by line (and keeps draining it): ``select`` on a buffered
    stream would miss a line that came in the same read as the one before it.
    """
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")  # end of output: chromedriver exited

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise TimeoutError(f"chromedriver did not listen within {DEADLINE} s") from None
        if not line:
            raise RuntimeError(f"chromedriver exited ({process.wait()}) before listening")
        found = re.search(r"started successfully on port (\d+)", line)
        if found:
            return f"http://127.0.0.1:{found[1]}"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1400,2000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    # Console messages, uncaught exceptions and the browser's own errors, read by errors().
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromedriver waits for Chromium's DevTools endpoint to answer; 60 s by default.
    options.add_experimental_option("browserStartupTimeout", DEADLINE * 1000)
    # Debian's chromedriver, started here (never Selenium Manager, which looks online).
    service = subprocess.Popen(
        [str(CHROMEDRIVER), "--port=0", f"--log-path={tmp_path / 'chromedriver.log'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = listening(service)
        connection = ChromiumRemoteConnection(
            remote_server_addr=url,
            browser_name="chrome",
            vendor_prefix="goog",
            keep_alive=True,
            ignore_proxy=True,
            client_config=ClientConfig(url, timeout=DEADLINE),  # Selenium's own is 120 s
        )
        driver = webdriver.Remote(command_executor=connection, options=options)
        try:
            driver.set_page_load_timeout(DEADLINE)
            driver.set_script_timeout(DEADLINE)
            yield driver
        finally:
            driver.quit()
    finally:
        service.kill()
        service.wait()


def until(driver: Any, condition: Callable[[Any], Any]) -> Any:
    """Poll ``condition(driver)`` until it is truthy; its value (``DEADLINE`` bounds it)."""
    return WebDriverWait(driver, DEADLINE, poll_frequency=0.05).until(condition)


def js(expression: str) -> Callable[[Any], Any]:
    """A condition for ``until``: the value of a JavaScript expression in the page."""
    return lambda driver: driver.execute_script(f"return {expression};")


def errors(driver: Any) -> list[str]:
    """Console errors, uncaught exceptions and failed loads since the last call."""
    entries = driver.execute(Command.GET_LOG, {"type": "browser"})["value"]
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


def point_center(driver: Any, trace: int, index: int) -> tuple[int, int]:
    """Viewport coordinates of one marker of the front plot (its SVG path's bounding box)."""
    x, y = driver.execute_script(
        """const trace = document.querySelectorAll('#pareto .scatterlayer .trace')[arguments[0]];
        const r = trace.querySelectorAll('.points path')[arguments[1]].getBoundingClientRect();
        return [r.x + r.width / 2, r.y + r.height / 2];""",
        trace,
        index,
    )
    return round(x), round(y)


def test_report_renders_and_clicks_in_chromium(browser: Any, tmp_path: Path) -> None:
    study: optuna.Study = hand_made()
    page = write_report(study, tmp_path / "report.html")
    browser.get(page.as_uri())  # returns after the load event
    # The page's load handler shows the first trial once plotly has drawn.
    assert until(browser, js("document.getElementById('detail').dataset.shown")) == "hand/0"
    # Each of the 6 figures and the 2 detail plots draw two SVG layers.
    assert browser.execute_script("return document.querySelectorAll('svg.main-svg').length") >= 16
    assert browser.execute_script(
        "return document.querySelectorAll('#detail-sparsity .bars path').length"
    )

    # A real mouse click on a front point: trial 3, the most accurate (last in x order).
    front = browser.execute_script("return document.getElementById('pareto').data[1].customdata")
    x, y = point_center(browser, 1, front.index("hand/3"))
    mouse = ActionBuilder(browser)
    mouse.pointer_action.move_to_location(x, y).click()
    mouse.perform()
    until(browser, js("document.getElementById('detail').dataset.shown === 'hand/3'"))
    title = "return document.getElementById('detail-title').textContent"
    assert browser.execute_script(title) == "hand: trial 3"
    assert browser.execute_script("return location.hash") == "#hand%2F3"

    assert browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors(browser) == []


def test_empty_report_has_no_errors(browser: Any, tmp_path: Path) -> None:
    empty = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    page = write_report(empty, tmp_path / "empty.html")
    browser.get(page.as_uri())
    assert until(browser, js("document.querySelectorAll('svg.main-svg').length >= 12"))
    title = "return document.getElementById('detail-title').textContent"
    assert browser.execute_script(title) == "click a point"
    assert errors(browser) == []


def test_errors_are_caught(browser: Any, tmp_path: Path) -> None:
    """The check above can fail: an exception and a console error are both seen."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<script>console.error('bad')</script><script>throw new Error('boom')</script>"
    )
    browser.get(page.as_uri())
    found = errors(browser)
    assert len(found) == 2 and "bad" in found[0] and "boom" in found[1]


def test_listening_sees_a_banner_that_comes_in_one_write() -> None:
    """chromedriver's four start-up lines can reach a slow reader in one read (this was lost
    under load, and the fixture waited out its deadline)."""
    banner = (
        "Starting ChromeDriver\nOnly local connections\nPlease see\n"
        "ChromeDriver was started successfully on port 1234.\n"
    )
    # One write, then silence until killed: only the buffered line can answer.
    script = f"import sys; sys.stdout.write({banner!r}); sys.stdout.flush(); sys.stdin.read()"
    fake = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert listening(fake) == "http://127.0.0.1:1234"
    finally:
        fake.kill()
        fake.wait()
