"""hivemind's stream framing, read and written with bounds: what ``ExpertServicer`` serves its stream RPCs over.

hivemind 1.1.12 frames each protobuf on a p2pd stream as one marker byte (``P2P.MESSAGE_MARKER``, or
``P2P.ERROR_MARKER`` for an ``RPCError``; an empty one ends the caller's input), an 8-byte big-endian
length and the serialized message. Its own server side (``P2P._add_protobuf_stream_handler``) reads
whatever length a header declares before a handler sees a byte, and waits forever on a caller that
stops reading. Here a message is refused from its header when it is longer than the RPC allows, a
started message must arrive within a deadline, and an answer the caller does not read within the write
timeout closes the stream. Callers keep using hivemind's client (``iterate_protobuf_handler``,
``call_binary_stream_handler``): the bytes on the wire are the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

from diffswarm.protocol.wire import MAX_SMALL_MESSAGE_BYTES, RequestError

ERROR_WRITE_TIMEOUT = 2.0  # seconds an error answer may take to leave before the stream is closed anyway
LINGER_S = 2.0  # seconds a closing stream keeps discarding the caller's input (see ``linger``)


class StreamClosed(Exception):
    """The caller closed or broke the stream: there is nobody left to answer."""


class StuckReader(Exception):
    """The caller did not read an answer within the write timeout."""


class IdleStream(RequestError):
    """No new message arrived within the idle timeout: a refusal (too slow) where a message was due; the
    quiet end of a session."""


async def read_message(reader: asyncio.StreamReader, msg_type, max_bytes: int, idle_timeout: float,
                       read_timeout: float):
    """The caller's next message, or None at the end of its input. Raises ``RequestError`` for a message
    longer than ``max_bytes`` (from its header: the body is never read), a malformed frame or protobuf, or
    one that takes longer than ``read_timeout`` to arrive once started; ``IdleStream`` when none starts within
    ``idle_timeout``; ``StreamClosed`` when the caller goes away (also mid-message)."""
    try:
        marker = await asyncio.wait_for(reader.readexactly(1), idle_timeout)
    except (asyncio.IncompleteReadError, ConnectionError):  # closed, or reset (ConnectionResetError)
        raise StreamClosed("the caller closed the stream") from None
    except TimeoutError:
        raise IdleStream(f"no message for {idle_timeout:g} s") from None
    try:
        async with asyncio.timeout(read_timeout):
            n = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
            if marker == P2P.ERROR_MARKER:  # the caller's end of input (hivemind's END_OF_STREAM) or its error
                if n > MAX_SMALL_MESSAGE_BYTES:
                    raise RequestError(f"end-of-stream message of {n} bytes exceeds {MAX_SMALL_MESSAGE_BYTES}")
                await reader.readexactly(n)
                return None
            if marker != P2P.MESSAGE_MARKER:
                raise RequestError(f"invalid frame marker {marker!r} (hivemind stream framing expected)")
            if n > max_bytes:
                raise RequestError(f"a message of {n} bytes exceeds the {max_bytes} bytes this RPC accepts")
            body = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        raise StreamClosed("the caller closed the stream mid-message") from None
    except TimeoutError:
        raise RequestError(f"a message took longer than {read_timeout:g} s to arrive") from None
    try:
        return msg_type.FromString(body)
    except Exception:  # google.protobuf DecodeError and friends
        raise RequestError(f"a message is not a valid {msg_type.__name__} protobuf") from None


async def read_messages(reader: asyncio.StreamReader, msg_type, max_bytes: int, idle_timeout: float,
                        read_timeout: float) -> AsyncIterator:
    """``read_message`` until the end of the caller's input."""
    while True:
        msg = await read_message(reader, msg_type, max_bytes, idle_timeout, read_timeout)
        if msg is None:
            return
        yield msg


async def write_message(writer: asyncio.StreamWriter, msg, timeout: float, error: bool = False) -> None:
    """Send one message (``error``: as an ``RPCError`` frame). Raises ``StuckReader`` when the caller does not
    take it within ``timeout`` seconds, ``StreamClosed`` when the stream is gone."""
    data = msg.SerializeToString()
    marker = P2P.ERROR_MARKER if error else P2P.MESSAGE_MARKER
    try:
        writer.write(marker + len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        writer.write(data)
        await asyncio.wait_for(writer.drain(), timeout)
    except TimeoutError:
        raise StuckReader(f"the caller did not read an answer within {timeout:g} s") from None
    except (ConnectionError, RuntimeError) as e:  # reset, broken pipe, writing to a closed transport
        raise StreamClosed(f"the stream broke: {e}") from None


async def write_error(writer: asyncio.StreamWriter, text: str) -> bool:
    """Best effort: send ``text`` as the stream's ``RPCError`` (what hivemind's caller raises as
    ``P2PHandlerError``). True if it left."""
    try:
        await write_message(writer, RPCError(message=text), ERROR_WRITE_TIMEOUT, error=True)
        return True
    except (StreamClosed, StuckReader):
        return False


async def linger(reader: asyncio.StreamReader, seconds: float = LINGER_S) -> None:
    """After an error answer: discard what the caller still sends until it closes (at most ``seconds``).
    Closing a unix socket with unread input makes Linux reset it (ECONNRESET) and p2pd then resets the
    libp2p stream, so the caller could lose the error still in flight (after the rest of a refused stream,
    say). hivemind's callers close as soon as they read the error. Nothing read here is kept."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
    except (Exception, TimeoutError):  # gone or slow: the stream is closed regardless
        pass
