"""The dashboard app: composes the widgets, polls the source and generates in thread workers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Header, ProgressBar, TabbedContent, TabPane

from .model import (
    ExpertRow,
    GenRequest,
    HistoryEntry,
    LatencyHistory,
    halfblock,
    latest_records,
    routing_strip,
    summarize,
    swarm_rows,
    tile,
)
from .source import Snapshot
from .widgets import (
    ExpertDetail,
    GeneratePanel,
    HelpScreen,
    HistoryTable,
    ImageView,
    RoutingLog,
    SummaryBar,
    SwarmTable,
)


class DashboardApp(App):
    CSS_PATH = "dashboard.tcss"
    TITLE = "diffswarm"
    # priority, and the generate fields (NumberInput) take numbers only and let letters through: these keys work
    # while a field is focused and never type into it
    BINDINGS: ClassVar = [Binding("q", "quit", "Quit", priority=True),
                          Binding("g", "generate", "Generate", priority=True),
                          Binding("r", "refresh", "Refresh", priority=True),
                          Binding("question_mark", "help", "Help", priority=True)]

    def __init__(self, source, out_dir: str | Path = "runs/dashboard", poll_seconds: float = 2.0):
        super().__init__()
        self.source, self.out_dir, self.poll_seconds = source, Path(out_dir), poll_seconds
        self.rows: tuple[ExpertRow, ...] = ()
        self.snapshot: Snapshot | None = None
        self.last_png: Path | None = None
        self.records: dict[str, object] = {}  # row key -> last record seen (kept for vanished peers)
        self.latency_history = LatencyHistory(60)
        self.selected_key: str | None = None
        self.history: tuple[HistoryEntry, ...] = ()
        self._last_error = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield SummaryBar()
        yield SwarmTable()
        panel = GeneratePanel()
        panel.border_title = "generate"
        yield panel
        with Horizontal(id="output"):
            with TabbedContent(id="tabs"):
                with TabPane("routing", id="tab-routing"):
                    yield RoutingLog(markup=False, wrap=False, max_lines=500)
                with TabPane("history", id="tab-history"):
                    yield HistoryTable()
            detail = ExpertDetail()
            detail.border_title = "expert"
            yield detail
            yield ImageView()
        yield Footer()

    def _q(self, selector):
        """A dashboard widget, also while the help screen is on top (``query_one`` searches the top screen)."""
        return self.screen_stack[0].query_one(selector)

    def on_mount(self) -> None:
        self._q(SwarmTable).focus()
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
        self.records = latest_records(snap.records, self.records)
        self.latency_history.add(snap.latency)
        self._q(SwarmTable).expert_rows = self.rows
        self.show_detail()
        summary = summarize(self.rows, snap.num_clusters)
        self._q(SummaryBar).text = summary.line() if self.rows else "the swarm announces no experts yet"

    def show_error(self, msg: str) -> None:
        if msg != self._last_error:  # once per distinct error, not every poll
            self._last_error = msg
            self.notify(msg, severity="error", timeout=8)
        self._q(SummaryBar).text = msg

    # -- expert detail -------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if isinstance(event.data_table, SwarmTable) and event.row_key.value is not None:
            self.selected_key = event.row_key.value
            self.show_detail()

    def show_detail(self) -> None:
        key = self.selected_key
        if key is None and self.rows:
            key = self.rows[0].key
        row = next((r for r in self.rows if r.key == key), None)
        detail = self._q(ExpertDetail)
        detail.record = self.records.get(key) if key else None
        detail.state = row.state if row else None
        detail.latency = self.latency_history.get(key.split("/", 1)[0]) if key else ()

    # -- help ----------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # the help screen is modal: its keys do not reach the dashboard behind it
        return not (isinstance(self.screen, HelpScreen) and action in ("generate", "refresh"))

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
        else:
            self.push_screen(HelpScreen())

    # -- generation ----------------------------------------------------------------------------

    def action_generate(self) -> None:
        self._q(GeneratePanel).submit()

    def on_generate_panel_invalid(self, msg: GeneratePanel.Invalid) -> None:
        self.notify(msg.error, severity="error")

    def on_generate_panel_requested(self, msg: GeneratePanel.Requested) -> None:
        self._q(RoutingLog).clear()
        self._q(ProgressBar).update(total=msg.request.steps, progress=0)
        self.generate(msg.request)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, req: GenRequest) -> None:
        from ..images import save_grid

        def on_step(info) -> None:
            strip, events = routing_strip(info), list(info.events)
            self.call_from_thread(self.show_step, info.step + 1, info.num_steps, strip, events)

        t0 = time.perf_counter()
        try:
            x = self.source.generate(req, callback=on_step)
            nrow = min(req.n, 8)
            path = save_grid(x, self.out_dir / f"dashboard-{time.strftime('%Y%m%d-%H%M%S')}-{len(self.history) + 1:03d}-s{req.seed}.png", nrow)
            lines = tuple(halfblock(tile(x, nrow)))
        except Exception as e:  # noqa: BLE001 - the UI reports any failure instead of crashing
            self.call_from_thread(self.notify, f"generation failed: {e}", severity="error", timeout=10)
            return
        self.call_from_thread(self.show_images, lines, path, req, time.perf_counter() - t0)

    def show_step(self, done: int, total: int, strip, events: list[str]) -> None:
        self._q(ProgressBar).update(total=total, progress=done)
        log = self._q(RoutingLog)
        log.write(strip)
        for e in events:
            log.write(f"  ! {e}")

    def show_images(self, lines: tuple, path: Path, req: GenRequest | None = None, wall_s: float = 0.0) -> None:
        self.last_png = path
        if req is not None:
            self.history += (HistoryEntry(len(self.history) + 1, req, wall_s, str(path)),)
            self._q(HistoryTable).entries = self.history
        view = self._q(ImageView)
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

            sw = LocalSwarm.find(run_dir or "runs/swarm")
            initial_peers = sw.initial_peers
            config = config or ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True),
                                            connect_timeout=20.0)
        from dataclasses import replace

        config = replace(config or ClientConfig(), refresh=min((config or ClientConfig()).refresh, poll_seconds))
        source = LiveSource(initial_peers, config, device)
    return DashboardApp(source, out_dir or "runs/dashboard", poll_seconds)
