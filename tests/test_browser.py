"""The report in a real browser: headless Chromium, driven over the DevTools protocol (a pipe,
no extra package). No console errors, plotly's SVG rendered, a click on a front point shows that
trial, and a screenshot is saved under the test's temporary directory."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from test_dashboard import hand_made

from autoprune.report.page import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run "
        "installs it when it runs as root or with passwordless sudo)",
    ),
]


class Browser:
    """Chromium with ``--remote-debugging-pipe``: JSON commands on fd 3, replies on fd 4."""

    def __init__(self, profile: Path):
        to_browser, self._commands = os.pipe()
        self._replies, from_browser = os.pipe()
        # The child must see them as fds 3 and 4: move ours out of the way first.
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        os.close(to_browser), os.close(from_browser)

        def child_fds() -> None:
            os.dup2(fds[0], 3)
            os.dup2(fds[1], 4)

        self.process = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--window-size=1400,2000",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=child_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in fds:
            os.close(fd)
        self._buffer, self._id, self.events = b"", 0, []
        self.session = ""

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._next(timeout)
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> dict[str, Any]:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._next(timeout)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def _next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        os.close(self._commands), os.close(self._replies)


def errors(events: list[dict[str, Any]]) -> list[str]:
    """Console errors and uncaught exceptions among the page's events."""
    found = []
    for event in events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(details.get("exception", {}).get("description") or details["text"])
        elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] == "error":
            found.append(json.dumps(params["args"])[:300])
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(params["entry"]["text"])
    return found


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    opened = Browser(tmp_path / "profile")
    try:
        target = opened.send("Target.createTarget", url="about:blank")["targetId"]
        opened.session = opened.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            opened.send(f"{domain}.enable")
        yield opened
    finally:
        opened.close()


def point_center(browser: Browser, trace: int, index: int) -> tuple[float, float]:
    """Page coordinates of one marker of the front plot (its SVG path's bounding box)."""
    box = browser.evaluate(
        f"""(() => {{
            const trace = document.querySelectorAll('#pareto .scatterlayer .trace')[{trace}];
            const r = trace.querySelectorAll('.points path')[{index}].getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
    )
    return box[0], box[1]


def test_report_renders_and_clicks_in_chromium(browser: Browser, tmp_path: Path) -> None:
    study: optuna.Study = hand_made()
    page = write_report(study, tmp_path / "report.html")
    browser.send("Page.navigate", url=page.as_uri())
    browser.wait_for("Page.loadEventFired", timeout=60)
    svgs = 0
    for _ in range(50):  # plotly draws right after load; give it a moment on a busy machine
        svgs = browser.evaluate("document.querySelectorAll('svg.main-svg').length")
        if svgs and browser.evaluate("document.getElementById('detail').dataset.shown"):
            break
        time.sleep(0.1)
    # Each of the 6 figures and the 2 detail plots draw two SVG layers.
    assert svgs >= 16
    assert browser.evaluate("document.getElementById('detail').dataset.shown") == "hand/0"
    assert browser.evaluate("document.querySelectorAll('#detail-sparsity .bars path').length") > 0

    # A real mouse click on a front point: trial 3, the most accurate (last in x order).
    front = browser.evaluate("document.getElementById('pareto').data[1].customdata")
    index = front.index("hand/3")
    x, y = point_center(browser, 1, index)
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    for kind in ("mousePressed", "mouseReleased"):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
    shown = None
    for _ in range(50):
        shown = browser.evaluate("document.getElementById('detail').dataset.shown")
        if shown == "hand/3":
            break
        time.sleep(0.1)
    assert shown == "hand/3"
    assert browser.evaluate("document.getElementById('detail-title').textContent") == (
        "hand: trial 3"
    )
    assert browser.evaluate("location.hash") == "#hand%2F3"

    shot = browser.send("Page.captureScreenshot", format="png")["data"]
    (tmp_path / "report.png").write_bytes(base64.b64decode(shot))
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errors(browser.events) == []


def test_empty_report_has_no_errors(browser: Browser, tmp_path: Path) -> None:
    empty = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    page = write_report(empty, tmp_path / "empty.html")
    browser.send("Page.navigate", url=page.as_uri())
    browser.wait_for("Page.loadEventFired", timeout=60)
    assert browser.evaluate("document.querySelectorAll('svg.main-svg').length") >= 12
    assert browser.evaluate("document.getElementById('detail-title').textContent") == (
        "click a point"
    )
    assert errors(browser.events) == []


def test_errors_are_caught(browser: Browser, tmp_path: Path) -> None:
    """The check above can fail: an exception and a console error are both seen."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<script>console.error('bad')</script><script>throw new Error('boom')</script>"
    )
    browser.send("Page.navigate", url=page.as_uri())
    browser.wait_for("Page.loadEventFired", timeout=60)
    found = errors(browser.events)
    assert len(found) == 2 and "bad" in found[0] and "boom" in found[1]
