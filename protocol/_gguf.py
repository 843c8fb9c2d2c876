"""Where the tensors of a GGUF file lie: just enough of the format to cut pieces.

GGUF (little-endian, versions 2 and 3): ``b"GGUF"``, u32 version, u64 tensor
count, u64 metadata count, the metadata key/value pairs, the tensor infos
(name, u32 n_dims, u64 dims, u32 ggml type, u64 offset), padding to the
alignment (``general.alignment``, default 32), then the tensor data; each
tensor's offset is relative to the start of that data block.

The file is untrusted here too: every count and string length is capped,
every read is bounds-checked against the bytes given, and anything odd is a
:class:`RemoteProtocolError` (the publisher then plans the file as generic
bytes). Parsing is sans-IO: :func:`gguf_tensor_spans` takes a prefix of the
file and raises :class:`NeedMoreData` when the metadata runs past it, so the
caller can read a longer prefix (up to :data:`GGUF_MAX_HEADER`).
"""

from __future__ import annotations

import struct

from ._errors import RemoteProtocolError

__all__ = ["GGUF_MAX_HEADER", "GGUF_PREAMBLE", "NeedMoreData", "gguf_tensor_spans"]

GGUF_MAGIC = b"GGUF"
GGUF_PREAMBLE = 24  # magic, version, tensor count, metadata count
GGUF_MAX_HEADER = 512 * 1024 * 1024  # metadata + tensor infos (vocabularies run to tens of MB)
MAX_TENSORS = 1_000_000
MAX_KV = 100_000
MAX_STRING = 64 * 1024 * 1024
MAX_ARRAY = 64 * 1024 * 1024
MAX_DIMS = 8
MAX_ALIGNMENT = 1 << 20
DEFAULT_ALIGNMENT = 32

Span = tuple[int, int]

# fixed-size metadata value types: type id -> byte size
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# ggml tensor types: id -> (elements per block, bytes per block), from the GGUF
# specification; a type not listed here gets the bytes up to the next tensor.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
    22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
    29: (256, 56), 30: (1, 2),
}  # fmt: skip


class NeedMoreData(Exception):
    """The prefix ended inside the header; read at least ``need`` bytes and try again."""

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


class _Reader:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, n: int) -> bytes | memoryview:
        end = self.pos + n
        if end > len(self.buf):
            if end > GGUF_MAX_HEADER:
                raise RemoteProtocolError(f"GGUF header is larger than {GGUF_MAX_HEADER} bytes")
            raise NeedMoreData(max(end, 2 * len(self.buf)))
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def string(self) -> bytes:
        n = self.u64()
        if n > MAX_STRING:
            raise RemoteProtocolError(f"GGUF string of {n} bytes (limit {MAX_STRING})")
        return bytes(self.take(n))

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _SCALAR:
            self.take(_SCALAR[vtype])
        elif vtype == _STRING:
            self.string()
        elif vtype == _ARRAY and depth == 0:
            etype, count = self.u32(), self.u64()
            if count > MAX_ARRAY:
                raise RemoteProtocolError(f"GGUF array of {count} items (limit {MAX_ARRAY})")
            if etype in _SCALAR:
                self.take(_SCALAR[etype] * count)
            elif etype == _STRING:
                for _ in range(count):
                    self.string()
            else:
                raise RemoteProtocolError(f"GGUF array of unsupported type {etype}")
        else:
            raise RemoteProtocolError(f"GGUF metadata value of unknown type {vtype}")


def _tensor_bytes(ggml_type: int, dims: list[int]) -> int | None:
    blk = GGML_BLOCKS.get(ggml_type)
    if blk is None:
        return None
    n = 1
    for d in dims:
        n *= d
    per, size = blk
    if n % per:
        raise RemoteProtocolError(f"GGUF tensor of {n} elements is not whole blocks of {per}")
    return n // per * size


def gguf_tensor_spans(prefix: bytes | memoryview, file_size: int) -> tuple[int, list[Span]]:
    """Start of the tensor data block and each tensor's absolute byte span.

    A tensor of a type this module knows gets exactly its bytes (the alignment
    padding after it falls to a gap piece); a type it does not know gets the
    bytes up to the next tensor (or the end of the file).
    """
    r = _Reader(prefix)
    if bytes(r.take(4)) != GGUF_MAGIC:
        raise RemoteProtocolError("not a GGUF file")
    version = r.u32()
    if version not in (2, 3):
        raise RemoteProtocolError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = r.u64(), r.u64()
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise RemoteProtocolError(f"GGUF counts {n_tensors} tensors / {n_kv} keys are beyond the limits")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = r.string()
        vtype = r.u32()
        if key == b"general.alignment":
            if vtype != _UINT32:
                raise RemoteProtocolError("GGUF general.alignment is not a uint32")
            alignment = r.u32()
            if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
                raise RemoteProtocolError(f"GGUF alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}")
        else:
            r.skip_value(vtype)
    infos: list[tuple[int, int | None]] = []
    for _ in range(n_tensors):
        r.string()
        n_dims = r.u32()
        if n_dims > MAX_DIMS:
            raise RemoteProtocolError(f"GGUF tensor with {n_dims} dimensions (limit {MAX_DIMS})")
        dims = [r.u64() for _ in range(n_dims)]
        ggml_type = r.u32()
        offset = r.u64()
        if offset % alignment:
            raise RemoteProtocolError(f"GGUF tensor offset {offset} is not aligned to {alignment}")
        infos.append((offset, _tensor_bytes(ggml_type, dims)))
    data_start = -(-r.pos // alignment) * alignment
    if data_start > file_size:
        raise RemoteProtocolError("GGUF header runs past the end of the file")
    infos.sort(key=lambda t: t[0])
    spans: list[Span] = []
    for i, (offset, nbytes) in enumerate(infos):
        start = data_start + offset
        limit = data_start + infos[i + 1][0] if i + 1 < len(infos) else file_size
        if nbytes is None:
            nbytes = limit - start
        if start + nbytes > limit or nbytes < 0:
            raise RemoteProtocolError("GGUF tensors overlap or run past the end of the file")
        spans.append((start, nbytes))
    return data_start, spans
