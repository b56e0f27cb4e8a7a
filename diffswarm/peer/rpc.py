"""RPC plumbing: registering a servicer's ``rpc_*`` methods on the p2p daemon with bounded framing, memory
leases and stream slots, and turning whatever a handler raises into the error answer the caller gets."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter

from hivemind.p2p import P2P, P2PContext, ServicerBase

from diffswarm.peer.limits import ByteBudget, Lease, PeerLimits, StreamSlots
from diffswarm.peer.streams import (
    StreamClosed,
    StuckReader,
    linger,
    read_messages,
    write_error,
    write_message,
)
from diffswarm.protocol.wire import (
    MAX_SMALL_MESSAGE_BYTES,
    PeerBusy,
    PeerInternalError,
    RequestError,
    format_error,
)

logger = logging.getLogger(__name__)


class _ErrorAnswer(Exception):
    """Raised by a unary handler to answer an error. hivemind's p2pclient sends ``repr(e)`` of a unary
    handler's exception to the caller, so repr (and str) are exactly the wire message (``format_error``)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text

    __repr__ = __str__


class _RawRequest:
    """Stands in for the protobuf type when a unary handler is registered: hivemind hands the handler the
    request bytes unparsed, so a malformed protobuf gets a diffswarm error answer, not hivemind's DecodeError."""

    @staticmethod
    def FromString(data: bytes) -> bytes:  # protobuf's name: hivemind calls it
        return data


class BoundedServicer(ServicerBase):
    """A hivemind servicer whose handlers hold only what ``PeerLimits`` allows: each request's bytes on the
    memory budget (``budget``), each open stream in ``slots``, stream messages read with bounded framing
    (``streams``) and deadlines. What a handler raises becomes an error answer (``_as_answer``); ``stats``
    counts what happened. Subclasses declare the ``rpc_*`` methods and extend ``configure``."""

    def __init__(self, limits: PeerLimits | None = None):
        self.configure(limits or PeerLimits())
        # requests (velocity requests decoded), answered, refused, busy, internal, closed (caller went away),
        # stuck (caller did not read), cancelled (unary caller gave up)
        self.stats: Counter[str] = Counter()

    def configure(self, limits: PeerLimits) -> None:
        """Apply ``limits`` (held bytes and open streams are counted afresh: call it while idle, on the peer's
        loop)."""
        self.limits = limits
        self.budget = ByteBudget(limits.max_inflight_bytes, limits.max_caller_inflight_bytes)
        self.slots = StreamSlots(limits.max_streams, limits.max_streams_per_caller)

    # -- registration ----------------------------------------------------------------------------

    async def add_p2p_handlers(self, p2p: P2P, wrapper=None, *, namespace: str | None = None,
                               balanced: bool = False) -> None:
        """Register every ``rpc_*`` method: unary ones through hivemind's ``add_protobuf_handler``, stream
        ones through ``add_binary_stream_handler`` with the bounded framing of ``streams`` (hivemind's own
        stream handler buffers whatever length a caller declares). ``remove_p2p_handlers`` is hivemind's."""
        if wrapper is not None:
            raise ValueError(f"{type(self).__name__} registers its own handlers; it takes no wrapper")
        self._collect_rpc_handlers()
        for h in self._rpc_handlers:
            name = self._get_handle_name(namespace, h.method_name)
            if h.stream_input or h.stream_output:
                await p2p.add_binary_stream_handler(name, self._stream_handler(p2p, h, name), balanced=balanced)
            else:
                await p2p.add_protobuf_handler(name, self._unary_handler(h), _RawRequest, balanced=balanced)

    def _as_answer(self, e: BaseException, caller: str, rpc: str) -> RequestError:
        """The error answer for ``e``: a ``RequestError`` is written for the caller and goes as it is; anything
        else is the peer's own failure, answered as ``PeerInternalError`` with a fresh id that is logged here
        with the traceback (nothing of the exception itself reaches the caller)."""
        if isinstance(e, RequestError):
            self.stats[e.code] += 1
            logger.debug(f"{rpc} from {caller[:12]}: {e.code}: {e}")
            return e
        error_id = secrets.token_hex(4)
        self.stats["internal"] += 1
        logger.error(f"internal error {error_id} in {rpc} for {caller[:12]}", exc_info=e)
        return PeerInternalError(error_id)

    def _unary_handler(self, h):
        method = getattr(self, h.method_name)

        async def handle(request: bytes, context: P2PContext):
            caller = str(context.remote_id)
            lease = Lease(self.budget, caller)
            try:
                lease.take(len(request))
                try:
                    msg = h.request_type.FromString(request)
                except Exception:  # DecodeError
                    raise RequestError(f"the request is not a valid {h.request_type.__name__} protobuf") from None
                return await method(msg, context)
            except asyncio.CancelledError:
                # p2pclient cancels the handler when the caller gives up (its deadline) and then skips its own
                # bookkeeping (hivemind 1.1.12 keeps the cancelled task, and with it the request, for good):
                # end normally instead; the answer goes nowhere
                self.stats["cancelled"] += 1
                raise _ErrorAnswer(format_error("refused", "the caller cancelled the call")) from None
            except Exception as e:
                raise _ErrorAnswer(self._as_answer(e, caller, h.method_name).wire_message) from None
            finally:
                lease.release()

        return handle

    def _stream_bounds(self, rpc: str) -> tuple[int, float]:
        """(largest message, seconds to wait for the next one) of a stream RPC's requests: small messages, unless
        a subclass says otherwise for its ``rpc``."""
        return MAX_SMALL_MESSAGE_BYTES, self.limits.read_timeout

    def _stream_handler(self, p2p: P2P, h, name: str):
        method = getattr(self, h.method_name)

        async def handle(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            caller = stream_info.peer_id.to_base58()
            max_bytes, idle = self._stream_bounds(h.method_name)
            context = P2PContext(handle_name=name, local_id=p2p.peer_id, remote_id=stream_info.peer_id)
            slots = self.slots  # the one this stream is counted in, even if the limits change meanwhile
            try:
                slots.open(caller)
            except PeerBusy as e:
                if await write_error(writer, self._as_answer(e, caller, h.method_name).wire_message):
                    await linger(reader)
                writer.close()
                return
            answers, abort = None, False
            try:
                requests = read_messages(reader, h.request_type, max_bytes, idle, self.limits.read_timeout)
                if h.stream_input:
                    answers = method(requests, context)
                else:
                    first = await anext(requests, None)
                    if first is None or await anext(requests, None) is not None:  # then the end of input
                        raise RequestError(f"{h.method_name} takes exactly one request")
                    answers = method(first, context)
                async for resp in answers:
                    await write_message(writer, resp, self.limits.write_timeout)
            except (StreamClosed, StuckReader) as e:  # nobody to answer: close at once, drop what is buffered
                abort = True
                self.stats["stuck" if isinstance(e, StuckReader) else "closed"] += 1
                logger.debug(f"{h.method_name} from {caller[:12]}: {e}")
            except Exception as e:
                if await write_error(writer, self._as_answer(e, caller, h.method_name).wire_message):
                    await linger(reader)
            finally:
                if answers is not None:
                    await answers.aclose()
                if abort:
                    writer.transport.abort()
                else:
                    writer.close()
                slots.close(caller)

        return handle
