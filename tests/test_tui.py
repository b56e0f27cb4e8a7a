"""The terminal dashboard: pure view-model functions, and the app driven by Textual's pilot on fake data."""

import asyncio
import io
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from rich.text import Text
from textual.widgets import Select, TabbedContent

from diffswarm.tui.app import make_app
from diffswarm.tui.model import (
    COLUMNS,
    HISTORY_COLUMNS,
    UPPER_HALF,
    GenRequest,
    HistoryEntry,
    LatencyHistory,
    class_hint,
    detail_rows,
    detail_table,
    event_line,
    fit_grid,
    fit_images,
    halfblock,
    labels_for,
    parse_request,
    routing_strip,
    summarize,
    swarm_rows,
    tile,
)
from diffswarm.tui.source import FakeRecord, FakeSource, demo_records
from diffswarm.tui.widgets import (
    ContributorsTable,
    ExpertDetail,
    HelpScreen,
    HistoryTable,
    ImageView,
    RoutingLog,
    SummaryBar,
    SwarmTable,
)

# -- model ------------------------------------------------------------------------------------


def test_rows_from_records():
    recs = demo_records(now=100.0) + [FakeRecord("12D3KooWpeerAAAA0001", "c0-ddpm", 0, "ddpm", load=9, updated=50.0)]
    rows = swarm_rows(recs, {"12D3KooWpeerAAAA0001": 0.0123}, now=100.0,
                      health={"12D3KooWpeerAAAA0001": "ok", "12D3KooWpeerBBBB0002": "banned 7s"})
    assert [r.expert_id for r in rows] == ["c0-ddpm", "c1-fm", "c1-fm", "c2-ddpm"]
    a = rows[0]
    assert (a.objective, a.peer, a.state, a.load, a.age_s, a.replicas) == ("DDPM", "AAAA0001", "online", 2.0, 1.0, 1)
    assert a.latency_ms == pytest.approx(12.3)
    col = dict(zip(COLUMNS, range(len(COLUMNS)), strict=True))
    assert a.cells()[col["latency ms"]] == "12" and rows[1].cells()[col["latency ms"]] == "-"
    assert a.cells()[col["health"]] == "ok" and rows[1].cells()[col["health"]] == "banned 7s"
    assert rows[2].cells()[col["health"]] == "-"  # no verdict from the client yet
    assert rows[1].objective == "FM" and rows[1].replicas == 2
    assert rows[3].state == "joining" and rows[3].replicas == 0 and rows[3].cells()[col["state"]] == "joining 40%"


def test_vanished_peers_stay_as_offline():
    first = swarm_rows(demo_records(100.0), {}, 100.0)
    second = swarm_rows(demo_records(110.0)[1:], {}, 110.0, previous=first)
    gone = [r for r in second if r.expert_id == "c0-ddpm"]
    assert len(second) == 4 and gone[0].state == "offline" and gone[0].replicas == 0 and gone[0].health == "-"
    s = summarize(second, 3)
    assert (s.peers_online, s.covered, s.uncovered) == (2, 1, (0, 2))
    assert "uncovered clusters: 0, 2" in s.line()


def test_summary_all_covered():
    recs = [FakeRecord(f"peer{k}", f"c{k}-fm", k, "fm") for k in range(3)]
    s = summarize(swarm_rows(recs, {}, 0.0), 3)
    assert s.line() == "peers online: 3   experts covered: 3/3"


def test_halfblock_colors_and_odd_height():
    img = torch.tensor([[[-1.0, 1.0], [1.0, -1.0], [0.0, 0.0]]])  # (1, 3, 2)
    lines = halfblock(img)
    assert len(lines) == 2 and all(line.plain == UPPER_HALF * 2 for line in lines)
    styles = [str(span.style) for span in lines[0].spans]
    assert styles == ["rgb(0,0,0) on rgb(255,255,255)", "rgb(255,255,255) on rgb(0,0,0)"]
    assert str(lines[1].spans[0].style) == "rgb(128,128,128) on rgb(0,0,0)"
    rgb = halfblock(torch.zeros(3, 2, 1))
    assert len(rgb) == 1 and len(rgb[0].plain) == 1


def test_tile_pads_with_black():
    x = torch.ones(3, 1, 4, 4)
    g = tile(x, 2)
    assert g.shape == (1, 9, 9) and g[0, 4, 0] == -1 and g[0, 0, 0] == 1


def test_routing_strip():
    info = SimpleNamespace(step=2, num_steps=10, t=0.8, expert_ids=["c0", "c1", "c2", "c3"],
                           weights=torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.46, 0.04, 0.0]]),
                           chosen=["c0", "c1", "c2"])
    text = routing_strip(info)
    # one bar column per expert (c2's 0.02 still shows as the lowest bar: it was called), then the called ones by weight
    assert text.plain == "  3/10 t=0.80 \u2586\u2582\u2581   c0 .75  c1 .23  c2 .02"
    green = [text.plain[s.start:s.end] for s in text.spans if "green" in str(s.style)]
    assert green[:3] == ["\u2586", "\u2582", "\u2581"] and "c0 " in green[3] and "\u2581" in green  # c3: grey
    one = routing_strip(SimpleNamespace(step=0, num_steps=1, t=1.0, expert_ids=["a"], weights=torch.ones(2, 1),
                                        chosen=["a"]))
    assert one.plain.endswith("a 1.0")


def test_event_lines_are_marked_by_kind():
    assert event_line("c1-fm online at 12D3KooWabcd").plain.startswith("  + ")
    assert event_line("c1-fm at 12D3KooWabcd left").plain.startswith("  - ")
    failover = event_line("t=0.500: c1-fm at 12D3KooWabcd failed (timeout); banned 1s; retrying")
    assert failover.plain.startswith("  ! ") and "red" in str(failover.style)


def test_fit_grid_uses_the_panel():
    assert fit_grid(8, 28, 28, 200, 60) == (4, 49, 49)  # room to spare: two rows of four, scaled up to fill it
    nrow, h, w = fit_grid(8, 28, 28, 58, 20)  # a 58 x 40-pixel panel: scaled down until 8 fit
    assert (h, w) == (13, 13) and nrow * (w + 1) - 1 <= 58 and -(-8 // nrow) * (h + 1) - 1 <= 40
    assert fit_grid(1, 8, 8, 100, 30) == (1, 24, 24)  # small digits are scaled up, at most 3x
    assert fit_grid(8, 8, 8, 58, 22) == (3, 14, 14)  # ... by any factor that fills the panel
    assert fit_grid(64, 28, 28, 20, 5)[1:] == (7, 7)  # never below a quarter: the view scrolls instead
    lines = fit_images(torch.zeros(8, 1, 28, 28), 58, 20)
    assert len(lines) == 14 and len(lines[0].plain) == 4 * 14 - 1
    assert len(fit_images(torch.zeros(2, 3, 8, 8), 100, 30)) == 12  # 2 x 24 px high, upscaled 3x


def test_parse_request():
    req = parse_request("1, 3", "4", "10", "2", "1.5", "7", num_classes=4)
    assert req.classes == (1, 3) and req.guidance == 1.5 and (req.strategy, req.sampler) == ("top-k", "heun")
    assert labels_for(req).tolist() == [1, 3, 1, 3]
    assert labels_for(parse_request("", "2", "1", "1", "1", "0")).tolist() == [-1, -1]  # unconditional experts
    assert labels_for(parse_request("", "5", "1", "1", "1", "0"), num_classes=3).tolist() == [0, 1, 2, 0, 1]  # all
    assert labels_for(parse_request("-1", "2", "1", "1", "1", "0"), num_classes=3).tolist() == [-1, -1]
    req = parse_request("", "2", "1", "3", "1", "0", strategy="sample-k", sampler="euler")
    assert (req.strategy, req.sampler, req.routing_label) == ("sample-k", "euler", "sample-3")
    assert parse_request("", "2", "1", "3", "1", "0", strategy="full").routing_label == "full"
    for bad in [("x", "1", "1", "1", "1", "0"), ("", "0", "1", "1", "1", "0"), ("9", "1", "1", "1", "1", "0"),
                ("", "1", "1", "1", "1", "0", "best-k"), ("", "1", "1", "1", "1", "0", "top-k", "ddim"),
                ("", "100000", "1", "1", "1", "0")]:
        with pytest.raises(ValueError):
            parse_request(*bad, num_classes=4)


def test_latency_history_is_bounded_per_peer():
    h = LatencyHistory(3)
    for s in (0.01, 0.02, 0.03, 0.04):
        h.add({"a": s})
    h.add({"b": 0.5})
    assert h.get("a") == pytest.approx((20.0, 30.0, 40.0)) and h.get("b") == (500.0,) and h.get("zz") == ()


def detail_text(record, state=None, latency_ms=()) -> Text:
    """The detail panel's rows as plain ``name  value`` lines."""
    if record is None:
        return detail_table(None)  # the panel's own placeholder
    return Text("\n").join(Text(f"{k} ") + v for k, v in detail_rows(record, state, latency_ms))


def test_detail_text_shows_every_field_and_training():
    rec = demo_records()[0]
    text = detail_text(rec, "offline", (10.0, 30.0)).plain
    for field in ("peer_id", "addrs", "checkpoint_sha256", "software", "protocol", "max_batch", "schedule"):
        assert field in text
    assert rec.checkpoint_sha256 in text and "/ip4/127.0.0.1/tcp/40001" in text
    assert "steps 1200, final loss 0.0312" in text and "offline (last announced online)" in text
    assert "last 30.0 ms, min 10.0, max 30.0" in text
    assert "training" in detail_text(demo_records()[1]).plain
    assert "not announced" in detail_text(demo_records()[1]).plain
    assert "step 480 (40%), loss 0.0581" in detail_text(demo_records()[3]).plain  # a joining peer's progress
    assert "select a row" in detail_text(None).plain


def test_client_health_verdicts():
    from diffswarm.client.selection import Blacklist
    from diffswarm.tui.source import client_health

    bans = Blacklist()
    bans.ban("12D3KooWpeerBBBB0002", now=100.0)  # first strike: 1 s
    bans.ban("12D3KooWpeerBBBB0002", now=100.0)  # second: 2 s
    recs = demo_records() + [FakeRecord("12D3KooWpeerEEEE0005", "c0-fm", 0, "fm")]
    from diffswarm.client.client import SwarmClient

    state = SimpleNamespace(records=recs, bans=bans, verified={"12D3KooWpeerAAAA0001": "ok"}, latency={},
                            probe_latency={}, last_error={"12D3KooWpeerBBBB0002": "timed out"},
                            view=SimpleNamespace(skipped={"12D3KooWpeerEEEE0005/c0-fm": "partition differs"}))
    client = SimpleNamespace(health=lambda now: SwarmClient.health(state, now))  # the client's public snapshot
    h = client_health(client, now=100.5)
    assert h["12D3KooWpeerAAAA0001"] == "ok" and h["12D3KooWpeerBBBB0002"] == "banned 2s"
    assert h["12D3KooWpeerCCCC0003"] == "unverified" and "12D3KooWpeerDDDD0004" not in h  # joining: no verdict
    assert client_health(client, now=103.0)["12D3KooWpeerBBBB0002"] == "unverified"  # the ban ran out
    assert h["12D3KooWpeerEEEE0005"] == "skipped"
    full = SwarmClient.health(state, 100.5)
    assert full["12D3KooWpeerBBBB0002"].reason == "timed out"
    assert full["12D3KooWpeerEEEE0005"].reason == "partition differs"


def test_class_hint_names_the_classes():
    assert class_hint("fashion:28", 10).startswith("0 T-shirt/top  1 Trouser")
    assert "9 Ankle boot" in class_hint("fashion:28", 10)
    assert class_hint("digits:8", 10).startswith("digits 0-9")
    assert class_hint("folder:32", 3).startswith("folder 0..2") and "-1: unconditional" in class_hint("folder:32", 3)
    assert "take no class" in class_hint("fashion:28", 0)


def test_history_entry_cells():
    e = HistoryEntry(2, GenRequest((), 4, 10, 2, 1.5, 7, sampler="euler"), 1.234, "/tmp/x.png")
    assert e.cells() == ("2", "all", "4", "10", "top-2", "euler", "1.5", "7", "1.23", "/tmp/x.png")


# -- app (pilot) ------------------------------------------------------------------------------


async def wait_for(pilot, cond, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached")


def rendered(widget) -> str:
    """What a Static shows, as plain text (wide: nothing folds)."""
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(widget.content)
    return console.file.getvalue()


def fake_app(tmp_path, **kw):
    src = FakeSource(demo_records(), 3, {"12D3KooWpeerAAAA0001": 0.02}, **kw)
    return make_app(source=src, out_dir=tmp_path, poll_seconds=0.2)


def test_app_fills_table_and_summary(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.query_one(SwarmTable)
            await wait_for(pilot, lambda: table.row_count == 4)
            assert "uncovered clusters: 2" in app.query_one(SummaryBar).text
            assert "experts covered: 2/3" in app.query_one(SummaryBar).text
            # a peer vanishes: its row stays, offline
            app.source.records = app.source.records[1:]
            await wait_for(pilot, lambda: any(r.state == "offline" for r in app.rows))
            assert table.row_count == 4 and "uncovered clusters: 0, 2" in app.query_one(SummaryBar).text
            await pilot.press("q")

    asyncio.run(go())


def test_contributors_tab_shows_each_peers_claims(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.query_one(ContributorsTable)
            await wait_for(pilot, lambda: table.row_count == 4)
            first = [str(c) for c in table.get_row_at(0)]
            assert first == ["AAAA0001", "c0-ddpm", "online", "direct", "1520", "64", "2", "1h02m"]
            assert [str(c) for c in table.get_row_at(1)][3:5] == ["relayed", "300"]
            label = str(app.query_one("#contributors-clusters").render())
            assert "claims, not checked" in label and "cluster 1: 2 online, 300 rows, 12 images" in label
            await pilot.press("q")

    asyncio.run(go())


def test_app_generates_images_and_png(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "5"
            app.query_one("#gen-n").value = "3"
            await pilot.press("g")
            await wait_for(pilot, lambda: app.last_png is not None)
            view = app.query_one(ImageView)
            w, h = view.content_size
            nrow, hh, ww = fit_grid(3, 8, 8, w, h - 2)
            assert hh > 8 and len(view.lines) == (-(-3 // nrow) * (hh + 1)) // 2  # 8x8 samples scaled up to the panel
            assert UPPER_HALF in view.lines[0].plain and len(view.lines[0].plain) <= w
            assert view.path == str(app.last_png) and app.last_png.exists() and app.last_png.parent == tmp_path
            log = app.query_one(RoutingLog)
            assert len(log.lines) == 5 and log.lines[0].text.startswith("  1/5 t=1.00")  # one strip per step
            assert str(app.query_one("#routing-legend").content) == "bar columns: c0 c1 c2"
            assert str(app.query_one("#gen-status").content).startswith("done in")
            area = len(view.lines) * len(view.lines[0].plain)
            await pilot.resize_terminal(200, 60)  # a bigger panel: the same samples are laid out again, larger
            await wait_for(pilot, lambda: view.content_size.width > w)
            assert len(view.lines) * len(view.lines[0].plain) > area
            await pilot.click("#gen-button")
            await wait_for(pilot, lambda: len(app.history) == 2)

    asyncio.run(go())


def test_app_errors_are_notified_not_raised(tmp_path):
    async def go():
        app = fake_app(tmp_path, fail="snapshot")
        async with app.run_test(size=(120, 40)) as pilot:
            await wait_for(pilot, lambda: "unreachable" in app.query_one(SummaryBar).text)
            app.source.fail = "generate"
            await pilot.press("g")
            await wait_for(pilot, lambda: any("generation failed" in n.message for n in app._notifications))
            app.query_one("#gen-n").value = "zero"
            await pilot.press("g")
            await wait_for(pilot, lambda: any("integers" in n.message for n in app._notifications))
            assert app.last_png is None
            app.source.fail = None
            await wait_for(pilot, lambda: app.snapshot is not None)  # the swarm answers now: 4 classes
            app.query_one("#gen-n").value, app.query_one("#gen-classes").value = "2", "7"
            await pilot.press("g")
            await wait_for(pilot, lambda: any("classes 0..3" in n.message for n in app._notifications))
            assert app.generating is None and app.last_png is None

    asyncio.run(go())


def test_make_app_without_swarm_explains():
    with pytest.raises(ValueError, match="swarm up"):
        make_app()


def test_cli_dashboard_without_swarm_is_an_error(tmp_path, capsys):
    from diffswarm.cli import main

    assert main(["dashboard", "--run-dir", str(tmp_path / "none")]) == 2
    assert "swarm up" in capsys.readouterr().err


def test_keys_fire_while_a_field_is_focused_and_enter_generates(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            steps, n = app.query_one("#gen-steps"), app.query_one("#gen-n")
            steps.value, n.value = "3", "2"
            steps.focus()
            await pilot.pause()
            await pilot.press("g", "r")  # priority bindings: generate / refresh, nothing typed into the field
            await wait_for(pilot, lambda: len(app.history) == 1)
            assert steps.value == "3" and app.focused is steps
            first = app.history[0]
            assert (first.request.n, first.request.steps, first.index) == (2, 3, 1) and first.path == str(app.last_png)
            app.query_one("#gen-seed").value = "5"
            for field in ("#gen-seed", "#gen-classes"):  # Enter in any generate field starts a generation
                app.query_one(field).focus()
                await pilot.pause()
                before = len(app.history)
                await pilot.press("enter")
                await wait_for(pilot, lambda b=before: len(app.history) == b + 1)
            assert [e.request.seed for e in app.history] == [0, 5, 5] and app.history[-1].wall_s > 0
            assert len({e.path for e in app.history}) == 3  # one PNG per generation, even within a second
            table = app.query_one(HistoryTable)
            assert table.row_count == 3 and table.get_row_at(1)[HISTORY_COLUMNS.index("seed")] == "5"
            assert table.get_row_at(2)[1] == "all"
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(go())


def test_history_row_shows_its_images_again(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "2"
            for seed in ("1", "2"):
                app.query_one("#gen-seed").value = seed
                await pilot.press("g")
                await wait_for(pilot, lambda s=seed: len(app.history) == int(s) and app.generating is None)
            view = app.query_one(ImageView)
            assert view.path == app.history[1].path and view.images is app.history[1].images
            app.query_one(TabbedContent).active = "tab-history"
            table = app.query_one(HistoryTable)
            table.focus()
            await pilot.press("up", "enter")  # the first generation
            await wait_for(pilot, lambda: view.path == app.history[0].path)
            assert view.images is app.history[0].images
            assert not torch.equal(app.history[0].images, app.history[1].images)

    asyncio.run(go())


def test_expert_detail_follows_the_table_cursor(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            table, detail = app.query_one(SwarmTable), app.query_one(ExpertDetail)
            await wait_for(pilot, lambda: table.row_count == 4 and detail.record is not None)
            def shown():
                return rendered(app.query_one("#detail-fields"))
            assert detail.record.peer_id == "12D3KooWpeerAAAA0001"
            assert "9f2c" in shown() and "/ip4/127.0.0.1/tcp/40001" in shown() and "final loss 0.0312" in shown()
            assert "software" in shown() and "steps 1200" in shown()
            app.source.latency = {"12D3KooWpeerAAAA0001": 0.05}  # the measured latency changes: the sparkline grows
            await wait_for(pilot, lambda: 50.0 in detail.latency and 20.0 in detail.latency)
            assert list(app.query_one("#detail-latency").data) == list(detail.latency)
            assert len(detail.latency) <= 60
            table.focus()
            await pilot.press("down")
            await wait_for(pilot, lambda: detail.record.peer_id == "12D3KooWpeerBBBB0002")
            assert app.selected_key == "12D3KooWpeerBBBB0002/c1-fm"
            assert "not announced" in shown() and "not measured" in shown() and detail.latency == ()
            await pilot.pause(0.5)  # polls keep the selection
            assert detail.record.peer_id == "12D3KooWpeerBBBB0002"

    asyncio.run(go())


def test_help_screen_opens_and_closes(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-n").focus()
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
            assert "escape" in str(app.screen.query_one("#help-body").content)
            await pilot.press("g")  # the modal screen keeps the dashboard's keys from firing
            await pilot.pause(0.3)
            assert app.history == () and app.query_one("#gen-n").value == "8"
            await pilot.pause(0.3)  # polling goes on behind the help screen without errors
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
            await pilot.press("question_mark")  # ? toggles
            await wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))

    asyncio.run(go())


def test_cancel_and_one_generation_at_a_time(tmp_path):
    async def go():
        app = fake_app(tmp_path, step_delay=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "400"  # 80 s if it were not cancelled
            await pilot.press("g")
            bar = app.query_one("#gen-progress")
            await wait_for(pilot, lambda: (bar.progress or 0) >= 3)
            status = str(app.query_one("#gen-status").content)
            assert app.generating is not None and "x cancels" in status and "steps/s" in status and "/400" in status
            await pilot.press("g")  # a second request while one runs is refused, not queued or interleaved
            await wait_for(pilot, lambda: any("is running" in n.message for n in app._notifications))
            await pilot.press("x")
            await wait_for(pilot, lambda: app.generating is None)
            assert str(app.query_one("#gen-status").content) == "cancelled" and bar.progress < 400
            assert app.history == () and app.last_png is None and list(tmp_path.iterdir()) == []
            await pilot.press("x")  # nothing to cancel: a notice, no error
            await wait_for(pilot, lambda: any("no generation" in n.message for n in app._notifications))
            app.query_one("#gen-steps").value = "4"
            await pilot.press("g")  # the dashboard generates again after a cancel
            await wait_for(pilot, lambda: len(app.history) == 1)

    asyncio.run(go())


def test_quit_during_a_generation_stops_it(tmp_path):
    async def go():
        app = fake_app(tmp_path, step_delay=0.2)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "900"  # 180 s if it were not stopped
            await pilot.press("g")
            await wait_for(pilot, lambda: (app.query_one("#gen-progress").progress or 0) >= 2)
            t0 = time.monotonic()
            await pilot.press("q")
        return app, time.monotonic() - t0

    app, quit_s = asyncio.run(go())
    assert app._gen_idle.is_set() and quit_s < 5  # the generation thread ended at its next step
    assert app.history == ()


def test_routing_strategy_and_sampler_choices(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "3"
            app.query_one("#gen-strategy", Select).value = "full"
            app.query_one("#gen-sampler", Select).value = "heun"
            await pilot.press("g")
            await wait_for(pilot, lambda: len(app.history) == 1)
            req = app.history[0].request
            assert (req.strategy, req.sampler) == ("full", "heun")
            strips = [line.text for line in app.query_one(RoutingLog).lines]
            assert len(strips) == 3 and all("c0 " in s and "c1 " in s and "c2 " in s for s in strips)  # all called
            assert app.query_one(HistoryTable).get_row_at(0)[HISTORY_COLUMNS.index("routing")] == "full"
            app.query_one("#gen-strategy", Select).value = "top-k"
            app.query_one("#gen-k").value = "1"
            app.query_one("#gen-n").value = "1"
            await pilot.press("g")
            await wait_for(pilot, lambda: len(app.history) == 2)
            strips = [line.text for line in app.query_one(RoutingLog).lines]
            assert len(strips) == 3 and all(s.count(" c") == 1 for s in strips)  # top-1, one sample: one expert a step

    asyncio.run(go())


def test_health_column_and_enter_opens_the_expert_tab(tmp_path):
    async def go():
        app = fake_app(tmp_path, health={"12D3KooWpeerBBBB0002": "banned 12s", "12D3KooWpeerAAAA0001": "ok"})
        async with app.run_test(size=(120, 40)) as pilot:
            table = app.query_one(SwarmTable)
            await wait_for(pilot, lambda: table.row_count == 4)
            health = COLUMNS.index("health")
            assert [str(table.get_row_at(i)[health]) for i in range(4)] == ["ok", "banned 12s", "-", "-"]
            app.source.health = {}  # the ban ran out: the cell is updated in place on the next poll
            await wait_for(pilot, lambda: str(table.get_row_at(1)[health]) == "-")
            tabs = app.query_one(TabbedContent)
            assert tabs.active == "tab-routing"
            table.focus()
            await pilot.press("down", "down", "down", "enter")
            await wait_for(pilot, lambda: tabs.active == "tab-expert")
            assert "step 480 (40%)" in rendered(app.query_one("#detail-fields"))

    asyncio.run(go())


# -- a real loopback swarm --------------------------------------------------------------------


@pytest.mark.slow
def test_dashboard_on_a_loopback_swarm(tmp_path):
    """Two peers and a bootstrap on 127.0.0.1: the table fills, a generation's images appear, a killed
    (SIGKILL, no goodbye) peer's row turns offline once its record expires, and generation goes on."""
    from diffswarm.client.answer_checks import TrustConfig
    from diffswarm.client.config import ClientConfig
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.swarm.local import local_swarm
    from diffswarm.testing.toy import ToySwarmSpec, make_toy_swarm

    experts, router = make_toy_swarm(tmp_path / "toy", ToySwarmSpec(["ddpm", "fm"], size=8, width=16, depth=1, steps=2))
    with local_swarm(experts, router, run_dir=tmp_path / "run", timeout=120, announce_period=1.0) as sw:
        # no local fallback: a dead expert's rows go to the survivor (the client would otherwise compute the
        # cluster itself with the weights it fetched to check that peer's first answers)
        cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), connect_timeout=30.0,
                           cache_dir=str(tmp_path / "cache"), trust=TrustConfig(local_fallback=False))
        app = make_app(initial_peers=sw.initial_peers, out_dir=tmp_path / "png", config=cfg, poll_seconds=0.5)
        victim = sw.info("peer1")["peer_id"]

        async def go():
            async with app.run_test(size=(120, 40)) as pilot:
                await wait_for(pilot, lambda: sum(r.state == "online" for r in app.rows) == 2, timeout=45)
                assert "experts covered: 2/2" in app.query_one(SummaryBar).text
                await wait_for(pilot, lambda: all(r.health == "ok" for r in app.rows), timeout=20)  # probed
                app.query_one("#gen-steps").value = "3"
                app.query_one("#gen-n").value = "2"
                await pilot.press("g")
                await wait_for(pilot, lambda: app.last_png is not None, timeout=30)
                assert app.last_png.exists() and app.query_one(ImageView).lines
                both = {r.expert_id for r in app.rows}
                assert all(any(e in line.text for e in both) for line in app.query_one(RoutingLog).lines)

                sw.kill("peer1")
                table = app.query_one(SwarmTable)
                def dead():
                    return next(r for r in app.rows if r.key.startswith(victim))
                await wait_for(pilot, lambda: dead().state == "offline", timeout=30)
                assert table.row_count == 2  # marked, not dropped
                state = COLUMNS.index("state")
                assert str(table.get_row(dead().key)[state]) == "offline"
                assert "experts covered: 1/2" in app.query_one(SummaryBar).text
                assert f"uncovered clusters: {dead().cluster}" in app.query_one(SummaryBar).text

                first = app.last_png
                await pilot.press("g")  # the surviving expert still serves; the strips show only it
                await wait_for(pilot, lambda: app.last_png != first and app.generating is None, timeout=30)
                alive = next(r.expert_id for r in app.rows if r.state == "online")
                strips = [line.text for line in app.query_one(RoutingLog).lines if "t=" in line.text[:14]]
                assert len(strips) == 3 and all(f"  {alive} 1.0" in s for s in strips)

        asyncio.run(go())


# -- snapshot ---------------------------------------------------------------------------------


def snapshot_app(tmp_path):
    """The fake dashboard with everything that varies between runs pinned: PNG names and wall times."""
    app = fake_app(tmp_path, health={"12D3KooWpeerAAAA0001": "ok", "12D3KooWpeerBBBB0002": "banned 12s",
                                     "12D3KooWpeerCCCC0003": "ok"})
    ticks = iter(range(1000))
    app.clock = lambda: 1.5 * next(ticks)
    app.png_path = lambda req: Path("runs/dashboard") / f"snapshot-{len(app.history) + 1}.png"
    return app


def snap(snap_compare, app, prepare=None) -> bool:
    """Compare the 120x40 screen once the table is filled and ``prepare(pilot)`` ran."""
    async def run_before(pilot):
        await wait_for(pilot, lambda: app.query_one(SwarmTable).row_count == 4)
        if prepare is not None:
            await prepare(pilot)
        await pilot.pause()

    return snap_compare(app, terminal_size=(120, 40), run_before=run_before)


def test_dashboard_snapshot(snap_compare, tmp_path):
    assert snap(snap_compare, snapshot_app(tmp_path))


def test_dashboard_after_generation_snapshot(snap_compare, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the pinned PNG path is relative
    app = snapshot_app(tmp_path)

    async def generated(pilot):
        app.query_one("#gen-steps").value = "12"
        app.query_one("#gen-classes").value = "1 2"
        await pilot.press("g")
        await wait_for(pilot, lambda: app.last_png is not None)

    assert snap(snap_compare, app, generated)


def test_expert_tab_snapshot(snap_compare, tmp_path):
    app = snapshot_app(tmp_path)

    async def selected(pilot):
        app.query_one(SwarmTable).focus()
        await pilot.press("enter")  # the first row: c0-ddpm, with its training summary and latency sparkline
        await wait_for(pilot, lambda: len(app.query_one(ExpertDetail).latency) >= 3)
        app.source.latency = {}  # later polls add no samples
        await pilot.pause(0.5)
        app.latency_history = LatencyHistory(60)  # the sparkline from fixed samples, not from how many polls ran
        for ms in (0.02, 0.018, 0.025, 0.031, 0.022, 0.019, 0.040, 0.021):
            app.latency_history.add({"12D3KooWpeerAAAA0001": ms})
        app.show_detail()

    assert snap(snap_compare, app, selected)


def test_help_screen_snapshot(snap_compare, tmp_path):
    app = snapshot_app(tmp_path)

    async def helped(pilot):
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))

    assert snap(snap_compare, app, helped)
