"""The dashboard's widgets: each small, fed state from above, reporting user intent as Messages."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, RichLog, Select, Sparkline, Static

from diffswarm.client.contributors import PEER_COLUMNS, PeerContribution
from diffswarm.router.routing import RoutingConfig
from diffswarm.tui.model import (
    COLUMNS,
    HEALTH_COLUMN,
    HISTORY_COLUMNS,
    SAMPLERS,
    STATE_COLUMN,
    ExpertRow,
    GenRequest,
    HistoryEntry,
    SamplingConfig,
    detail_table,
    fit_images,
    parse_request,
    routing_strip,
)

STATE_STYLES = {"online": "green", "joining": "yellow", "offline": "red dim"}


class RowTable(DataTable):
    """A striped table selected by whole rows, with the columns ``COLUMNS``."""

    COLUMNS: ClassVar[tuple[str, ...]] = ()

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns(*self.COLUMNS)


class SwarmTable(RowTable):
    """One row per (peer, expert); ``expert_rows`` is set by the app after each poll."""

    COLUMNS = COLUMNS
    expert_rows: reactive[tuple[ExpertRow, ...]] = reactive((), always_update=True, init=False)

    @staticmethod
    def styled_cells(r: ExpertRow) -> list:
        cells: list = list(r.cells())
        cells[STATE_COLUMN] = Text(cells[STATE_COLUMN], style=STATE_STYLES.get(r.state, ""))
        health = cells[HEALTH_COLUMN]
        cells[HEALTH_COLUMN] = Text(health, style="green" if health == "ok" else "dim" if health == "-" else "bold red")
        return cells

    def watch_expert_rows(self, rows: tuple[ExpertRow, ...]) -> None:
        keys = [r.key for r in rows]
        if keys == [k.value for k in self.rows]:  # same rows in the same order: update cells in place (no flicker)
            for r in rows:
                for col, cell in zip(self.columns, self.styled_cells(r), strict=True):
                    if self.get_cell(r.key, col) != cell:
                        self.update_cell(r.key, col, cell, update_width=True)  # "banned 12s" outgrows "ok"
            return
        cursor = self.cursor_coordinate
        self.clear()
        for r in rows:
            self.add_row(*self.styled_cells(r), key=r.key)
        if rows:  # keep the user's place across polls
            self.move_cursor(row=min(cursor.row, len(rows) - 1), animate=False)


class SummaryBar(Static):
    """One line: peers online, clusters covered; uncovered clusters (and errors) stand out in red."""

    text: reactive[str] = reactive("connecting to the swarm...")
    alert: reactive[bool] = reactive(False)  # the whole line is an error
    note: reactive[str] = reactive("")  # what cannot be done yet (no router announced), after the line

    def render(self) -> Text:
        if self.alert:
            out = Text(self.text, style="bold red")
        else:
            head, sep, tail = self.text.partition("   uncovered clusters:")
            out = Text(head) + (Text(sep + tail, style="bold red") if sep else Text())
        return out + Text(f"   {self.note}", style="yellow") if self.note else out


class NumberInput(Input):
    """A generate field: numbers only, so it lets the app's letter keys (q, g, r, ?) through even when focused."""

    ALLOWED = frozenset("0123456789 ,.-+eE")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, restrict=r"[0-9 ,.+eE-]*", **kwargs)

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return character is not None and character in self.ALLOWED


class GeneratePanel(Vertical):
    """Class / n / steps / k / guidance / seed fields and a Generate button."""

    class Requested(Message):
        def __init__(self, request: GenRequest) -> None:
            super().__init__()
            self.request = request

    class Invalid(Message):
        def __init__(self, error: str) -> None:
            super().__init__()
            self.error = error

    FIELDS = (("classes", "class", ""), ("n", "n", "8"), ("steps", "steps", str(SamplingConfig().steps)),
              ("k", "k", str(RoutingConfig().k)), ("guidance", "guidance", f"{SamplingConfig().guidance:g}"),
              ("seed", "seed", "0"))
    num_classes: int | None = None  # the swarm's, once known (set by the app): class ids are checked against it
    CHOICES = (("strategy", "routing", ("top-k", "sample-k", "threshold", "full")), ("sampler", "sampler", SAMPLERS))

    def compose(self) -> ComposeResult:
        with Horizontal(id="gen-fields"):
            for name, label, value in self.FIELDS:
                with Vertical(classes="field"):
                    yield Label(label)
                    yield NumberInput(value=value, id=f"gen-{name}", placeholder="all" if name == "classes" else "")
            for name, label, options in self.CHOICES:
                with Vertical(classes="field choice", id=f"choice-{name}"):
                    yield Label(label)
                    default = {"strategy": RoutingConfig().strategy, "sampler": SamplingConfig().sampler}[name]
                    yield Select([(o, o) for o in options], value=default, allow_blank=False, id=f"gen-{name}")
            yield Button("Generate", id="gen-button", variant="primary")
        yield Label("", id="gen-hint")  # what the class ids mean, once the swarm is known
        with Horizontal(id="gen-status-row"):
            yield ProgressBar(total=1, id="gen-progress", show_eta=False)  # a total: no indeterminate animation
            yield Label("", id="gen-status")

    def submit(self) -> None:
        vals = {name: self.query_one(f"#gen-{name}", Input).value for name, _, _ in self.FIELDS}
        vals.update({name: str(self.query_one(f"#gen-{name}", Select).value) for name, _, _ in self.CHOICES})
        try:
            self.post_message(self.Requested(parse_request(**vals, num_classes=self.num_classes)))
        except ValueError as e:
            self.post_message(self.Invalid(str(e)))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.submit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()


class RoutingLog(RichLog):
    """Per-step routing strips and failover events of the current generation.

    Written in batches (``flush``, a few times a second): each write of a RichLog lays the whole screen out
    again, which would compete with the sampler for the CPU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list = []  # event lines and steps not drawn yet

    def on_mount(self) -> None:
        self.set_interval(0.4, self.flush)

    def start(self) -> None:
        """A new generation: an empty log."""
        self.clear()
        self.pending = []

    def add(self, items: list) -> None:
        self.pending += items

    def flush(self) -> None:
        if not self.pending:
            return
        width = max(20, self.scrollable_content_region.width - 1)
        for item in self.pending:
            self.write(item if isinstance(item, Text) else routing_strip(item, width))
        self.pending = []


class ImageView(Static):
    """Finished samples as half-block pixels, sized to the panel (re-laid out when it resizes), and where
    the PNG went."""

    images = None  # (N, C, H, W) in [-1, 1], or None; set with ``show``
    path = ""
    _shown = 0  # how many times ``show`` was called: part of the layout cache key
    _cache: tuple = (None, None)

    def show(self, images, path: str) -> None:
        self.images, self.path = images, path
        self._shown += 1
        self.refresh()

    @property
    def lines(self) -> list[Text]:
        if self.images is None:
            return []
        w, h = self.content_size
        key = (self._shown, w, h)
        if self._cache[0] != key:  # the layout is recomputed when the images or the panel size change
            self._cache = (key, fit_images(self.images, max(8, w), max(4, h - (2 if self.path else 0))))
        return self._cache[1]

    def render(self) -> Text:
        lines = self.lines
        if not lines:
            return Text("no images yet: press g to generate", style="dim")
        out = Text("\n").join(lines)
        if self.path:
            out.append(f"\nsaved {self.path}", style="bold")
        return out


class ExpertDetail(Vertical):
    """The selected expert's full record and a sparkline of its peer's measured latency (set from above)."""

    record: reactive[object] = reactive(None, always_update=True, init=False)
    state: reactive[str | None] = reactive(None, init=False)
    latency: reactive[tuple[float, ...]] = reactive((), always_update=True, init=False)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="detail-scroll"):
            yield Static(detail_table(None), id="detail-fields")
        yield Label("latency ms", id="detail-latency-label")
        yield Sparkline([], id="detail-latency")

    def _refresh_text(self) -> None:
        self.query_one("#detail-fields", Static).update(detail_table(self.record, self.state, self.latency))

    def watch_record(self) -> None:
        self._refresh_text()

    def watch_state(self) -> None:
        self._refresh_text()

    def watch_latency(self, latency: tuple[float, ...]) -> None:
        self.query_one(Sparkline).data = list(latency)
        self._refresh_text()


class HistoryTable(RowTable):
    """This session's finished generations, newest last; ``entries`` is set by the app."""

    COLUMNS = HISTORY_COLUMNS
    entries: reactive[tuple[HistoryEntry, ...]] = reactive((), always_update=True, init=False)

    def watch_entries(self, entries: tuple[HistoryEntry, ...]) -> None:
        self.clear()
        for e in entries:
            self.add_row(*e.cells(), key=str(e.index))
        if entries:
            self.move_cursor(row=len(entries) - 1, animate=False)


class ContributorsTable(RowTable):
    """What each peer says it served (claims), most rows first; ``peers`` is set by the app after each poll."""

    COLUMNS = PEER_COLUMNS
    peers: reactive[tuple[PeerContribution, ...]] = reactive((), always_update=True, init=False)

    def watch_peers(self, peers: tuple[PeerContribution, ...]) -> None:
        self.clear()
        for p in peers:
            self.add_row(*p.cells(), key=p.peer_id)


HELP_TEXT = """\
[b]keys[/b] (they work while a field is focused; the number fields take numbers only)
  q          quit (a running generation is stopped first)
  g / Enter  generate with the fields' values (Enter in any number field)
  x          cancel the running generation (it stops after the current step)
  r          poll the swarm now (it is polled every few seconds anyway)
  ?          this help            escape  close it
  tab        move between the table, the fields and the tabs; Enter on a table row opens its expert tab

[b]panels[/b]
  summary    peers online, clusters covered by an online expert, uncovered clusters
  swarm      every (peer, expert) the swarm announces; vanished peers stay listed as offline;
             health = this client's view (ok, banned Ns after failed calls, unverified, skipped);
             heartbeat = seconds since the last announcement, replicas = online experts of the cluster
  generate   class (blank = every class in turn, e.g. 1 3, -1 = none), n, steps, k, guidance, seed,
             routing (top-k, sample-k, threshold, full) and sampler (euler, heun)
  routing    per step a bar with one column per expert (its mean weight; green = called), then the
             called experts by weight; + an expert joined, - one left, ! a failover or ban
  expert     the highlighted row's full record, its training summary where announced and a sparkline
             of the peer's measured latency (last 60 polls)
  history    this session's generations with their settings, wall time and PNG path;
             Enter on a row shows its images again
  images     the last samples as half blocks, sized to the panel, and the PNG written"""


class HelpScreen(ModalScreen[None]):
    """Keys and what the panels show; escape (or ?) closes it."""

    BINDINGS: ClassVar = [("escape", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(HELP_TEXT, id="help-body")
            yield Label("escape: close", id="help-close")
