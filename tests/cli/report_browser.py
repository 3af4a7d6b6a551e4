"""A headless Chromium driven over the DevTools protocol, stdlib only, for the report tests.

Chromium is started once with ``--remote-debugging-pipe``: commands go in on its fd 3 and
answers come out on its fd 4, as NUL-terminated JSON. No websocket, no port, no download (pip's
``playwright`` would fetch its own browser). Every wait is bounded by a timeout.

    with Browser() as b:
        page = b.open("file:///tmp/nan.html")
        page.errors          # console errors, uncaught exceptions, failed loads
        page.eval("document.title")
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-sync",
    "--disable-component-update",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or ``NANSCOPE_CHROMIUM``), None when it is not installed."""
    env = os.environ.get("NANSCOPE_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, executable: str | None = None, *, timeout: float = 30.0) -> None:
        exe = executable or find_chromium()
        if exe is None:
            raise BrowserError("chromium is not installed (apt-get install -y chromium)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="nanscope-chromium-")
        self.log_path = Path(self.profile) / "chromium.log"
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Move both ends above the low fds first, so the dup2 onto 3 and 4 cannot clobber one another.
        hi_r, hi_w = (
            fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 20),
            fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 20),
        )
        os.close(to_child_r)
        os.close(from_child_w)

        def child_fds() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        try:
            self.proc = subprocess.Popen(
                [exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                preexec_fn=child_fds,
                pass_fds=(3, 4),
                start_new_session=True,
            )
        finally:
            os.close(hi_r)
            os.close(hi_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._events: list[dict] = []
        self._inbox: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.version = self.call("Browser.getVersion")["product"]

    # -- protocol ----------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._inbox.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._inbox.put(json.loads(msg))

    def _pump(self, deadline: float) -> bool:
        """Take one message from chromium (False when the deadline passed)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            msg = self._inbox.get(timeout=left)
        except queue.Empty:
            return False
        if msg is None:
            raise BrowserError(f"chromium exited (see {self.log_path})")
        if "id" in msg:
            self._answers[msg["id"]] = msg
        else:
            self._events.append(msg)
        return True

    def call(
        self,
        method: str,
        params: dict | None = None,
        *,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict:
        self._next_id += 1
        ident = self._next_id
        msg: dict = {"id": ident, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while ident not in self._answers:
            if not self._pump(deadline):
                raise BrowserError(f"no answer to {method} within {timeout or self.timeout} s")
        answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def wait_event(
        self, method: str, *, session: str | None = None, timeout: float | None = None
    ) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for ev in self._events[seen:]:
                if ev.get("method") == method and (
                    session is None or ev.get("sessionId") == session
                ):
                    return ev
            seen = len(self._events)
            if not self._pump(deadline):
                raise BrowserError(f"no {method} within {timeout or self.timeout} s")

    def events(self, session: str) -> list[dict]:
        return [e for e in self._events if e.get("sessionId") == session]

    # -- pages -------------------------------------------------------------------------------
    def open(self, url: str, *, width: int = 1200, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method, session=session)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        start = len(self._events)
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + self.timeout
        while not any(
            e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
            for e in self._events[start:]
        ):
            if not self._pump(deadline):
                raise BrowserError(f"{url} did not finish loading within {self.timeout} s")
        page = Page(self, target, session)
        page.eval(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))",
            await_promise=True,
        )
        return page

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except BrowserError:
                    pass
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session

    def eval(self, expression: str, *, await_promise: bool = False):
        r = self.browser.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": await_promise},
            session=self.session,
        )
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression[:60]!r} threw: {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    @property
    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen on this page so far."""
        self.eval("0")  # let pending events arrive
        out = []
        for e in self.browser.events(self.session):
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(
                    "console."
                    + p["type"]
                    + ": "
                    + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))
                )
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(
                    "exception: " + str(d.get("exception", {}).get("description") or d.get("text"))
                )
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append("log: " + p["entry"].get("text", ""))
        return out

    def screenshot(self, *, full: bool = False, max_height: int = 2400) -> bytes:
        params: dict = {"format": "png"}
        if full:
            size = self.browser.call("Page.getLayoutMetrics", session=self.session)[
                "cssContentSize"
            ]
            params.update(
                captureBeyondViewport=True,
                clip={
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": min(size["height"], max_height),
                    "scale": 1,
                },
            )
        return base64.b64decode(
            self.browser.call("Page.captureScreenshot", params, session=self.session)["data"]
        )

    def close(self) -> None:
        try:
            self.browser.call("Target.closeTarget", {"targetId": self.target}, timeout=5)
        except BrowserError:
            pass
