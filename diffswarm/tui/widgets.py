"""The dashboard's widgets: each small, fed state from above, reporting user intent as Messages."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Button, DataTable, Input, Label, ProgressBar, RichLog, Static

from .model import COLUMNS, ExpertRow, GenRequest, parse_request


class SwarmTable(DataTable):
    """One row per (peer, expert); ``expert_rows`` is set by the app after each poll."""

    expert_rows: reactive[tuple[ExpertRow, ...]] = reactive((), always_update=True, init=False)

    def on_mount(self) -> None:
        self.cursor_type = "row"
        self.zebra_stripes = True
        self.add_columns(*COLUMNS)

    def watch_expert_rows(self, rows: tuple[ExpertRow, ...]) -> None:
        cursor = self.cursor_coordinate
        self.clear()
        for r in rows:
            style = {"online": "green", "joining": "yellow", "offline": "red dim"}.get(r.state, "")
            cells = [Text(c, style=style) if i == 4 else c for i, c in enumerate(r.cells())]
            self.add_row(*cells, key=r.key)
        if rows:  # keep the user's place across polls
            self.move_cursor(row=min(cursor.row, len(rows) - 1), animate=False)


class SummaryBar(Static):
    text: reactive[str] = reactive("connecting to the swarm...")

    def render(self) -> str:
        return self.text


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

    FIELDS = (("classes", "class", ""), ("n", "n", "8"), ("steps", "steps", "20"), ("k", "k", "2"),
              ("guidance", "guidance", "1.0"), ("seed", "seed", "0"))

    def compose(self) -> ComposeResult:
        with Horizontal(id="gen-fields"):
            for name, label, value in self.FIELDS:
                with Vertical(classes="field"):
                    yield Label(label)
                    yield Input(value=value, id=f"gen-{name}", placeholder="all" if name == "classes" else "")
            yield Button("Generate", id="gen-button", variant="primary")
        yield ProgressBar(total=1, id="gen-progress", show_eta=False)  # a total: no indeterminate animation

    def submit(self) -> None:
        vals = {name: self.query_one(f"#gen-{name}", Input).value for name, _, _ in self.FIELDS}
        try:
            self.post_message(self.Requested(parse_request(**vals)))
        except ValueError as e:
            self.post_message(self.Invalid(str(e)))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.submit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()


class RoutingLog(RichLog):
    """Per-step routing strips and failover events of the current generation."""


class ImageView(Static):
    """Finished samples as half-block lines, and where the PNG went."""

    lines: reactive[tuple] = reactive(())
    path: reactive[str] = reactive("")

    def render(self) -> Text:
        if not self.lines:
            return Text("no images yet: press g to generate", style="dim")
        out = Text("\n").join(self.lines)
        if self.path:
            out.append(f"\nsaved {self.path}", style="bold")
        return out
