"""`diffswarm dashboard --web` in a real headless browser (Debian's chromium driven by playwright): the page
loads, the swarm table shows the expert of a live in-process peer, and a generation renders.

What the browser shows is read from the page's own terminal emulator (xterm.js's screen buffer, reached through a
hook on its ``terminal`` property), not from what the server sent; screenshots are written under the test's tmp
dir. Without a browser (or playwright) the test skips and says so: scripts/setup.sh installs chromium as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffswarm.tui.model import UPPER_HALF
from diffswarm.tui.web import dashboard_command

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# keeps the page's xterm.js Terminal on window.__term: textual-serve's page assigns it to ``this.terminal``
TERMINAL_HOOK = """
Object.defineProperty(Object.prototype, "terminal", {
  configurable: true,
  get() { return undefined; },
  set(v) {
    Object.defineProperty(this, "terminal", {value: v, writable: true, configurable: true, enumerable: true});
    if (v && v.buffer && v.buffer.active && !window.__term) window.__term = v;
  },
});
"""
SCREEN_TEXT = """() => {
  const t = window.__term;
  if (!t) return "";
  const b = t.buffer.active, out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n");
}"""


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard --web exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise AssertionError(f"dashboard --web did not listen on port {port} within {timeout:.0f} s:\n{log.read_text()}")


def session_processes(sid: int) -> list[str]:
    """Live processes of session ``sid`` (the server and whatever it started), as 'pid command' lines."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(sid)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[1][0] != "Z"]


def wait_for_screen(page, want, timeout: float, what: str) -> str:
    """The terminal's text once ``want(text)`` holds (polled); fails with the last screen after ``timeout``."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        text = page.evaluate(SCREEN_TEXT)
        if want(text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"the browser never showed {what}; its screen:\n{text}")


def test_web_command_drops_only_the_web_options():
    cmd = dashboard_command(["dashboard", "--web", "--port", "9000", "--host=0.0.0.0", "--initial-peers", "/ip4/x",
                             "--out", "my dir"])
    assert cmd.endswith("-m diffswarm dashboard --initial-peers /ip4/x --out 'my dir'")
    assert cmd.startswith(f"exec {sys.executable} ")


def test_dashboard_in_a_browser(tmp_path):
    browser_path = find_browser()
    if browser_path is None:
        pytest.skip("no chromium on this machine (scripts/setup.sh installs Debian's chromium when run as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    from peer_harness import InprocPeer

    peer = InprocPeer(tmp_path / "swarm", router=True)
    proc = None
    log = tmp_path / "web.log"
    try:
        port = free_port()
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "diffswarm", "dashboard", "--web", "--port", str(port),
               "--initial-peers", *peer.peer.maddrs, "--swarm", str(peer.peer.swarm), "--loopback", "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                    start_new_session=True)
        wait_for_port(port, proc, log)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.add_init_script(TERMINAL_HOOK)
                # the page links a web font; nothing leaves this machine
                page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
                page.goto(base + "/")
                screen = wait_for_screen(page, lambda s: "c0-fm" in s and "online" in s, 120,
                                         "the peer's expert online in the swarm table")
                assert "peers online: 1" in screen and "experts covered: 1/1" in screen
                page.screenshot(path=str(tmp_path / "swarm.png"))
                page.evaluate("() => window.__term.focus()")
                page.keyboard.press("g")
                screen = wait_for_screen(page, lambda s: "done in" in s, 120, "a finished generation")
                page.screenshot(path=str(tmp_path / "generated.png"))
            finally:
                browser.close()
        proc.send_signal(signal.SIGTERM)  # the server alone: it stops the tabs' dashboards, they their daemons
        assert proc.wait(90) == 0, log.read_text()
        deadline = time.monotonic() + 90  # a bound on a hang: a loaded machine takes its time to shut down
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not session_processes(proc.pid), "dashboard --web left processes behind"
        assert UPPER_HALF * 8 in screen  # the images panel: half-block pixels
        pngs = list(out.glob("dashboard-*.png"))
        assert len(pngs) == 1 and "saved" in screen
        assert (tmp_path / "swarm.png").stat().st_size > 10_000 and (tmp_path / "generated.png").exists()
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        peer.stop()
