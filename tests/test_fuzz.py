"""Property-based fuzz of every RPC of a running peer, and of record parsing.

One in-process peer serves a toy expert and the toy router on 127.0.0.1 (``peer_harness``). A raw caller
sends it what hypothesis makes up: malformed protobufs, wrong dtypes, shapes and ranks, empty and
oversized batches, NaN/inf inputs, unknown expert ids, huge and non-msgpack metadata, session messages with
missing or duplicate ids, streams cut short or mid-tensor, frames that declare giant lengths. The property:

- every answer is what the wire contract says (the oracle runs ``wire.check_request`` on the same bytes):
  a valid request is answered with the velocity the local expert computes (or ``busy``), anything else
  with a ``refused`` error; never an ``internal`` error, an error that is not a diffswarm answer, a hang or
  an unhandled exception on the peer;
- after every example a second caller gets a correct answer to a valid request;
- at the end nothing is held (bytes, streams, queued rows, hivemind's unary tasks, asyncio tasks) and the
  process's resident memory grew by less than ``RSS_BOUND_MIB``.

Record parsing (``ExpertRecord``/``RouterProvider``/``SwarmManifest.from_dict``, the manifest's signature
check, ``parse_entries``, ``parse_manifests``) gets random dicts, values, subkeys and times: a record or a
``RecordError``, nothing else; a manifest verifies only with the owner's signed fields untouched.

CI runs ~170 RPC examples and ~200 record examples in well under a minute; ``DIFFSWARM_FUZZ_EXAMPLES=N``
runs N per test (``-s`` prints the counts and RSS figures the closing note quotes).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter

import msgpack
import numpy as np
import pytest
import torch
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.utils import P2PHandlerError
from hivemind.proto import runtime_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peer_harness import (
    END_OF_STREAM,
    SHAPE,
    InprocPeer,
    RawCaller,
    RawMessage,
    frame,
    quiet_hivemind,
    read_frame,
    rss_mib,
    valid_request,
)

from diffswarm.dht.entries import parse_entries, parse_manifests, peer_id_of_public_key
from diffswarm.dht.names import sign_manifest, swarm_name_of, verify_manifest
from diffswarm.dht.records import RECORD_VERSION, ExpertRecord, RouterProvider, SwarmManifest
from diffswarm.dht.schema import RecordError
from diffswarm.peer.limits import PeerLimits
from diffswarm.protocol.wire import (
    MAX_SESSION_MESSAGE_BYTES,
    MAX_STREAM_PART_BYTES,
    PROTOCOL_VERSION,
    STREAM_CHUNK_BYTES,
    RequestError,
    check_request,
    classify_error,
    combine_parts,
    decode_response,
    load_metadata,
    session_request_id,
    stream_parts,
)

N = int(os.environ.get("DIFFSWARM_FUZZ_EXAMPLES", "0"))
RSS_BOUND_MIB = 150  # the process's resident memory may grow by less than this over the fuzz run
UID = "c0-fm"
CALL_TIMEOUT = 15.0  # no answer within this: the peer hung (a failure)


class Case:
    """A drawn example with a short repr (hypothesis prints failing examples; megabytes of tensor bytes are
    no help there)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        def short(v):
            if isinstance(v, (bytes, str)) and len(v) > 80:
                return f"<{type(v).__name__} of {len(v)}: {v[:40]!r}...>"
            if isinstance(v, list) and len(v) > 4:
                return f"<list of {len(v)}>"
            return repr(v)[:200]
        return "Case(" + ", ".join(f"{k}={short(v)}" for k, v in self.__dict__.items()) + ")"


def examples(ci: int) -> int:
    return N or ci


def fuzz_settings(ci: int):
    return settings(max_examples=examples(ci), deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


# -- strategies: request pieces -----------------------------------------------------------------------

NONE, FP16 = runtime_pb2.CompressionType.NONE, runtime_pb2.CompressionType.FLOAT16
DTYPES = st.sampled_from(["float32", "float16", "float64", "int64", "int32", "int8", "bool", "bfloat16", "uint8",
                          "complex64", "U8", "U100000", "O", "V16", "S3", "", "float32,float32", "<f4", "M8"]) \
    | st.text(max_size=12)
COMPRESSIONS = st.sampled_from(list(runtime_pb2.CompressionType.values())) | st.integers(-3, 50)
ANY = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
                   | st.binary(max_size=20),
                   lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                   max_leaves=10)


def values(role: str, n: int, flavour: str, rng) -> np.ndarray:
    if role == "labels":
        if flavour == "labels_out":
            return rng.choice(np.array([-2, 5, 2**62, -2**63], dtype=np.int64), n)
        a = rng.integers(-1, 5, n, dtype=np.int64)  # -1..4 (4 = the null label)
        return a.astype(np.int32) if flavour == "labels_int32" else a
    a = rng.standard_normal(n).astype(np.float32) if role == "x" else rng.random(n, dtype=np.float32)
    if flavour in ("nan", "inf", "huge") and n:
        a[rng.integers(0, n)] = {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[flavour]
    if flavour == "zeros":
        a[:] = 0
    if flavour == "t_out" and role == "t" and n:
        a[0] = 1.5
    return a


@st.composite
def tensor(draw, role: str, rows: int, flavour: str, mutate: bool):
    """One request tensor: valid for ``role`` and ``rows``; with ``mutate``, one to three fields changed."""
    shape = [rows, *SHAPE] if role == "x" else [rows]
    dtype = {"x": "float32", "t": "float32", "labels": "int64"}[role]
    compression = FP16 if role == "x" and draw(st.integers(0, 4)) == 0 else NONE
    mutations = draw(st.sets(st.sampled_from(["shape", "dtype", "compression", "buffer", "grad"]), min_size=1,
                             max_size=3)) if mutate else set()
    if "shape" in mutations:
        shape = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 12), max_size=6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = math.prod(shape) if shape else 1
    if n * 4 <= 3 << 20:
        a = values(role, n, flavour, rng)
        buf = (a.astype(np.float16) if compression == FP16 else a).tobytes()
        if flavour == "labels_int32" and role == "labels":
            dtype = "int32"
    else:  # declares more than fits in a message: a small buffer
        buf = rng.bytes(draw(st.integers(0, 4096)))
    if "dtype" in mutations:
        dtype = draw(DTYPES)
    if "compression" in mutations:
        compression = draw(COMPRESSIONS)
    if "buffer" in mutations:
        cut = draw(st.integers(0, len(buf)))
        buf = draw(st.sampled_from([buf[:cut], buf + rng.bytes(draw(st.integers(1, 64))), rng.bytes(cut)]))
    t = runtime_pb2.Tensor(buffer=buf, size=shape, dtype=dtype, requires_grad="grad" in mutations)
    t.compression = compression
    return t


@st.composite
def metadata(draw, request_id=None, mutate: bool = False):
    """Request metadata: valid, or (``mutate``) wrong fields, not a map, not msgpack, or above 4 KiB."""
    d = {"protocol": PROTOCOL_VERSION, "guidance": draw(st.sampled_from([0.0, 1.0, 2.0, 7.5]))}
    if request_id is not None:
        d["id"] = request_id
    kind = draw(st.sampled_from(["guidance", "protocol", "fields", "not_map", "garbage", "huge"])) if mutate \
        else "valid"
    if kind == "guidance":
        d["guidance"] = draw(st.floats() | st.integers(-10**6, 10**6) | st.booleans() | st.text(max_size=5))
    elif kind == "protocol":
        d["protocol"] = draw(ANY)
    elif kind == "fields":
        d.update(draw(st.dictionaries(st.text(max_size=8), ANY, max_size=4)))
    elif kind == "not_map":
        return msgpack.packb(draw(st.lists(ANY, max_size=3) | st.integers(0, 10)), use_bin_type=True)
    elif kind == "garbage":
        return draw(st.binary(max_size=64))
    elif kind == "huge":
        d["pad"] = "x" * draw(st.integers(4000, 20000))
    return msgpack.packb(d, use_bin_type=True)


ASPECTS = ["rows", "values", "tensor", "tensor", "list", "uid", "metadata"]


@st.composite
def request(draw, request_id=None, max_rows: int = 8192):
    """An ExpertRequest: valid (2 in 5), or with one to three aspects broken: the batch size (empty,
    oversized), the values (NaN, inf, t or labels out of range), a tensor's fields, the tensor list, the
    expert id, the metadata."""
    broken = set() if draw(st.integers(0, 4)) < 2 else draw(st.sets(st.sampled_from(ASPECTS), min_size=1,
                                                                     max_size=3))
    rows = draw(st.sampled_from([0, max_rows, max_rows + 1, 2**16]) if "rows" in broken
                else st.integers(1, 8) | st.sampled_from([64, max_rows]))
    flavour = draw(st.sampled_from(["nan", "inf", "huge", "t_out", "labels_out"] if "values" in broken
                                   else ["normal"] * 3 + ["zeros", "labels_int32"]))
    bad = draw(st.integers(0, 2)) if "tensor" in broken else None
    tensors = [draw(tensor(role, rows, flavour, i == bad)) for i, role in enumerate(("x", "t", "labels"))]
    if "list" in broken:
        how = draw(st.sampled_from(["drop", "extra", "shuffle", "empty"]))
        if how == "drop":
            del tensors[draw(st.integers(0, 2))]
        elif how == "extra":
            tensors.append(tensors[draw(st.integers(0, 2))])
        elif how == "shuffle":
            tensors = draw(st.permutations(tensors))
        else:
            tensors = []
    uid = draw(st.sampled_from(["", "c1-fm", "c0-ddpm", "x" * 5000]) | st.text(max_size=30)) \
        if "uid" in broken else UID
    return runtime_pb2.ExpertRequest(uid=uid, tensors=tensors,
                                     metadata=draw(metadata(request_id, mutate="metadata" in broken)))


# -- the oracle: what the wire contract says the answer must be -------------------------------------------


class Oracle:
    """Expected answers, from ``wire.check_request`` and the local copy of the expert."""

    def __init__(self, peer: InprocPeer):
        from diffswarm.experts.expert import Expert

        self.spec = peer.served.spec
        self.expert = Expert.from_checkpoint(peer.checkpoint)

    def verdict(self, uid: str, tensors, meta: bytes):
        """The decoded request if the peer must serve it, else None (it must be refused)."""
        try:
            return check_request(self.spec, uid, list(tensors), meta)
        except RequestError:
            return None

    def check_velocity(self, req, tensors, meta) -> None:
        """An ok answer carries the local expert's velocity for ``req``."""
        v, info = decode_response(list(tensors), meta, req.rows, SHAPE)
        with torch.inference_mode():
            want = self.expert.velocity(req.x, req.t, req.labels, req.guidance)
        tol = 2e-2 if req.compression == "float16" else 1e-5
        assert torch.allclose(v, want, atol=tol, rtol=tol), f"wrong velocity ({(v - want).abs().max():.3g})"
        assert info["rows"] == req.rows


def error_code(text_or_meta) -> str:
    code, _ = classify_error(text_or_meta)
    assert code in ("refused", "busy"), f"not a refusal or busy answer: {text_or_meta!r}"[:600]
    return code


# -- the fuzz fixture: peer, fuzzing caller, checking caller, counts ------------------------------------


class Fuzz:
    def __init__(self, tmp_dir):
        quiet_hivemind()
        self.peer = InprocPeer(tmp_dir, PeerLimits(write_timeout=2.0, read_timeout=2.0), router=True)
        self.caller = RawCaller(self.peer)  # sends the fuzz
        self.checker = RawCaller(self.peer)  # checks the peer after each example (its own rate bucket)
        self.oracle = Oracle(self.peer)
        self.counts: Counter[tuple[str, str]] = Counter()  # (rpc, outcome) -> examples
        self.crashes = 0
        self.check_valid()  # warm up both paths before measuring memory
        self.tasks = self.peer.tasks()
        self.rss_before = rss_mib(trim=True)
        self.rss: list[float] = []  # every 25 examples, allocator caches trimmed
        self.peak = self.rss_before  # the most seen after an example (untrimmed)
        self.t0 = time.monotonic()

    def count(self, rpc: str, outcome: str) -> None:
        self.counts[(rpc, outcome)] += 1

    def check_valid(self) -> None:
        """The peer still answers a valid request correctly, and nothing went unhandled on its loop."""
        msg, x, t, labels = valid_request(3, seed=int(time.monotonic() * 1000) % 1000)
        try:
            resp = self.checker.run(self.checker.unary("rpc_velocity", msg), timeout=CALL_TIMEOUT)
            self.oracle.check_velocity(self.oracle.verdict(msg.uid, msg.tensors, msg.metadata), resp.tensors,
                                       resp.metadata)
            assert not self.peer.unhandled, f"unhandled on the peer loop: {self.peer.unhandled}"
        except BaseException:
            self.crashes += 1
            raise

    def example(self, rpc: str, fn) -> None:
        """Run one example's ``fn`` (returns its outcome), then the health check; a failure counts as a crash."""
        try:
            outcome = fn()
        except BaseException:
            self.crashes += 1
            self.count(rpc, "CRASH")
            raise
        self.count(rpc, outcome)
        self.check_valid()
        self.peak = max(self.peak, rss_mib())
        if sum(self.counts.values()) % 25 == 0:
            self.rss.append(rss_mib(trim=True))

    def report(self) -> dict:
        held = self.peer.quiet()
        deadline = time.monotonic() + 10
        while self.peer.tasks() > self.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"held": held, "tasks": (self.tasks, self.peer.tasks()), "rss": (self.rss_before, rss_mib(trim=True)),
                "stats": dict(self.peer.servicer.stats), "seconds": time.monotonic() - self.t0}

    def close(self) -> None:
        self.caller.close()
        self.checker.close()
        self.peer.stop()


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    f = Fuzz(tmp_path_factory.mktemp("fuzz"))
    yield f
    f.close()


# -- rpc_velocity (unary) ---------------------------------------------------------------------------------


@st.composite
def unary_payload(draw):
    kind = draw(st.sampled_from(["request"] * 8 + ["garbage", "truncated"]))
    if kind == "garbage":
        return Case(kind=kind, data=draw(st.binary(max_size=2048)))
    msg = draw(request(max_rows=8192))
    data = msg.SerializeToString()
    if kind == "truncated":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    return Case(kind=kind, uid=msg.uid, sizes=[tuple(t.size) for t in msg.tensors], data=data)


def parse(msg_type, data: bytes):
    try:
        return msg_type.FromString(data)
    except Exception:
        return None


@fuzz_settings(60)
@given(case=unary_payload())
def test_fuzz_rpc_velocity(fuzz, case):
    data = case.data
    assume(len(data) < (4 << 20) - 4096)  # p2pd's unary cap: the caller's own daemon would not send more

    def one():
        c = fuzz.caller
        msg = parse(runtime_pb2.ExpertRequest, data)
        req = fuzz.oracle.verdict(msg.uid, msg.tensors, msg.metadata) if msg is not None else None
        try:
            resp = c.run(c.unary("rpc_velocity", RawMessage(data), timeout=CALL_TIMEOUT), timeout=CALL_TIMEOUT + 5)
        except P2PHandlerError as e:
            code = error_code(str(e))
            assert code == "busy" or req is None, f"a valid request was refused: {e}"
            return code
        assert req is not None, "an invalid request was answered"
        fuzz.oracle.check_velocity(req, resp.tensors, resp.metadata)
        return "ok"

    fuzz.example("rpc_velocity", one)


# -- rpc_velocity_session -----------------------------------------------------------------------------------


@st.composite
def session_frames(draw):
    """(frames, how it ends): requests with ids (some missing, duplicated, not ints), and sometimes a fatal
    frame (garbage, a giant declared length) or a cut (the caller vanishes)."""
    frames = []
    for _ in range(draw(st.integers(1, 6))):
        rid = draw(st.integers(0, 3) | st.sampled_from([None, "7", 1.5, 2**64 - 1, True]))
        frames.append(("msg", draw(request(request_id=rid, max_rows=2000)).SerializeToString()))
    end = draw(st.sampled_from(["end"] * 4 + ["garbage", "giant", "cut", "cut_header", "close"]))
    if end == "garbage":
        frames.append(("msg", draw(st.binary(min_size=1, max_size=256))))
    return Case(frames=frames, end=end, sizes=[len(b) for _, b in frames])


def session_expectations(oracle: Oracle, frames):
    """Per request id: the decoded requests that must be served (None: must be refused); and whether a frame
    ends the session with a refusal."""
    expect: dict = {}
    for _, body in frames:
        if len(body) > MAX_SESSION_MESSAGE_BYTES:  # refused from its length header, before the body is read
            return expect, True
        msg = parse(runtime_pb2.ExpertRequest, body)
        if msg is None:
            return expect, True  # not a protobuf: the peer ends the session (refused)
        try:
            rid = session_request_id(msg.metadata)
        except RequestError:
            expect.setdefault(None, []).append(None)
            continue
        expect.setdefault(rid, []).append(oracle.verdict(msg.uid, msg.tensors, msg.metadata))
    return expect, False


@fuzz_settings(40)
@given(case=session_frames())
def test_fuzz_rpc_velocity_session(fuzz, case):
    frames, end = case.frames, case.end
    expect, fatal = session_expectations(fuzz.oracle, frames)
    fatal = fatal or end == "giant"
    c = fuzz.caller

    async def go():
        reader, writer = await c.open("rpc_velocity_session")
        for _, body in frames:
            writer.write(frame(body))
        if end == "giant":
            writer.write(P2P.MESSAGE_MARKER + (MAX_SESSION_MESSAGE_BYTES + 1).to_bytes(8, "big"))
        elif end in ("end", "garbage"):
            writer.write(END_OF_STREAM)
        elif end == "cut_header":
            writer.write(P2P.MESSAGE_MARKER + b"\0\0")
        elif end == "cut":
            writer.write(frame(b"\x0a\x05c0-fm" + b"\0" * 100)[:60])
        await writer.drain()
        if end in ("cut", "cut_header", "close"):  # the caller vanishes with requests in flight
            writer.close()
            return []
        got = []
        while True:
            kind, body = await read_frame(reader, timeout=CALL_TIMEOUT)
            got.append((kind, body))
            if kind != "msg":
                break
        writer.close()
        return got

    def one():
        got = c.run(go(), timeout=2 * CALL_TIMEOUT)
        if not got:
            return "vanished"
        *answers, (last, text) = got
        assert last != "timeout", "the peer neither answered nor ended the session"
        if fatal:
            assert last == "error" and error_code(text) == "refused", (last, text)
        else:
            assert last == "eof", (last, text)
        left = {rid: list(reqs) for rid, reqs in expect.items()}
        outcomes = Counter()

        def take(rid, fits, what):
            """The first request still unanswered with id ``rid`` that ``fits`` this answer."""
            assert rid in left, f"an answer for an id never sent: {rid!r}"
            i = next((i for i, r in enumerate(left[rid]) if fits(r)), None)
            assert i is not None, f"{what} for id {rid!r}, but no such request is left: {left[rid]}"
            return left[rid].pop(i)

        decoded = [(load_metadata(r.metadata), r) for r in map(runtime_pb2.ExpertResponse.FromString,
                                                                (b for _, b in answers))]
        rank = {"ok": 0, "busy": 1, "refused": 2}  # served answers carry their rows: match them first
        decoded.sort(key=lambda a: rank["ok" if "error" not in a[0] else error_code(a[0])])
        for meta, resp in decoded:
            rid = meta.get("id")
            if "error" not in meta:  # served: a valid request with this id and as many rows
                rows = meta.get("rows")
                req = take(rid, lambda r, rows=rows: r is not None and r.rows == rows, "a served answer")
                fuzz.oracle.check_velocity(req, resp.tensors, meta)
                outcomes["ok"] += 1
            else:  # busy: a valid request with this id; refused: an invalid one
                code = error_code(meta)
                take(rid, lambda r, code=code: (r is None) == (code == "refused"), code)
                outcomes[code] += 1
        if not fatal:
            assert not any(left.values()), f"requests not answered: {left}"
        return "+".join(sorted(outcomes)) + ("+fatal" if fatal else "") or "empty"

    fuzz.example("rpc_velocity_session", one)


# -- rpc_velocity_stream ---------------------------------------------------------------------------------------


@st.composite
def stream_spec(draw):
    msg = draw(request(max_rows=8192))
    parts = stream_parts(list(msg.tensors))
    how = draw(st.sampled_from(["normal"] * 4 + ["tiny_parts", "junk_part", "drop_part", "dup_part", "empty",
                                                  "giant", "huge_header", "garbage", "no_end", "cut_mid_tensor"]))
    if how == "tiny_parts" and parts:  # x split into many small parts (or a few larger than the bound)
        x = msg.tensors[0] if msg.tensors else runtime_pb2.Tensor()
        size = max(1, len(x.buffer) // draw(st.integers(1, 40)))
        parts = stream_parts_sized(x, size) + parts[len(stream_parts([x])):]
    elif how == "junk_part":
        parts.insert(draw(st.integers(0, len(parts))), runtime_pb2.Tensor(buffer=draw(st.binary(max_size=512))))
    elif how == "drop_part" and parts:
        del parts[draw(st.integers(0, len(parts) - 1))]
    elif how == "dup_part" and parts:
        parts.append(parts[draw(st.integers(0, len(parts) - 1))])
    elif how == "empty":
        parts = []
    msgs = [runtime_pb2.ExpertRequest(uid=msg.uid if i == 0 else "", tensors=[p],
                                      metadata=msg.metadata if i == 0 else b"").SerializeToString()
            for i, p in enumerate(parts)]
    if how == "garbage":
        msgs.insert(draw(st.integers(0, len(msgs))), draw(st.binary(min_size=1, max_size=256)))
    return Case(how=how, uid=msg.uid, parts=len(parts), sizes=[len(m) for m in msgs], msgs=msgs)


def stream_parts_sized(t: runtime_pb2.Tensor, size: int) -> list:
    from hivemind.utils.streaming import split_for_streaming

    return list(split_for_streaming(t, size))


def stream_verdict(oracle: Oracle, case: Case):
    """The decoded request if the peer must serve this stream (from the messages as sent), else None;
    ``"gone"`` when the caller leaves before the end."""
    if case.how in ("no_end", "cut_mid_tensor"):
        return "gone"
    parsed = [parse(runtime_pb2.ExpertRequest, m) for m in case.msgs]
    if case.how in ("giant", "huge_header") or not parsed or any(m is None for m in parsed) \
            or any(len(m) > MAX_STREAM_PART_BYTES for m in case.msgs):
        return None
    uid, meta = parsed[0].uid, parsed[0].metadata  # the first message names the expert and carries the metadata
    parts = [p for m in parsed for p in m.tensors]
    spec = oracle.spec
    if uid != spec.uid or sum(len(p.buffer) for p in parts) > spec.max_request_bytes \
            or len(parts) > spec.max_stream_parts:
        return None
    return oracle.verdict(uid, combine_parts(parts), meta)


@fuzz_settings(40)
@given(case=stream_spec())
def test_fuzz_rpc_velocity_stream(fuzz, case):
    msgs, how = case.msgs, case.how
    req = stream_verdict(fuzz.oracle, case)
    c = fuzz.caller

    async def go():
        reader, writer = await c.open("rpc_velocity_stream")
        answer = asyncio.ensure_future(read_frame(reader, timeout=CALL_TIMEOUT))
        try:
            for m in msgs:
                writer.write(frame(m))
            if how == "giant":  # keeps sending 1 MiB parts: refused after the expert's largest request
                chunk = runtime_pb2.ExpertRequest(tensors=[runtime_pb2.Tensor(buffer=b"\0" * STREAM_CHUNK_BYTES)])
                for _ in range(32):
                    writer.write(frame(chunk.SerializeToString()))
                    await writer.drain()
                    await asyncio.wait({answer}, timeout=0.02)
                    if answer.done():
                        break
            elif how == "huge_header":
                writer.write(P2P.MESSAGE_MARKER + (MAX_STREAM_PART_BYTES + 1).to_bytes(8, "big"))
            elif how == "cut_mid_tensor" and msgs:
                writer.write(frame(msgs[-1])[: len(msgs[-1]) // 2])
            if how not in ("no_end", "cut_mid_tensor"):
                writer.write(END_OF_STREAM)
            await writer.drain()
        except (ConnectionError, OSError):  # the peer refused and closed while we were sending
            pass
        if req == "gone":
            answer.cancel()
            writer.close()
            return []
        got = [await answer]
        while got[-1][0] == "msg":
            got.append(await read_frame(reader, timeout=CALL_TIMEOUT))
        writer.close()
        return got

    def one():
        got = c.run(go(), timeout=2 * CALL_TIMEOUT)
        if req == "gone":
            return "vanished"
        *answers, (last, text) = got
        assert last != "timeout", "the peer neither answered nor closed the stream"
        if not answers:
            assert last == "error", f"no answer and no error ({last})"
            code = error_code(text)
            assert code == "busy" or req is None, f"a valid streamed request was refused: {text}"
            return code
        assert last == "eof" and req is not None, "an invalid streamed request was answered"
        resps = [runtime_pb2.ExpertResponse.FromString(b) for _, b in answers]
        fuzz.oracle.check_velocity(req, combine_parts([p for r in resps for p in r.tensors]), resps[0].metadata)
        return "ok"

    fuzz.example("rpc_velocity_stream", one)


# -- rpc_info and rpc_router ---------------------------------------------------------------------------------


@fuzz_settings(15)
@given(data=st.binary(max_size=256) | st.builds(lambda u: runtime_pb2.ExpertUID(uid=u).SerializeToString(),
                                                 st.text(max_size=100)))
def test_fuzz_rpc_info(fuzz, data):
    def one():
        c = fuzz.caller
        try:
            resp = c.run(c.unary("rpc_info", RawMessage(data), runtime_pb2.ExpertInfo), timeout=CALL_TIMEOUT)
        except P2PHandlerError as e:
            assert parse(runtime_pb2.ExpertUID, data) is None, f"a valid info request was refused: {e}"
            return error_code(str(e))
        info = msgpack.unpackb(resp.serialized_info, raw=False)
        assert info["experts"][0]["expert_id"] == UID
        return "ok"

    fuzz.example("rpc_info", one)


@fuzz_settings(15)
@given(msgs=st.lists(st.binary(max_size=128) | st.sampled_from(["", "ab" * 32, "router"]).map(
    lambda u: runtime_pb2.ExpertUID(uid=u).SerializeToString()), min_size=0, max_size=3),
    end=st.sampled_from(["end", "end", "end", "close"]))
def test_fuzz_rpc_router(fuzz, msgs, end):
    c = fuzz.caller
    sha = fuzz.peer.peer.router.sha256
    msgs = [runtime_pb2.ExpertUID(uid=sha).SerializeToString() if m == b"router" else m for m in msgs]

    async def go():
        reader, writer = await c.open("rpc_router")
        for m in msgs:
            writer.write(frame(m))
        if end == "end":
            writer.write(END_OF_STREAM)
        await writer.drain()
        if end == "close":
            writer.close()
            return []
        got = [await read_frame(reader, timeout=CALL_TIMEOUT)]
        while got[-1][0] == "msg":
            got.append(await read_frame(reader, timeout=CALL_TIMEOUT))
        writer.close()
        return got

    def one():
        got = c.run(go(), timeout=2 * CALL_TIMEOUT)
        if end == "close":
            return "vanished"
        parsed = [parse(runtime_pb2.ExpertUID, m) for m in msgs]
        served = len(parsed) == 1 and parsed[0] is not None and parsed[0].uid in ("", sha)
        *chunks, (last, text) = got
        if not served:
            assert not chunks and last == "error", got[:1]
            return error_code(text)
        assert last == "eof" and b"".join(runtime_pb2.ExpertInfo.FromString(b).serialized_info
                                         for _, b in chunks) == fuzz.peer.router_bytes
        return "ok"

    fuzz.example("rpc_router", one)


# -- record parsing ---------------------------------------------------------------------------------------------

NOW = 1_000_000.0  # the DHT time the parsers are told


def _expert_dict() -> dict:
    return dict(version=RECORD_VERSION, expert_id="c0-fm", cluster=0, num_clusters=2, partition_hash="ph",
                objective="fm", schedule="flow", image_shape=[1, 8, 8], num_classes=4, checkpoint_sha256="ab" * 32,
                software="0.1.0", protocol=1, state="online", progress=1.0, throughput=10.0, load=0.0, max_batch=64,
                peer_id="QmPeer", addrs=["/ip4/127.0.0.1/tcp/1"], updated=NOW, train_steps=10, final_loss=0.5)


def _provider_dict() -> dict:
    return dict(version=RECORD_VERSION, router_sha256="cd" * 32, router_bytes=1000, software="0.1.0",
                peer_id="QmPeer", addrs=["/ip4/127.0.0.1/tcp/1"], updated=NOW)


def _manifest_fields() -> dict:
    return dict(version=RECORD_VERSION, swarm="fuzz", partition_hash="ph", num_clusters=2, dataset_id="fashion:8",
                image_shape=[1, 8, 8], num_classes=4, router_sha256="cd" * 32, router_weights_sha256="ef" * 32,
                router_bytes=1000, protocol=1, software="0.1.0", issued=NOW)


SPECIALS = st.sampled_from([float("nan"), float("inf"), -1, 0, 2**70, "", [], [1, 2, 3, 4], "x" * 10_000,
                            ["/ip4/1.2.3.4/tcp/1"] * 1000, b"\0" * 5000])


@st.composite
def mutated(draw, base: dict):
    """``base`` with fields replaced by anything, removed, or added; or not a dict at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY)
    d = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(d)), max_size=4)):
        if draw(st.booleans()):
            d[key] = draw(ANY | SPECIALS)
        else:
            d.pop(key, None)
    d.update(draw(st.dictionaries(st.text(max_size=10), ANY, max_size=3)))
    return d


def parsed_or_record_error(fn, *args) -> str:
    """"ok" or "RecordError"; anything else raised fails the test."""
    try:
        fn(*args)
        return "ok"
    except RecordError:
        return "RecordError"


RECORD_COUNTS: Counter = Counter()


@fuzz_settings(60)
@given(d=mutated(_expert_dict()))
def test_fuzz_expert_record_from_dict(d):
    RECORD_COUNTS[("ExpertRecord.from_dict", parsed_or_record_error(ExpertRecord.from_dict, d))] += 1


@fuzz_settings(40)
@given(d=mutated(_provider_dict()))
def test_fuzz_router_provider_from_dict(d):
    RECORD_COUNTS[("RouterProvider.from_dict", parsed_or_record_error(RouterProvider.from_dict, d))] += 1


@pytest.fixture(scope="module")
def owner():
    """(key, ssh public key, peer id, a manifest it signed, the swarm's full name)."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey()
    pub = key.get_public_key().to_bytes()
    return key, pub, peer_id_of_public_key(pub), sign_manifest(key, _manifest_fields()), swarm_name_of("fuzz", key)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_swarm_manifest_from_dict_and_signature(owner, data):
    """A mutated signed manifest: a RecordError from parsing or from the signature check, or (untouched
    signed fields) a manifest that verifies."""
    _, _, _, manifest, name = owner
    d = data.draw(mutated(manifest.to_dict()))

    def parse_and_verify(d):
        verify_manifest(SwarmManifest.from_dict(d), name)

    outcome = parsed_or_record_error(parse_and_verify, d)
    if outcome == "ok":  # only a manifest whose signed fields are the owner's verifies
        assert SwarmManifest.from_dict(d).signed_bytes() == manifest.signed_bytes()
    RECORD_COUNTS[("SwarmManifest.from_dict+verify", outcome)] += 1


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_parse_entries_and_manifests(owner, data):
    _, pub, peer_id, manifest, _ = owner
    good = b"[owner:" + pub + b"]"
    subkeys = st.sampled_from([good + b"/c0-fm", good]) | st.sampled_from(
        [b"[owner:garbage]", good + good, b"no owner", "text subkey", 7, None]) | st.binary(max_size=40)
    kind = data.draw(st.sampled_from(["experts", "routers", "manifests"]))
    base = {"experts": _expert_dict(), "routers": _provider_dict(), "manifests": manifest.to_dict()}[kind]

    def value():
        if data.draw(st.integers(0, 2)) == 0:  # a valid record of the subkey's owner (it parses with a good subkey)
            return {**base, "peer_id": peer_id} if kind != "manifests" else dict(base)
        d = data.draw(mutated(base))
        if isinstance(d, dict) and kind != "manifests" and data.draw(st.booleans()):
            d["peer_id"] = peer_id  # the owner key's peer id: these can parse
        return d

    entries = {data.draw(subkeys): value() for _ in range(data.draw(st.integers(0, 4)))}
    if data.draw(st.integers(0, 9)) == 0:
        entries = None
    now = data.draw(st.sampled_from([NOW, NOW, NOW + 10_000, None]))
    if kind == "manifests":
        recs, errors = parse_manifests(entries, now)  # never raises
    else:
        cls = ExpertRecord if kind == "experts" else RouterProvider
        recs, errors = parse_entries(entries, cls, now)  # never raises
        assert all(isinstance(r, cls) and r.peer_id == peer_id for r in recs)
    assert len(recs) + len(errors) == len(entries or {}) and all(isinstance(e, str) for e in errors)
    RECORD_COUNTS[(f"parse_{'manifests' if kind == 'manifests' else 'entries'}", "ok" if recs else "errors")] += 1


# -- the closing checks: nothing held, memory bounded, counts printed ------------------------------------------------


def test_fuzz_left_nothing_behind_and_memory_stayed_bounded(fuzz):
    """Runs after the fuzz tests of this module (pytest keeps file order)."""
    r = fuzz.report()
    rpcs = sorted({rpc for rpc, _ in fuzz.counts})
    print(f"\nfuzz: {sum(fuzz.counts.values())} requests over {len(rpcs)} RPCs in {r['seconds']:.1f}s, "
          f"crashes {fuzz.crashes}")
    for rpc in rpcs:
        outcomes = {o: n for (p, o), n in sorted(fuzz.counts.items()) if p == rpc}
        print(f"  {rpc}: {sum(outcomes.values())} {outcomes}")
    for fn in sorted({f for f, _ in RECORD_COUNTS}):
        outcomes = {o: n for (f, o), n in sorted(RECORD_COUNTS.items()) if f == fn}
        print(f"  {fn}: {sum(outcomes.values())} {outcomes} (nothing else raised)")
    before, after = r["rss"]
    print(f"  peer process RSS: {before:.0f} MiB before, {after:.0f} MiB after (+{after - before:.0f}; bound "
          f"+{RSS_BOUND_MIB}); held at the end {r['held']}; asyncio tasks {r['tasks'][0]} -> {r['tasks'][1]}")
    print(f"  peer stats {r['stats']}")
    print(f"  RSS every 25 examples: {', '.join(f'{m:.0f}' for m in fuzz.rss)} MiB; peak (untrimmed) "
          f"{fuzz.peak:.0f} MiB")
    assert fuzz.crashes == 0
    assert r["held"] == {"bytes": 0, "streams": 0, "queued_rows": 0, "queue": 0, "unary_tasks": 0}
    assert r["tasks"][1] <= r["tasks"][0]
    assert after - before < RSS_BOUND_MIB
    assert r["stats"].get("internal", 0) == 0 and not fuzz.peer.unhandled
