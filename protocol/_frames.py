"""Length-prefixed frames with hard limits, sans-IO.

A frame is a 4-byte big-endian length followed by that many bytes. The
decoder refuses a declared length above its limit as soon as the prefix has
arrived, before buffering anything more, the way h11 refuses an over-long
header with 431: a peer cannot make us hold more than ``max_frame`` bytes.
"""

from __future__ import annotations

import struct
from typing import Final

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = ["FRAME_HEADER", "NEED_DATA", "FrameDecoder", "NeedData", "encode_frame", "encode_frame_header"]

FRAME_HEADER: Final = 4
_LEN = struct.Struct(">I")


class NeedData:
    """Sentinel: feed more bytes before asking for the next frame."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def encode_frame(payload: bytes, max_frame: int) -> bytes:
    """Prefix ``payload`` with its length; LocalProtocolError if it is over ``max_frame``."""
    if len(payload) > max_frame:
        raise LocalProtocolError(f"frame of {len(payload)} bytes is over the limit of {max_frame}")
    return _LEN.pack(len(payload)) + payload


def encode_frame_header(length: int, max_frame: int) -> bytes:
    """Only the prefix, for payloads the caller sends itself (sendfile)."""
    if not 0 <= length <= max_frame:
        raise LocalProtocolError(f"frame of {length} bytes is over the limit of {max_frame}")
    return _LEN.pack(length)


class FrameDecoder:
    """Bytes in, whole frames out.

    ``receive_data(b"")`` marks the end of the stream; a frame cut short by it
    is a RemoteProtocolError. Raw (unframed) runs of bytes that follow a frame
    can be taken with :meth:`next_raw`.
    """

    __slots__ = ("_buf", "_eof", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._eof = False

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if self._eof:
            if data:
                raise LocalProtocolError("data received after end of stream")
            return
        if not data:
            self._eof = True
            return
        self._buf += data

    def next_frame(self) -> bytes | NeedData:
        """One frame's payload, or NEED_DATA. Raises RemoteProtocolError on a bad length."""
        if len(self._buf) >= FRAME_HEADER:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self.max_frame:
                raise RemoteProtocolError(f"peer sent a frame of {n} bytes; the limit is {self.max_frame}")
            if len(self._buf) >= FRAME_HEADER + n:
                payload = bytes(self._buf[FRAME_HEADER : FRAME_HEADER + n])
                del self._buf[: FRAME_HEADER + n]
                return payload
        if self._eof and self._buf:
            raise RemoteProtocolError("stream ended in the middle of a frame")
        return NEED_DATA

    def take_buffered(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes, removed from the buffer (for a caller that reads the rest itself)."""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def next_raw(self, n: int) -> bytes | NeedData:
        """Exactly ``n`` unframed bytes, or NEED_DATA."""
        if len(self._buf) >= n:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out
        if self._eof:
            raise RemoteProtocolError(f"stream ended {n - len(self._buf)} bytes short of a payload")
        return NEED_DATA
