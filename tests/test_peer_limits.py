"""A hostile or careless caller cannot exhaust a peer: every buffer it controls is bounded, it is rate
limited with a clear retry-later answer, internal errors tell it nothing, and whatever it breaks off leaves
nothing behind on the peer.

Pure parts first (rate buckets, budgets, error classification, request checks, batcher queue), then one
in-process peer serving a toy expert on 127.0.0.1 and raw callers that send what no honest client would.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from peer_harness import END_OF_STREAM, InprocPeer, RawCaller, frame, quiet_hivemind, read_frame, valid_request

from diffswarm.peer.batching import Batcher, BatchPolicy
from diffswarm.peer.limits import ByteBudget, Lease, PeerLimits, RateLimiter, StreamSlots
from diffswarm.protocol.wire import (
    MAX_RETRY_AFTER,
    MAX_SESSION_MESSAGE_BYTES,
    MAX_STREAM_PART_BYTES,
    STREAM_CHUNK_BYTES,
    ExpertSpec,
    PeerBusy,
    PeerInternalError,
    RequestError,
    check_request,
    classify_error,
    decode_response,
    error_metadata,
    format_error,
    load_metadata,
    request_metadata,
    stream_parts,
)

# -- rate limit, budgets, slots --------------------------------------------------------------------


def test_rate_limiter_gives_a_burst_then_the_rate_and_says_when_to_retry():
    r = RateLimiter(rate=100.0, burst=20)
    assert r.take("a", 16, now=0.0) == 0.0
    wait = r.take("a", 16, now=0.0)  # 4 tokens left: 12 rows short at 100 rows/s
    assert wait == pytest.approx(0.12)
    assert r.take("a", 16, now=0.0) == pytest.approx(0.12)  # a refused request takes nothing
    assert r.take("b", 20, now=0.0) == 0.0  # other callers have their own bucket
    assert r.take("a", 16, now=0.12) == 0.0  # retry_after was right
    assert r.take("a", 21, now=100.0) == math.inf  # more than the burst never fits
    assert r.take("a", 20, now=100.0) == 0.0  # refilled up to the burst, not beyond
    assert r.take("a", 1, now=100.0) == pytest.approx(0.01)
    assert RateLimiter(rate=0.0, burst=1).take("a", 10**6, now=0.0) == 0.0  # rate 0: no limit


def test_rate_limiter_forgets_refilled_callers_first_and_stays_bounded():
    r = RateLimiter(rate=10.0, burst=10, max_callers=4)
    r.take("old", 10, now=0.0)  # emptied: takes 1 s to refill, must not be forgotten before
    for i in range(3):
        r.take(f"full{i}", 1, now=0.0)  # refilled after 0.1 s
    r.take("x", 1, now=0.5)  # 5 callers > 4: the refilled buckets go (a new bucket is full: nothing lost)
    assert set(r.buckets) == {"old", "x"}
    assert r.take("old", 6, now=0.5) == pytest.approx(0.1)  # "old" kept its debt
    for i in range(100):  # a crowd of new ids: the least recent go, memory stays bounded
        r.take(f"sybil{i}", 10, now=0.5)
    assert len(r.buckets) == 4


def test_byte_budget_lease_and_stream_slots():
    b = ByteBudget(total=100, per_caller=60)
    lease = Lease(b, "a")
    lease.take(50)
    with pytest.raises(PeerBusy, match="this caller already has 50"):
        lease.take(20)
    other = Lease(b, "b")
    other.take(50)
    with pytest.raises(PeerBusy, match="the peer holds 100"):
        Lease(b, "c").take(1)
    lease.give(20)  # more than held is clipped to what is held
    assert b.by_caller == {"a": 30, "b": 50} and b.used == 80
    lease.release()
    other.release()
    assert b.used == 0 and b.by_caller == {} and b.peak == 100

    s = StreamSlots(total=3, per_caller=2)
    s.open("a")
    s.open("a")
    with pytest.raises(PeerBusy) as e:
        s.open("a")
    assert classify_error(e.value) == ("busy", 0.5)
    s.open("b")
    with pytest.raises(PeerBusy, match="the peer has 3 streams open"):
        s.open("c")
    for c in ("a", "a", "b"):
        s.close(c)
    assert s.open_total == 0 and s.by_caller == {}


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="session_inflight"):
        PeerLimits(session_inflight=0)
    with pytest.raises(ValueError, match="rate_rows"):
        PeerLimits(rate_rows=float("nan"))
    with pytest.raises(ValueError, match="write_timeout"):
        PeerLimits(write_timeout=0)


# -- error classification (the client's side) --------------------------------------------------------


def test_classify_error_reads_every_form_of_error_answer():
    busy = PeerBusy("queue full", 0.25)
    assert busy.wire_message == "[diffswarm:busy retry_after=0.250] queue full"
    # unary calls: P2PHandlerError's message is exactly the peer's text
    assert classify_error(busy.wire_message) == ("busy", 0.25)
    # stream calls: hivemind puts its own prefix before it
    stream_msg = f"Failed to call handler `diffswarm::ExpertServicer.rpc_velocity_stream` at QmX: {busy.wire_message}"
    assert classify_error(stream_msg) == ("busy", 0.25)
    assert classify_error(P2PHandlerError(stream_msg)) == ("busy", 0.25)
    assert classify_error(format_error("refused", "x has shape (2, 1)")) == ("refused", None)
    internal = PeerInternalError("0a1b2c3d")
    assert internal.wire_message.startswith("[diffswarm:internal id=0a1b2c3d] ")
    assert classify_error(internal.wire_message) == ("internal", None)
    # session answers: metadata
    assert classify_error(error_metadata(7, busy)) == ("busy", 0.25)
    assert error_metadata(7, busy) == {"id": 7, "error": "queue full", "code": "busy", "retry_after": 0.25}
    assert classify_error(error_metadata(7, RequestError("bad"))) == ("refused", None)
    assert classify_error(error_metadata(7, internal))[0] == "internal"
    assert classify_error({"id": 1, "rows": 3}) == ("ok", None)
    # exceptions of this module carry their code
    assert classify_error(RequestError("bad")) == ("refused", None)
    assert classify_error(busy) == ("busy", 0.25)
    # not a diffswarm answer: an older peer, a transport failure
    assert classify_error("RequestError('x contains NaN')") == ("unknown", None)
    assert classify_error(TimeoutError()) == ("unknown", None)
    assert classify_error({"id": 1, "error": "something"}) == ("unknown", None)
    # a hostile peer cannot make a client wait forever, or retry at once, with nonsense
    assert classify_error({"error": "x", "code": "busy", "retry_after": 1e9}) == ("busy", MAX_RETRY_AFTER)
    assert classify_error({"error": "x", "code": "busy", "retry_after": -5}) == ("busy", 0.0)
    assert classify_error({"error": "x", "code": "busy", "retry_after": float("nan")}) == ("busy", 1.0)
    assert classify_error({"error": "x", "code": "busy", "retry_after": "soon"}) == ("busy", 1.0)
    assert classify_error("[diffswarm:busy retry_after=inf] x") == ("busy", 1.0)
    assert classify_error("[diffswarm:busy retry_after=nope] x") == ("busy", 1.0)
    assert classify_error("[diffswarm:busy retry_after=1e400] x") == ("busy", 1.0)
    assert classify_error({"error": "x", "code": "evil"}) == ("unknown", None)


def test_decode_response_raises_the_typed_error():
    with pytest.raises(PeerBusy) as e:
        decode_response([], {"id": 1, "error": "full", "code": "busy", "retry_after": 2.0}, 1, (1, 8, 8))
    assert e.value.retry_after == 2.0
    with pytest.raises(PeerInternalError):
        decode_response([], {"id": 1, "error": "internal error", "code": "internal", "error_id": "ab"}, 1, (1, 8, 8))
    with pytest.raises(RequestError, match="refused the request: bad") as e:
        decode_response([], {"id": 1, "error": "bad", "code": "refused"}, 1, (1, 8, 8))
    assert type(e.value) is RequestError


# -- request checks before decoding ----------------------------------------------------------------

SPEC = ExpertSpec("c0-fm", (1, 8, 8), 4, max_rows=64)


def tensors(b=3):
    return [serialize_torch_tensor(torch.randn(b, 1, 8, 8)), serialize_torch_tensor(torch.rand(b)),
            serialize_torch_tensor(torch.zeros(b, dtype=torch.long))]


@pytest.mark.parametrize("mutate, message", [
    (lambda ts: setattr(ts[0], "dtype", "U100000"), "declares dtype"),  # decoding this would allocate 200 GB
    (lambda ts: setattr(ts[0], "dtype", "object"), "declares dtype"),
    (lambda ts: setattr(ts[2], "dtype", "float64"), "declares dtype"),
    (lambda ts: setattr(ts[0], "buffer", ts[0].buffer[:8]), "needs 768 bytes, it carries 8"),
    (lambda ts: setattr(ts[0], "buffer", ts[0].buffer * 1000), "carries 768000"),
    (lambda ts: setattr(ts[1], "compression", runtime_pb2.CompressionType.BLOCKWISE_8BIT), "compression"),
    (lambda ts: setattr(ts[0], "compression", 99), "compression"),
    (lambda ts: setattr(ts[0], "requires_grad", True), "grad"),
    (lambda ts: ts[0].size.__setitem__(0, 2**32 - 1), "rows outside"),
    (lambda ts: ts[0].size.__setitem__(0, 0), "rows outside"),
])
def test_declared_tensors_are_checked_before_anything_is_decoded(monkeypatch, mutate, message):
    import diffswarm.protocol.wire as wire

    def must_not_decode(t):
        raise AssertionError("decoded before the declared dtype/shape/buffer were checked")

    ts = tensors()
    mutate(ts)
    monkeypatch.setattr(wire, "deserialize_torch_tensor", must_not_decode)
    with pytest.raises(RequestError, match=message):
        check_request(SPEC, "c0-fm", ts, request_metadata(2.0))


def test_float16_requests_still_pass_the_declared_checks():
    ts = tensors()
    ts[0] = serialize_torch_tensor(torch.randn(3, 1, 8, 8), runtime_pb2.CompressionType.FLOAT16)
    req = check_request(SPEC, "c0-fm", ts, request_metadata(2.0))
    assert req.compression == "float16" and req.x.dtype == torch.float32


def test_spec_bounds_follow_the_expert():
    spec = ExpertSpec("c0", (3, 32, 32), 10)  # 8192 rows of 3x32x32 float32: 96 MiB of x
    assert spec.row_bytes == 3 * 32 * 32 * 4 + 12
    assert 96 << 20 < spec.max_request_bytes < 97 << 20
    assert spec.max_stream_parts == 97 + 3


# -- batcher queue -----------------------------------------------------------------------------------


def _req(rows):
    ts = [serialize_torch_tensor(torch.randn(rows, 1, 2, 2)), serialize_torch_tensor(torch.rand(rows)),
          serialize_torch_tensor(torch.zeros(rows, dtype=torch.long))]
    return check_request(ExpertSpec("e", (1, 2, 2), 4), "e", ts, request_metadata(1.0))


def test_batcher_queue_is_bounded_and_its_worker_survives_bugs():
    async def scenario():
        b = Batcher(lambda x, t, labels, g: x, BatchPolicy(max_wait=0, max_queue_rows=10))
        b.throughput = 10.0
        first = asyncio.ensure_future(b.submit(_req(8), "a"))  # worker not started: stays queued
        await asyncio.sleep(0)
        with pytest.raises(PeerBusy) as e:
            await b.submit(_req(4), "b")
        assert e.value.retry_after == pytest.approx(0.2)  # 2 rows over at 10 rows/s
        assert b.pending_rows == 8  # the refused request left nothing
        b.start()
        await first
        # a request larger than the whole queue still runs when the queue is empty
        await b.submit(_req(12), "a")

        import diffswarm.peer.batching as batching
        real = batching.take_batch
        batching.take_batch = lambda rows, m: 1 / 0  # a bug outside the forward pass
        try:
            with pytest.raises(ZeroDivisionError):
                await asyncio.wait_for(b.submit(_req(2), "a"), 5)
        finally:
            batching.take_batch = real
        v, _ = await asyncio.wait_for(b.submit(_req(2), "a"), 5)  # the worker lives on
        await b.close()
        return b.pending_rows, v.shape

    pending, shape = asyncio.run(scenario())
    assert pending == 0 and shape == (2, 1, 2, 2)


# -- bounded stream framing -------------------------------------------------------------------------


def test_read_message_bounds_every_way_a_frame_can_go_wrong():
    from diffswarm.peer.streams import IdleStream, StreamClosed, read_message

    msg = valid_request(2)[0].SerializeToString()

    async def read(data: bytes = b"", exc: BaseException | None = None, eof: bool = True, max_bytes=1 << 20,
                   idle=1.0, body=1.0):
        r = asyncio.StreamReader()
        r.feed_data(data)
        if exc is not None:  # once the reader waits for more: what a reset looks like
            asyncio.get_running_loop().call_later(0.01, r.set_exception, exc)
        elif eof:
            r.feed_eof()
        return await read_message(r, runtime_pb2.ExpertRequest, max_bytes, idle, body)

    def outcome(**kw):
        try:
            return asyncio.run(read(**kw))
        except (RequestError, StreamClosed) as e:
            return e

    assert outcome(data=frame(msg)).uid == "c0-fm"
    assert outcome(data=END_OF_STREAM) is None
    assert isinstance(outcome(data=b""), StreamClosed)
    assert isinstance(outcome(data=frame(msg)[:20]), StreamClosed)  # stops mid-message
    assert isinstance(outcome(exc=ConnectionResetError()), StreamClosed)  # reset before a message
    assert isinstance(outcome(data=frame(msg)[:20], exc=ConnectionResetError()), StreamClosed)  # reset mid-message
    # refused from the header alone: the body never comes, and is not waited for
    e = outcome(data=frame(b"", length=1 << 40), eof=False)
    assert isinstance(e, RequestError) and "exceeds the 1048576 bytes" in str(e)
    e = outcome(data=frame(b"\xff" * 10))
    assert isinstance(e, RequestError) and "not a valid ExpertRequest" in str(e)
    e = outcome(data=b"\x07" + frame(msg)[1:])
    assert isinstance(e, RequestError) and "invalid frame marker" in str(e)
    e = outcome(data=frame(b"x" * 20000, P2P.ERROR_MARKER))
    assert isinstance(e, RequestError) and "end-of-stream message" in str(e)
    assert isinstance(outcome(eof=False, idle=0.05), IdleStream)  # nothing starts
    e = outcome(data=frame(msg)[:20], eof=False, body=0.05)  # starts, then trickles: too slow
    assert isinstance(e, RequestError) and not isinstance(e, IdleStream) and "took longer" in str(e)


# -- one in-process peer and raw callers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    quiet_hivemind()
    p = InprocPeer(tmp_path_factory.mktemp("limits"))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def caller(peer):
    c = RawCaller(peer)
    yield c
    c.close()


@pytest.fixture(scope="module")
def other(peer):
    c = RawCaller(peer)
    yield c
    c.close()


@pytest.fixture
def fresh(peer):
    """The module's peer with default limits (counters afresh); afterwards: nothing held, nothing unhandled,
    the batcher running and the real forward pass back."""
    peer.configure()
    batcher = peer.served.batcher
    velocity = batcher.velocity
    yield peer
    batcher.velocity = velocity
    if batcher._task is None or batcher._task.done():
        peer.on_loop(batcher.start)
    assert peer.quiet() == {"bytes": 0, "streams": 0, "queued_rows": 0, "queue": 0, "unary_tasks": 0}
    assert not peer.unhandled
    peer.configure()


def expected(peer, x, t, labels, guidance=2.0):
    from diffswarm.experts.expert import Expert

    if not hasattr(peer, "_local"):
        peer._local = Expert.from_checkpoint(peer.checkpoint)
    return peer._local.velocity(x, t, labels, guidance)


def served_correctly(peer, caller, rows=3, seed=11) -> bool:
    msg, x, t, labels = valid_request(rows, seed=seed)
    resp = caller.run(caller.unary("rpc_velocity", msg))
    v, _ = decode_response(list(resp.tensors), resp.metadata, rows, (1, 8, 8))
    return torch.allclose(v, expected(peer, x, t, labels), atol=1e-5)


def wait_until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def stop_worker(peer):
    """Stop the batcher's worker: requests queue up and wait (the fixture restarts it)."""
    task = peer.served.batcher._task
    peer.on_loop(task.cancel)
    assert wait_until(lambda: peer.on_loop(task.done))


def test_an_oversized_stream_is_refused_before_the_rest_is_read(fresh, caller):
    spec = fresh.served.spec  # 1x8x8: at most 8192 rows = 2.2 MB of tensors
    limit = spec.max_request_bytes
    chunk = b"\0" * STREAM_CHUNK_BYTES

    async def go():
        reader, writer = await caller.open("rpc_velocity_stream")
        answer = asyncio.ensure_future(read_frame(reader, timeout=30))
        # a request that claims 8x the rows the expert takes, sent 1 MiB at a time, up to 64 MiB
        head = runtime_pb2.Tensor(dtype="float32", size=[8 * spec.max_rows, 1, 8, 8], buffer=chunk)
        sent = 0
        try:
            for i in range(64):
                part = head if i == 0 else runtime_pb2.Tensor(buffer=chunk)
                msg = runtime_pb2.ExpertRequest(uid=spec.uid if i == 0 else "", tensors=[part],
                                                metadata=request_metadata(2.0) if i == 0 else b"")
                writer.write(frame(msg.SerializeToString()))
                await writer.drain()
                sent += 1
                await asyncio.wait({answer}, timeout=0.05)
                if answer.done():
                    break
        except (ConnectionError, OSError):
            pass
        result = await answer
        writer.close()
        return result, sent

    (kind, text), sent = caller.run(go(), timeout=60)
    assert kind == "error" and classify_error(text) == ("refused", None), text
    assert f"streamed request exceeds {limit} bytes" in text
    held = fresh.on_loop(lambda: fresh.servicer.budget.peak)
    print(f"\noversized stream: refused after {sent} of 64 MiB parts sent; the peer held at most {held} bytes "
          f"(bound {limit} + one part)")
    assert held <= limit + MAX_STREAM_PART_BYTES  # what the peer ever held: the bound, not 64 MiB
    assert sent <= math.ceil(limit / STREAM_CHUNK_BYTES) + 3  # refused while the caller was still sending
    assert served_correctly(fresh, caller)


@pytest.mark.parametrize("rpc, bound", [("rpc_velocity_stream", MAX_STREAM_PART_BYTES),
                                        ("rpc_velocity_session", MAX_SESSION_MESSAGE_BYTES),
                                        ("rpc_router", 16 << 10)])
def test_a_huge_declared_message_is_refused_from_its_header(fresh, caller, rpc, bound):
    async def go():
        reader, writer = await caller.open(rpc)
        writer.write(P2P.MESSAGE_MARKER + (1 << 40).to_bytes(8, "big") + b"\0" * 1000)  # claims 1 TiB
        await writer.drain()
        got = await read_frame(reader, timeout=10)
        writer.close()
        return got

    kind, text = caller.run(go())
    assert kind == "error" and f"a message of {1 << 40} bytes exceeds the {bound} bytes" in text
    assert classify_error(text) == ("refused", None)
    assert fresh.on_loop(lambda: fresh.servicer.budget.peak) == 0  # nothing of it was held


def test_a_session_flooded_by_a_caller_that_never_reads_stays_bounded_and_is_closed(fresh, caller):
    limits = fresh.configure(session_inflight=4, write_timeout=1.0, rate_rows=0)
    rows = 4096  # ~1.1 MB per request, 1 MiB per answer: the answers fill every buffer on the way
    msgs = [valid_request(rows, seed=i, request_id=i)[0].SerializeToString() for i in range(64)]
    size = len(msgs[0])
    before = dict(fresh.servicer.stats)

    async def flood(writer):
        for i, m in enumerate(msgs):
            writer.write(frame(m))
            await writer.drain()
            flood.sent = i + 1

    flood.sent = 0

    async def start():
        reader, writer = await caller.open("rpc_velocity_session")
        return reader, writer, asyncio.ensure_future(flood(writer))

    reader, writer, task = caller.run(start())
    peak_caller, t0 = 0, time.monotonic()
    while fresh.servicer.stats["stuck"] == before.get("stuck", 0) and time.monotonic() - t0 < 30:
        peak_caller = max(peak_caller, fresh.on_loop(lambda: fresh.servicer.budget.by_caller.get(caller.id, 0)))
        time.sleep(0.01)
    took = time.monotonic() - t0
    answered = fresh.servicer.stats["answered"] - before.get("answered", 0)
    peak = fresh.on_loop(lambda: fresh.servicer.budget.peak)
    print(f"\nsession flood: {flood.sent} of 64 requests of {size} B sent, {answered} answered, the peer held at most "
          f"{peak} B of requests, closed the session {took:.1f}s later")
    assert fresh.servicer.stats["stuck"] == before.get("stuck", 0) + 1, "the stuck session was not closed"
    assert peak <= limits.session_inflight * size  # never more than session_inflight requests held
    assert answered < 64  # the peer did not answer the whole flood into memory
    assert served_correctly(fresh, caller)  # and kept serving everyone meanwhile

    async def cleanup():
        task.cancel()
        writer.transport.abort()
        await asyncio.gather(task, return_exceptions=True)

    caller.run(cleanup())


def test_an_idle_session_is_closed_and_the_client_can_open_another(fresh, caller):
    fresh.configure(session_idle=0.3)

    async def go():
        reader, writer = await caller.open("rpc_velocity_session")
        got = await read_frame(reader, timeout=5)
        writer.close()
        return got

    assert caller.run(go()) == ("eof", None)  # closed quietly, no error
    assert served_correctly(fresh, caller)


def test_too_many_streams_from_one_caller_or_in_total_are_refused_busy(fresh, caller, other):
    fresh.configure(max_streams_per_caller=3, max_streams=4)

    async def open_session(c):
        return await c.open("rpc_velocity_session")

    def open_streams():
        return fresh.on_loop(lambda: fresh.servicer.slots.open_total)

    mine = [caller.run(open_session(caller)) for _ in range(3)]
    assert wait_until(lambda: open_streams() == 3)
    reader, writer = caller.run(open_session(caller))
    kind, text = caller.run(read_frame(reader, timeout=5))
    assert kind == "error" and classify_error(text) == ("busy", 0.5) and "this caller already has 3" in text
    theirs = other.run(open_session(other))  # another caller still gets in...
    # (p2pd opens streams lazily: one that is neither read nor written may reach the peer after a later one)
    assert wait_until(lambda: open_streams() == 4)
    r2, w2 = other.run(open_session(other))  # ...until the peer-wide limit
    kind, text = other.run(read_frame(r2, timeout=5))
    assert kind == "error" and "the peer has 4 streams open" in text
    # the open session works: a request over it is answered
    msg, x, t, labels = valid_request(2, request_id=5)
    other.run(other.send(theirs[1], frame(msg.SerializeToString())))
    kind, body = other.run(read_frame(theirs[0], timeout=10))
    assert kind == "msg" and load_metadata(runtime_pb2.ExpertResponse.FromString(body).metadata)["id"] == 5
    for _, w in mine:
        caller.loop.call_soon_threadsafe(w.close)
    assert wait_until(lambda: open_streams() == 1)  # closed sessions give their slots back at once
    reader, writer = caller.run(open_session(caller))
    assert caller.run(read_frame(reader, timeout=0.5)) == ("timeout", None)  # admitted: no error, stays open
    for c, w in ((caller, writer), (other, theirs[1]), (other, w2)):
        c.loop.call_soon_threadsafe(w.close)


def test_rate_limit_answers_busy_with_retry_after_and_serves_an_honest_caller(fresh, caller, other):
    # 25 rows/s: the second call of 16 rows is busy if it arrives within 0.48 s of the first (the bucket refills 4
    # rows of the 12 missing in 0.16 s): room for a slow machine between two calls
    fresh.configure(rate_rows=25.0, burst_rows=20)
    msg16 = valid_request(16)[0]
    caller.run(caller.unary("rpc_velocity", msg16))
    with pytest.raises(P2PHandlerError) as e:
        caller.run(caller.unary("rpc_velocity", msg16))
    code, retry = classify_error(e.value)
    assert code == "busy" and 0.2 < retry <= 0.52, str(e.value)
    assert "rate limit of 25 rows/s" in str(e.value)
    time.sleep(retry + 0.02)
    caller.run(caller.unary("rpc_velocity", msg16))  # after retry_after: served
    with pytest.raises(P2PHandlerError) as e:  # larger than the burst: never fits, refused (not busy)
        caller.run(caller.unary("rpc_velocity", valid_request(21)[0]))
    assert classify_error(e.value) == ("refused", None) and "split it" in str(e.value)

    async def session_twice():  # over a session the busy answer is metadata
        reader, writer = await caller.open("rpc_velocity_session")
        out = []
        for i in range(2):
            writer.write(frame(valid_request(16, request_id=i)[0].SerializeToString()))
            await writer.drain()
            kind, body = await read_frame(reader)
            out.append(load_metadata(runtime_pb2.ExpertResponse.FromString(body).metadata))
        writer.close()
        return out

    time.sleep(0.8)  # the bucket is full again
    ok, busy = caller.run(session_twice())
    assert ok["rows"] == 16 and "error" not in ok
    assert busy["id"] == 1 and busy["code"] == "busy" and classify_error(busy)[0] == "busy"
    assert 0 < busy["retry_after"] <= 0.52

    # an honest caller under the limit (8 rows every 0.4 s = 20 rows/s) is served every time
    served = 0
    for i in range(10):
        msg, x, t, labels = valid_request(8, seed=i)
        resp = other.run(other.unary("rpc_velocity", msg))
        v, _ = decode_response(list(resp.tensors), resp.metadata, 8, (1, 8, 8))
        served += torch.allclose(v, expected(fresh, x, t, labels), atol=1e-5)
        time.sleep(0.4)
    assert served == 10


def test_a_full_queue_or_memory_budget_answers_busy(fresh, caller):
    size = valid_request(4, request_id=0)[0].ByteSize()

    async def session(n):
        reader, writer = await caller.open("rpc_velocity_session")
        for i in range(n):
            writer.write(frame(valid_request(4, seed=i, request_id=i)[0].SerializeToString()))
        await writer.drain()
        kind, body = await read_frame(reader)
        return reader, writer, load_metadata(runtime_pb2.ExpertResponse.FromString(body).metadata)

    def finish(reader, writer):
        """The worker again: the two queued requests are answered."""
        fresh.on_loop(fresh.served.batcher.start)
        got = [caller.run(read_frame(reader)) for _ in range(2)]
        caller.loop.call_soon_threadsafe(writer.close)
        return sorted(load_metadata(runtime_pb2.ExpertResponse.FromString(b).metadata)["id"] for _, b in got)

    # the queue: two requests wait (8 rows), a third would make 12 > 10: busy, retry_after from the throughput
    fresh.configure(max_queue_rows=10)
    stop_worker(fresh)
    reader, writer, meta = caller.run(session(3))
    assert meta["id"] == 2 and meta["code"] == "busy" and "queue is full" in meta["error"]
    assert meta["retry_after"] == pytest.approx(max(2 / fresh.served.batcher.throughput, 0.05), rel=0.01)
    assert finish(reader, writer) == [0, 1]
    fresh.quiet()

    # the memory budget: two requests of this caller are held, a third is busy
    fresh.configure(max_caller_inflight_bytes=int(2.5 * size))
    stop_worker(fresh)
    reader, writer, meta = caller.run(session(3))
    assert meta["id"] == 2 and meta["code"] == "busy" and "out of memory budget" in meta["error"]
    assert finish(reader, writer) == [0, 1]


def test_internal_errors_carry_only_an_id_that_the_peer_logs(fresh, caller, caplog):
    def broken(x, t, labels, g):
        raise RuntimeError("secret: /home/volunteer/.ssh/id_rsa")

    fresh.served.batcher.velocity = broken
    caplog.set_level(logging.ERROR, logger="diffswarm.peer.rpc")
    msg = valid_request(3, request_id=1)[0]
    with pytest.raises(P2PHandlerError) as e:
        caller.run(caller.unary("rpc_velocity", msg))
    texts = [str(e.value)]

    async def session():
        reader, writer = await caller.open("rpc_velocity_session")
        writer.write(frame(msg.SerializeToString()))
        kind, body = await read_frame(reader)
        writer.close()
        return load_metadata(runtime_pb2.ExpertResponse.FromString(body).metadata)

    meta = caller.run(session())
    assert meta["code"] == "internal" and meta["id"] == 1 and classify_error(meta) == ("internal", None)
    texts.append(format_error(meta["code"], meta["error"]))
    parts = [runtime_pb2.ExpertRequest(uid=msg.uid if i == 0 else "", tensors=[p],
                                       metadata=msg.metadata if i == 0 else b"")
             for i, p in enumerate(stream_parts(list(msg.tensors)))]
    with pytest.raises(P2PHandlerError) as e:
        caller.run(caller.stream("rpc_velocity_stream", parts))
    texts.append(str(e.value))
    ids = []
    for text in texts:
        assert classify_error(text)[0] == "internal", text
        assert "secret" not in text and "RuntimeError" not in text and "Traceback" not in text and "ssh" not in text
        ids.append(text.split("logged there as ")[1].split(")")[0])
    assert meta["error_id"] == ids[1]
    logged = {r.getMessage().split()[2]: r for r in caplog.records if r.getMessage().startswith("internal error")}
    for i in ids:  # each id is in the peer's log, with the traceback
        assert i in logged and "secret" in str(logged[i].exc_info[1])
    assert fresh.servicer.stats["internal"] >= 3


def test_callers_that_give_up_or_vanish_leave_nothing_behind(fresh, caller):
    base_tasks = fresh.tasks()
    internal = fresh.servicer.stats["internal"]
    stop_worker(fresh)  # nothing gets answered: every caller below gives up or vanishes mid-way
    msg, *_ = valid_request(3, request_id=0)
    for _ in range(5):  # unary calls past their deadline (hivemind cancels the handler)
        with pytest.raises(TimeoutError):
            caller.run(caller.unary("rpc_velocity", msg, timeout=0.2))

    async def vanish(rpc, data):
        reader, writer = await caller.open(rpc)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()

    body = msg.SerializeToString()
    for _ in range(3):
        caller.run(vanish("rpc_velocity_stream", frame(body)[: len(body) // 2]))  # stops mid-tensor
        caller.run(vanish("rpc_velocity_stream", frame(body)))  # stops before the end of its stream
        caller.run(vanish("rpc_velocity_session", frame(body) * 3))  # requests in flight, then gone
        caller.run(vanish("rpc_velocity_session", frame(body)[:3]))  # stops mid-header
        caller.run(vanish("rpc_router", b""))  # opens and leaves
    time.sleep(0.3)
    fresh.on_loop(fresh.served.batcher.start)

    async def reset(n, rows):
        """Answers pile up unread and the caller leaves mid-message."""
        reader, writer = await caller.open("rpc_velocity_session")
        for i in range(n):
            writer.write(frame(valid_request(rows, seed=i, request_id=i)[0].SerializeToString()))
        writer.write(frame(body)[: len(body) // 2])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    for n, rows in ((1, 2), (3, 2), (8, 2000), (16, 2000)):
        caller.run(reset(n, rows))
    held = fresh.quiet()
    assert held == {"bytes": 0, "streams": 0, "queued_rows": 0, "queue": 0, "unary_tasks": 0}, held
    deadline = time.monotonic() + 5
    while fresh.tasks() > base_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fresh.tasks() <= base_tasks
    assert fresh.servicer.stats["cancelled"] >= 5
    assert fresh.servicer.stats["internal"] == internal  # a caller that vanishes is not the peer's failure
    assert served_correctly(fresh, caller)


def test_end_of_stream_and_router_requests_are_bounded_too(fresh, caller):
    async def go():
        reader, writer = await caller.open("rpc_velocity_stream")
        writer.write(END_OF_STREAM)  # a stream with no request at all
        await writer.drain()
        got = await read_frame(reader)
        writer.close()
        return got

    kind, text = caller.run(go())
    assert kind == "error" and "carried no request" in text and classify_error(text)[0] == "refused"
    with pytest.raises(P2PHandlerError, match=r"\[diffswarm:refused\] this peer does not serve a router"):
        caller.run(caller.stream("rpc_router", [runtime_pb2.ExpertUID(uid="")], runtime_pb2.ExpertInfo))
