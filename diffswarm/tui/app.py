"""The dashboard app: composes the widgets, polls the source and generates in thread workers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, TabbedContent, TabPane

from diffswarm.client.contributors import contributors
from diffswarm.tui.generation import GenerationEnded, GenerationFinished, GenerationSteps, run_generation
from diffswarm.tui.model import (
    ExpertRow,
    GenRequest,
    HistoryEntry,
    PeerHistory,
    class_hint,
    latest_records,
    peer_throughput,
    routing_legend,
    summarize,
    swarm_rows,
)
from diffswarm.tui.source import Snapshot
from diffswarm.tui.widgets import (
    ContributorsTable,
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
                          Binding("x", "cancel", "Cancel", priority=True),
                          Binding("r", "refresh", "Refresh", priority=True),
                          Binding("question_mark", "help", "Help", priority=True)]

    def __init__(self, source, out_dir: str | Path = "runs/dashboard", poll_seconds: float = 2.0):
        super().__init__()
        self.source, self.out_dir, self.poll_seconds = source, Path(out_dir), poll_seconds
        self.rows: tuple[ExpertRow, ...] = ()
        self.snapshot: Snapshot | None = None
        self.last_png: Path | None = None
        self.records: dict[str, object] = {}  # row key -> last record seen (kept for vanished peers)
        self.latency_history = PeerHistory(60, scale=1000.0)  # ms
        self.throughput_history = PeerHistory(60)  # rows/s the peer announces
        self.selected_key: str | None = None
        self.history: tuple[HistoryEntry, ...] = ()
        self._last_error = ""
        self._polling = False  # a poll worker is running
        self.clock = time.perf_counter  # wall time of generations (tests make it deterministic)
        self.generating: GenRequest | None = None  # the request being generated
        self._gen_idle = threading.Event()  # set while no generation thread runs (quit waits for it)
        self._gen_idle.set()
        self._quitting = False  # exit() was called or the app unmounted: workers stop touching widgets
        self.stopped_by: int | None = None  # the signal (SIGHUP, SIGTERM, SIGINT) that asked the app to exit
        self.signal_handlers: dict = {}  # signal -> the Python handler before the app's loop took it

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
                    yield Label("", id="routing-legend")
                    yield RoutingLog(markup=False, wrap=False, max_lines=2000)
                with TabPane("expert", id="tab-expert"):
                    yield ExpertDetail()
                with TabPane("history", id="tab-history"):
                    yield HistoryTable()
                with TabPane("contributors", id="tab-contributors"):
                    yield Label("", id="contributors-clusters")
                    yield ContributorsTable()
            images = ImageView()
            images.border_title = "images"
            yield images
        yield Footer()

    def _q(self, selector, expect_type=None):
        """A dashboard widget, also while the help screen is on top (``query_one`` searches the top screen)."""
        return self.screen_stack[0].query_one(selector, expect_type)

    def on_mount(self) -> None:
        self._exit_on_signals()
        self._q(SwarmTable).focus()
        self.action_refresh()
        self.set_interval(self.poll_seconds, self.action_refresh)

    def _exit_on_signals(self) -> None:
        """SIGHUP (its terminal closed), SIGTERM and SIGINT exit the app the way a quit does, on its own loop: the
        command-wide handler (``utils.signals.stop_on_signals``) raises wherever the main thread is, and an app
        interrupted outside its own shutdown leaves its terminal threads and workers waiting forever (the process
        never exits). The command then reports the signal (``stopped_by``)."""
        import asyncio
        import signal

        from diffswarm.utils.signals import STOP_SIGNALS

        if threading.current_thread() is not threading.main_thread():
            return  # a test's pilot: no signals here
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._signalled, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # no signals on this loop
                return
            self.signal_handlers[sig] = previous  # the loop resets it when it closes: restore_signal_handlers()

    def restore_signal_handlers(self) -> None:
        """The handlers from before the app ran (after ``run()``: a closed loop leaves the default ones)."""
        import signal

        for sig, handler in self.signal_handlers.items():
            signal.signal(sig, handler)
        self.signal_handlers.clear()

    def _signalled(self, signum: int) -> None:
        if self.stopped_by is None:
            self.stopped_by = signum
            self.exit()

    def on_unmount(self) -> None:
        self._quitting = True
        # quit during a generation: the worker was cancelled and stops at its next step; wait for it
        # (bounded) so the source is not closed under a running RPC
        self._gen_idle.wait(timeout=15)
        self.source.close()

    # -- polling -------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        if not self._polling:  # a slow poll (joining the swarm, an unreachable bootstrap) is not stacked up
            self._polling = True
            self.poll()

    @work(thread=True, group="poll")
    def poll(self) -> None:
        try:
            snap = self.source.snapshot()
        except Exception as e:  # noqa: BLE001 - unreachable bootstrap, no router...: show it, keep polling
            self._ui(self.show_error, f"swarm: {e}")
            return
        finally:
            self._polling = False
        self._ui(self.show_snapshot, snap)

    def show_snapshot(self, snap: Snapshot) -> None:
        self._last_error = ""
        self.snapshot = snap
        self.rows = tuple(swarm_rows(snap.records, snap.latency, snap.now, self.rows, snap.health))
        self.records = latest_records(snap.records, self.records)
        self.latency_history.add(snap.latency)
        self.throughput_history.add(peer_throughput(snap.records))
        self._q(SwarmTable).expert_rows = self.rows
        self.show_contributors(snap.records)
        self.show_detail()
        summary = summarize(self.rows, snap.num_clusters)
        bar = self._q(SummaryBar)
        bar.text = summary.line() if self.rows else "the swarm announces no experts yet"
        bar.alert, bar.note = not self.rows, snap.note
        self._q(GeneratePanel).num_classes = snap.num_classes
        if snap.num_clusters:
            self._q("#gen-hint", Label).update(class_hint(snap.dataset_id, snap.num_classes), layout=False)

    def show_contributors(self, records) -> None:
        by_peer, by_cluster = contributors(records)
        self._q(ContributorsTable).peers = tuple(by_peer)
        text = "claims, not checked.  " + "   ".join(
            f"cluster {'-' if c.cluster is None else c.cluster}: {c.online} online, {c.rows} rows, {c.images} images"
            for c in by_cluster)
        self._q("#contributors-clusters", Label).update(text, layout=False)

    def show_error(self, msg: str) -> None:
        if msg != self._last_error:  # once per distinct error, not every poll
            self._last_error = msg
            self.notify(msg, severity="error", timeout=8)
        bar = self._q(SummaryBar)
        bar.text, bar.alert = msg, True

    # -- expert detail -------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if isinstance(event.data_table, SwarmTable) and event.row_key.value is not None:
            self.selected_key = event.row_key.value
            self.show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, SwarmTable):  # enter / click on a row: show its expert tab
            self._q(TabbedContent).active = "tab-expert"
        elif isinstance(event.data_table, HistoryTable):  # a past generation: show its images again
            entry = next((e for e in self.history if str(e.index) == event.row_key.value), None)
            if entry is not None and entry.images is not None:
                self._q(ImageView).show(entry.images, entry.path)

    def show_detail(self) -> None:
        key = self.selected_key
        if key is None and self.rows:
            key = self.rows[0].key
        row = next((r for r in self.rows if r.key == key), None)
        detail = self._q(ExpertDetail)
        detail.record = self.records.get(key) if key else None
        detail.state = row.state if row else None
        detail.latency = self.latency_history.get(key.split("/", 1)[0]) if key else ()
        detail.throughput = self.throughput_history.get(key.split("/", 1)[0]) if key else ()

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
        if self.generating is not None:
            self.notify("a generation is running: x cancels it", severity="warning")
            return
        self._q(GeneratePanel).submit()

    def action_cancel(self) -> None:
        if self.generating is None:
            self.notify("no generation is running")
            return
        self.workers.cancel_group(self, "generate")
        self._q("#gen-status", Label).update("cancelling...")

    def on_generate_panel_invalid(self, msg: GeneratePanel.Invalid) -> None:
        self.notify(msg.error, severity="error")

    def on_generate_panel_requested(self, msg: GeneratePanel.Requested) -> None:
        if self.generating is not None:
            self.notify("a generation is running: x cancels it", severity="warning")
            return
        self.generating = msg.request
        self._gen_idle.clear()
        self._q(RoutingLog).start()
        self._q(TabbedContent).active = "tab-routing"
        self._q(ProgressBar).update(total=msg.request.steps, progress=0)
        self._q("#gen-status", Label).update(f"generating {msg.request.n} image(s)...  x cancels")
        self.generate(msg.request)

    def png_path(self, req: GenRequest) -> Path:
        """Where a finished generation's grid goes (one new file per generation)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return self.out_dir / f"dashboard-{stamp}-{len(self.history) + 1:03d}-s{req.seed}.png"

    def _ui(self, fn, *args, **kwargs) -> None:
        """``call_from_thread`` for workers, quiet once the app is shutting down (quit while a poll or a
        generation step is in flight): its widgets may already be gone then."""
        def guarded() -> None:
            try:
                fn(*args, **kwargs)
            except NoMatches:
                if not self._stopping:
                    raise

        if self._stopping or not self.is_running:
            return
        try:
            self.call_from_thread(guarded)
        except RuntimeError:
            if not self._stopping and self.is_running:  # a real error, not the app stopping meanwhile
                raise

    def exit(self, *args, **kwargs) -> None:
        """Textual's ``App.exit`` (every quit path goes through it), remembering that the app is stopping."""
        self._quitting = True
        super().exit(*args, **kwargs)

    @property
    def _stopping(self) -> bool:
        return self._quitting or not self.is_running

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, req: GenRequest) -> None:
        run_generation(self.source, req, self.post_message, self.clock, self.png_path, self._gen_idle)

    def end_generation(self, message: str, severity: str | None = None) -> None:
        """The generation is over: the status line says how, and failures are also notified."""
        self.generating = None
        self._q("#gen-status", Label).update(message)
        if severity is not None:
            self.notify(message, severity=severity, timeout=10)

    def on_generation_steps(self, msg: GenerationSteps) -> None:
        for step, events in msg.steps:
            self.show_step(step, events)

    def on_generation_finished(self, msg: GenerationFinished) -> None:
        self._q(RoutingLog).flush()
        self.show_images(msg.x, msg.path, msg.req, msg.wall_s)

    def on_generation_ended(self, msg: GenerationEnded) -> None:
        self._q(RoutingLog).flush()
        self.end_generation(msg.message, msg.severity)

    def show_step(self, step, events: list) -> None:
        done = step.step + 1
        self._q(ProgressBar).update(total=step.num_steps, progress=done)
        rate = f"{done / step.elapsed:.1f} steps/s  " if step.elapsed > 0 else ""
        # a fixed-size label: no layout pass per step (a layout of the whole screen costs ~50 ms)
        self._q("#gen-status", Label).update(f"step {done}/{step.num_steps}  {rate}x cancels", layout=False)
        if step.step == 0:
            self._q("#routing-legend", Label).update(routing_legend(step.expert_ids))
        self._q(RoutingLog).add([*events, step])  # what happened before/while this step ran, then the step

    def show_images(self, x, path: Path, req: GenRequest, wall_s: float) -> None:
        self.last_png = path
        self.history += (HistoryEntry(len(self.history) + 1, req, wall_s, str(path), x),)
        self._q(HistoryTable).entries = self.history
        self._q(ImageView).show(x, str(path))
        self.end_generation(f"done in {wall_s:.1f} s")
        self.notify(f"saved {path}")


def make_app(initial_peers=None, source=None, out_dir: str | Path | None = None, config=None, device="cpu",
             poll_seconds: float = 2.0) -> DashboardApp:
    """The dashboard, for the CLI and the tests. ``source``: an injected data source (``FakeSource``);
    otherwise the live swarm at ``initial_peers`` with client ``config`` (the CLI resolves a local swarm of
    `diffswarm swarm up` to its multiaddrs and name)."""
    if source is None:
        from dataclasses import replace

        from diffswarm.client.config import ClientConfig
        from diffswarm.tui.source import LiveSource

        if not initial_peers:
            raise ValueError("the dashboard needs the swarm's --initial-peers (or a local swarm from `swarm up`)")
        config = config or ClientConfig()
        every = min(config.refresh, poll_seconds)  # the dashboard watches the swarm: no idle back-off
        source = LiveSource(initial_peers, replace(config, refresh=every, idle_refresh=every), device)
    return DashboardApp(source, out_dir or "runs/dashboard", poll_seconds)
