"""The terminal dashboard: pure view-model functions, and the app driven by Textual's pilot on fake data."""

import asyncio
from types import SimpleNamespace

import pytest
import torch

from diffswarm.tui.app import make_app
from diffswarm.tui.model import (
    UPPER_HALF,
    GenRequest,
    HistoryEntry,
    LatencyHistory,
    detail_text,
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
    rows = swarm_rows(recs, {"12D3KooWpeerAAAA0001": 0.0123}, now=100.0)
    assert [r.expert_id for r in rows] == ["c0-ddpm", "c1-fm", "c1-fm", "c2-ddpm"]
    a = rows[0]
    assert (a.objective, a.peer, a.state, a.load, a.age_s, a.replicas) == ("DDPM", "AAAA0001", "online", 2.0, 1.0, 1)
    assert a.latency_ms == pytest.approx(12.3)
    assert a.cells()[7] == "12" and rows[1].cells()[7] == "-"
    assert rows[1].objective == "FM" and rows[1].replicas == 2
    assert rows[3].state == "joining" and rows[3].replicas == 0


def test_vanished_peers_stay_as_offline():
    first = swarm_rows(demo_records(100.0), {}, 100.0)
    second = swarm_rows(demo_records(110.0)[1:], {}, 110.0, previous=first)
    gone = [r for r in second if r.expert_id == "c0-ddpm"]
    assert len(second) == 4 and gone[0].state == "offline" and gone[0].replicas == 0
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
    info = SimpleNamespace(step=2, num_steps=10, t=0.8, expert_ids=["c0", "c1", "c2"],
                           weights=torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]), chosen=["c0", "c1"])
    text = routing_strip(info)
    assert text.plain.startswith("  3/10 t=0.80")
    assert "c0 \u25860.75" in text.plain and "c1 \u25820.25" in text.plain and "c2  0.00" in text.plain


def test_parse_request():
    req = parse_request("1, 3", "4", "10", "2", "1.5", "7", num_classes=4)
    assert req.classes == (1, 3) and req.guidance == 1.5
    assert labels_for(req).tolist() == [1, 3, 1, 3]
    assert labels_for(parse_request("", "2", "1", "1", "1", "0")).tolist() == [-1, -1]
    for bad in [("x", "1", "1", "1", "1", "0"), ("", "0", "1", "1", "1", "0"), ("9", "1", "1", "1", "1", "0")]:
        with pytest.raises(ValueError):
            parse_request(*bad, num_classes=4)


def test_latency_history_is_bounded_per_peer():
    h = LatencyHistory(3)
    for s in (0.01, 0.02, 0.03, 0.04):
        h.add({"a": s})
    h.add({"b": 0.5})
    assert h.get("a") == pytest.approx((20.0, 30.0, 40.0)) and h.get("b") == (500.0,) and h.get("zz") == ()


def test_detail_text_shows_every_field_and_training():
    rec = demo_records()[0]
    text = detail_text(rec, "offline", (10.0, 30.0)).plain
    for field in ("peer_id", "addrs", "checkpoint_sha256", "software", "protocol", "max_batch", "schedule"):
        assert field in text
    assert rec.checkpoint_sha256 in text and "/ip4/127.0.0.1/tcp/40001" in text
    assert "steps 1200, final loss 0.0312" in text and "offline (last announced online)" in text
    assert "last 30.0 ms, min 10.0, max 30.0" in text
    assert "training" in detail_text(demo_records()[1]).plain and "not announced" in detail_text(demo_records()[1]).plain
    assert "select a row" in detail_text(None).plain


def test_history_entry_cells():
    e = HistoryEntry(2, GenRequest((), 4, 10, 2, 1.5, 7), 1.234, "/tmp/x.png")
    assert e.cells() == ("2", "all", "4", "10", "2", "1.5", "7", "1.23", "/tmp/x.png")


# -- app (pilot) ------------------------------------------------------------------------------


async def wait_for(pilot, cond, timeout=10.0):
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError("condition not reached")


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


def test_app_generates_images_and_png(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            app.query_one("#gen-steps").value = "5"
            app.query_one("#gen-n").value = "3"
            await pilot.press("g")
            await wait_for(pilot, lambda: app.last_png is not None)
            view = app.query_one(ImageView)
            assert len(view.lines) == 4 and UPPER_HALF in view.lines[0].plain  # 8 px high -> 4 lines
            assert view.path == str(app.last_png) and app.last_png.exists() and app.last_png.parent == tmp_path
            assert len(app.query_one(RoutingLog).lines) == 5  # one routing strip per step
            await pilot.click("#gen-button")
            await pilot.pause(0.1)

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

    asyncio.run(go())


def test_make_app_without_swarm_explains(tmp_path):
    with pytest.raises(ValueError, match="swarm up"):
        make_app(run_dir=tmp_path / "nothing")


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
            assert table.row_count == 3 and table.get_row_at(1)[6] == "5" and table.get_row_at(2)[1] == "all"
            await pilot.press("q")
        assert app.return_code == 0

    asyncio.run(go())


def test_expert_detail_follows_the_table_cursor(tmp_path):
    async def go():
        app = fake_app(tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            table, detail = app.query_one(SwarmTable), app.query_one(ExpertDetail)
            await wait_for(pilot, lambda: table.row_count == 4 and detail.record is not None)
            shown = lambda: str(app.query_one("#detail-fields").content)
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


# -- a real loopback swarm --------------------------------------------------------------------


@pytest.mark.slow
def test_dashboard_on_a_loopback_swarm(tmp_path):
    from diffswarm.client.client import ClientConfig
    from diffswarm.dht.node import NetworkConfig
    from diffswarm.peer.launch import local_swarm
    from diffswarm.peer.toy import make_toy_swarm

    experts, router = make_toy_swarm(tmp_path / "toy", ["ddpm", "fm"], size=8, width=16, depth=1, steps=2)
    with local_swarm(experts, router, run_dir=tmp_path / "run", timeout=120, announce_period=1.0,
                     log=lambda m: None) as sw:
        cfg = ClientConfig(swarm=sw.swarm, net=NetworkConfig.loopback(client_mode=True), connect_timeout=30.0,
                           cache_dir=str(tmp_path / "cache"))
        app = make_app(initial_peers=sw.initial_peers, out_dir=tmp_path / "png", config=cfg, poll_seconds=0.5)

        async def go():
            async with app.run_test(size=(120, 40)) as pilot:
                await wait_for(pilot, lambda: sum(r.state == "online" for r in app.rows) == 2, timeout=45)
                assert "experts covered: 2/2" in app.query_one(SummaryBar).text
                app.query_one("#gen-steps").value = "3"
                app.query_one("#gen-n").value = "2"
                await pilot.press("g")
                await wait_for(pilot, lambda: app.last_png is not None, timeout=30)
                assert app.last_png.exists()

        asyncio.run(go())


# -- snapshot ---------------------------------------------------------------------------------


def test_dashboard_snapshot(snap_compare, tmp_path):
    app = fake_app(tmp_path)

    async def loaded(pilot):
        await wait_for(pilot, lambda: app.query_one(SwarmTable).row_count == 4)
        await pilot.pause()

    assert snap_compare(app, terminal_size=(120, 36), run_before=loaded)
