"""The dashboard app: composes the widgets, polls the source and generates in thread workers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.widgets import Footer, Header, ProgressBar

from .model import ExpertRow, GenRequest, halfblock, routing_strip, summarize, swarm_rows, tile
from .source import Snapshot
from .widgets import GeneratePanel, ImageView, RoutingLog, SummaryBar, SwarmTable

HELP = ("q quit | g generate (or Enter in a field) | r refresh now | ? this help. The table lists every expert "
        "the swarm announces; peers that vanish stay listed as offline.")


class DashboardApp(App):
    CSS_PATH = "dashboard.tcss"
    TITLE = "diffswarm"
    BINDINGS: ClassVar = [("q", "quit", "Quit"), ("g", "generate", "Generate"), ("r", "refresh", "Refresh"),
                ("question_mark", "help", "Help")]

    def __init__(self, source, out_dir: str | Path = "runs/dashboard", poll_seconds: float = 2.0):
        super().__init__()
        self.source, self.out_dir, self.poll_seconds = source, Path(out_dir), poll_seconds
        self.rows: tuple[ExpertRow, ...] = ()
        self.snapshot: Snapshot | None = None
        self.last_png: Path | None = None
        self._last_error = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield SummaryBar()
        yield SwarmTable()
        panel = GeneratePanel()
        panel.border_title = "generate"
        yield panel
        with Horizontal(id="output"):
            yield RoutingLog(markup=False, wrap=False, max_lines=500)
            yield ImageView()
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(SwarmTable).focus()
        self.action_refresh()
        self.set_interval(self.poll_seconds, self.action_refresh)

    def on_unmount(self) -> None:
        self.source.close()

    # -- polling -------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        self.poll()

    @work(thread=True, exclusive=True, group="poll")
    def poll(self) -> None:
        try:
            snap = self.source.snapshot()
        except Exception as e:  # noqa: BLE001 - unreachable bootstrap, no router...: show it, keep polling
            self.call_from_thread(self.show_error, f"swarm: {e}")
            return
        self.call_from_thread(self.show_snapshot, snap)

    def show_snapshot(self, snap: Snapshot) -> None:
        self._last_error = ""
        self.snapshot = snap
        self.rows = tuple(swarm_rows(snap.records, snap.latency, snap.now, self.rows))
        self.query_one(SwarmTable).expert_rows = self.rows
        summary = summarize(self.rows, snap.num_clusters)
        self.query_one(SummaryBar).text = summary.line() if self.rows else "the swarm announces no experts yet"

    def show_error(self, msg: str) -> None:
        if msg != self._last_error:  # once per distinct error, not every poll
            self._last_error = msg
            self.notify(msg, severity="error", timeout=8)
        self.query_one(SummaryBar).text = msg

    # -- generation ----------------------------------------------------------------------------

    def action_generate(self) -> None:
        self.query_one(GeneratePanel).submit()

    def action_help(self) -> None:
        self.notify(HELP, title="help", timeout=10)

    def on_generate_panel_invalid(self, msg: GeneratePanel.Invalid) -> None:
        self.notify(msg.error, severity="error")

    def on_generate_panel_requested(self, msg: GeneratePanel.Requested) -> None:
        self.query_one(RoutingLog).clear()
        self.query_one(ProgressBar).update(total=msg.request.steps, progress=0)
        self.generate(msg.request)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, req: GenRequest) -> None:
        from ..images import save_grid

        def on_step(info) -> None:
            strip, events = routing_strip(info), list(info.events)
            self.call_from_thread(self.show_step, info.step + 1, info.num_steps, strip, events)

        try:
            x = self.source.generate(req, callback=on_step)
            nrow = min(req.n, 8)
            path = save_grid(x, self.out_dir / f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}-s{req.seed}.png", nrow)
            lines = tuple(halfblock(tile(x, nrow)))
        except Exception as e:  # noqa: BLE001 - the UI reports any failure instead of crashing
            self.call_from_thread(self.notify, f"generation failed: {e}", severity="error", timeout=10)
            return
        self.call_from_thread(self.show_images, lines, path)

    def show_step(self, done: int, total: int, strip, events: list[str]) -> None:
        self.query_one(ProgressBar).update(total=total, progress=done)
        log = self.query_one(RoutingLog)
        log.write(strip)
        for e in events:
            log.write(f"  ! {e}")

    def show_images(self, lines: tuple, path: Path) -> None:
        self.last_png = path
        view = self.query_one(ImageView)
        view.lines, view.path = lines, str(path)
        self.notify(f"saved {path}")


def make_app(initial_peers=None, run_dir: str | Path | None = None, source=None, out_dir: str | Path | None = None,
             config=None, device="cpu", poll_seconds: float = 2.0) -> DashboardApp:
    """The dashboard, for the CLI and the tests. ``source``: an injected data source (``FakeSource``);
    otherwise the live swarm at ``initial_peers`` or, without them, the local swarm of ``run_dir``
    (`diffswarm swarm up`, default runs/swarm)."""
    if source is None:
        from ..client.client import ClientConfig
        from ..dht.node import NetworkConfig
        from .source import LiveSource

        if not initial_peers:
            from ..peer.launch import LocalSwarm

            rd = run_dir or "runs/swarm"
            try:
                sw = LocalSwarm.load(rd)
            except FileNotFoundError:
                raise ValueError(f"no --initial-peers given and no local swarm in {rd}; start one with "
                                 "`diffswarm swarm up` or pass the multiaddr a peer printed") from None
            initial_peers = sw.initial_peers
            config = config or ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True),
                                            connect_timeout=20.0)
        from dataclasses import replace

        config = replace(config or ClientConfig(), refresh=min((config or ClientConfig()).refresh, poll_seconds))
        source = LiveSource(initial_peers, config, device)
    return DashboardApp(source, out_dir or "runs/dashboard", poll_seconds)
