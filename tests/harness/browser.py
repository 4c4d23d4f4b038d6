"""Debian's Chromium, headless, driven over the Chrome DevTools Protocol.

`Browser.start()` runs `chromium --headless --remote-debugging-port=0` with a throw-away
profile, reads the port from the profile's `DevToolsActivePort`, and talks CDP over the
browser's websocket (`websockets`), with one flattened session per page. A `Page` records
everything the console would show as an error: uncaught exceptions (`Runtime.exceptionThrown`),
`console.error`/`console.assert` (`Runtime.consoleAPICalled`), and the browser's own error
entries (`Log.entryAdded`: failed loads, Content-Security-Policy violations).

    async with Browser.start(run_dir) as browser:
        page = await browser.new_page(1280, 1400)
        await page.goto("http://127.0.0.1:9108/")
        state = await page.evaluate("document.title")
        await page.screenshot(path)
        assert not page.errors
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import websockets

from tests.harness.common import HarnessError, ManagedProcess

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    raise HarnessError("no Chromium found: `apt-get install -y chromium` (.ci/run installs it)")


class CdpError(HarnessError):
    pass


class Browser:
    def __init__(self, proc: ManagedProcess, ws: Any) -> None:
        self._proc = proc
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    async def start(cls, run_dir: Path, timeout_s: float = 60.0) -> Browser:
        profile = run_dir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        argv = [
            chromium_path(), "--headless=new", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check", "--disable-gpu",
            "--disable-extensions", "--disable-background-networking", "--disable-sync", "--mute-audio",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--no-sandbox",  # root in CI: no user namespaces
            "about:blank",
        ]
        proc = ManagedProcess("chromium", argv, run_dir / "chromium.log").start()
        port_file = profile / "DevToolsActivePort"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            text = port_file.read_text() if port_file.exists() else ""
            lines = text.splitlines()
            if len(lines) >= 2:
                break
            if proc.proc is not None and proc.proc.poll() is not None:
                raise HarnessError(f"chromium exited with {proc.proc.returncode}; see {run_dir / 'chromium.log'}")
            if loop.time() > deadline:
                proc.kill()
                raise HarnessError(f"chromium did not open its DevTools port in {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
        url = f"ws://127.0.0.1:{lines[0].strip()}{lines[1].strip()}"
        ws = await websockets.connect(url, max_size=64 * 1024 * 1024, ping_interval=None)
        return cls(proc, ws)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader
        with contextlib.suppress(Exception):
            await self._ws.close()
        if self._proc.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.proc.wait, 10)
        self._proc.kill()

    async def send(self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None,
                   timeout_s: float = 30.0) -> dict[str, Any]:
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self._ws.send(json.dumps(message))
        try:
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(msg_id, None)

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg:
                    future = self._pending.get(msg["id"])
                    if future is not None and not future.done():
                        if "error" in msg:
                            future.set_exception(CdpError(f"CDP error: {msg['error']}"))
                        else:
                            future.set_result(msg.get("result", {}))
                else:
                    page = self._pages.get(msg.get("sessionId", ""))
                    if page is not None:
                        page.on_event(msg["method"], msg.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CdpError("the browser's DevTools connection closed"))

    async def new_page(self, width: int = 1280, height: int = 1400) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Runtime", "Log", "Page"):
            await page.send(f"{domain}.enable")
        await page.send("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return page


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.errors: list[str] = []   # what a person would see as errors in the console
        self.console: list[str] = []  # every console message, for the test's failure output

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = (details.get("exception") or {}).get("description") or details.get("text", "exception")
            self.errors.append(f"uncaught: {text}")
        elif method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {args}")
            if params.get("type") in ("error", "assert"):
                self.errors.append(f"console.{params.get('type')}: {args}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            line = f"{entry.get('source')}/{entry.get('level')}: {entry.get('text')} {entry.get('url', '')}".strip()
            self.console.append(line)
            if entry.get("level") == "error":
                self.errors.append(line)

    async def goto(self, url: str) -> None:
        answer = await self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"navigating to {url}: {answer['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in answer:
            raise CdpError(f"evaluating {expression[:80]!r}: {answer['exceptionDetails'].get('text')}")
        return answer.get("result", {}).get("value")

    async def screenshot(self, path: Path) -> Path:
        # The whole page, however long, and no empty space below it.
        size = await self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        clip = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
        shot = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                          "clip": clip})
        data = base64.b64decode(shot["data"])

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return path
