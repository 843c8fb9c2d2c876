"""Where the members of a zip file lie (PyTorch checkpoints): just enough of the format to cut pieces.

A PyTorch checkpoint saved by ``torch.save`` is a zip archive of stored
(uncompressed) members: ``archive/data.pkl`` and one member per tensor
storage, ``archive/data/0`` ... . The central directory at the end gives each
member's local header offset and compressed size; the local header (30 bytes
plus its own name and extra field, whose length may differ from the central
copy's) gives where the data starts. ZIP64 records are followed.

The file is untrusted: the member count, the central directory size and
every offset are checked against caps and the file size, and anything odd
is a :class:`RemoteProtocolError` (the publisher then plans the file as
generic bytes). I/O is the caller's: ``read(offset, n)`` returns the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from ._errors import RemoteProtocolError

__all__ = ["ZIP_MAX_MEMBERS", "zip_member_spans"]

ZIP_MAX_MEMBERS = 200_000
ZIP_MAX_DIRECTORY = 256 * 1024 * 1024
_EOCD = b"PK\x05\x06"
_EOCD64 = b"PK\x06\x06"
_LOC64 = b"PK\x06\x07"
_CENTRAL = b"PK\x01\x02"
_LOCAL = b"PK\x03\x04"

Span = tuple[int, int]
Read = Callable[[int, int], bytes]


def _read(read: Read, offset: int, n: int, size: int) -> bytes:
    if offset < 0 or n < 0 or offset + n > size:
        raise RemoteProtocolError(f"zip record at {offset} runs past the end of the file")
    data = read(offset, n)
    if len(data) != n:
        raise RemoteProtocolError(f"short read at {offset}")
    return data


def _directory(read: Read, size: int) -> tuple[int, int, int]:
    """(central directory offset, its size, entry count) from the end records."""
    tail_len = min(size, 22 + 0xFFFF)
    tail = _read(read, size - tail_len, tail_len, size)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        raise RemoteProtocolError("no zip end-of-central-directory record")
    _, _, _, entries, cd_size, cd_off, _ = struct.unpack("<HHHHIIH", tail[at + 4 : at + 22])
    eocd = size - tail_len + at
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF or cd_off == 0xFFFFFFFF:
        loc = _read(read, eocd - 20, 20, size)
        if loc[:4] != _LOC64:
            raise RemoteProtocolError("zip64 fields without a zip64 locator")
        (rec_off,) = struct.unpack("<Q", loc[8:16])
        rec = _read(read, rec_off, 56, size)
        if rec[:4] != _EOCD64:
            raise RemoteProtocolError("zip64 end-of-central-directory record missing")
        entries, cd_size, cd_off = struct.unpack("<QQQ", rec[32:56])
    if entries > ZIP_MAX_MEMBERS:
        raise RemoteProtocolError(f"zip with {entries} members (limit {ZIP_MAX_MEMBERS})")
    if cd_size > ZIP_MAX_DIRECTORY or cd_off + cd_size > size:
        raise RemoteProtocolError("zip central directory is beyond the file or the limit")
    return int(cd_off), int(cd_size), int(entries)


def _zip64_extra(extra: bytes, csize: int, usize: int, offset: int) -> tuple[int, int]:
    """Compressed size and local header offset, with ZIP64 values where the 32-bit fields are saturated."""
    i = 0
    while i + 4 <= len(extra):
        tag, n = struct.unpack("<HH", extra[i : i + 4])
        body = extra[i + 4 : i + 4 + n]
        if tag == 1:
            vals = [struct.unpack("<Q", body[j : j + 8])[0] for j in range(0, len(body) - 7, 8)]
            k = 0
            if usize == 0xFFFFFFFF:
                k += 1
            if csize == 0xFFFFFFFF:
                if k >= len(vals):
                    raise RemoteProtocolError("zip64 extra field too short")
                csize = vals[k]
                k += 1
            if offset == 0xFFFFFFFF:
                if k >= len(vals):
                    raise RemoteProtocolError("zip64 extra field too short")
                offset = vals[k]
            return csize, offset
        i += 4 + n
    if csize == 0xFFFFFFFF or offset == 0xFFFFFFFF:
        raise RemoteProtocolError("zip member needs a zip64 extra field and has none")
    return csize, offset


def zip_member_spans(read: Read, size: int) -> tuple[Span, list[Span]]:
    """The central directory's span and each member's data span, sorted by offset.

    Members must not overlap one another or the central directory.
    """
    cd_off, cd_size, entries = _directory(read, size)
    cd = _read(read, cd_off, cd_size, size)
    members: list[Span] = []
    pos = 0
    for _ in range(entries):
        if cd[pos : pos + 4] != _CENTRAL or pos + 46 > len(cd):
            raise RemoteProtocolError(f"bad zip central directory entry at {cd_off + pos}")
        csize, usize = struct.unpack("<II", cd[pos + 20 : pos + 28])
        n_name, n_extra, n_comment = struct.unpack("<HHH", cd[pos + 28 : pos + 34])
        (local,) = struct.unpack("<I", cd[pos + 42 : pos + 46])
        end = pos + 46 + n_name + n_extra + n_comment
        if end > len(cd):
            raise RemoteProtocolError("zip central directory entry runs past the directory")
        extra = cd[pos + 46 + n_name : pos + 46 + n_name + n_extra]
        csize, local = _zip64_extra(extra, csize, usize, local)
        hdr = _read(read, local, 30, size)
        if hdr[:4] != _LOCAL:
            raise RemoteProtocolError(f"no zip local header at {local}")
        l_name, l_extra = struct.unpack("<HH", hdr[26:30])
        start = local + 30 + l_name + l_extra
        if start + csize > cd_off:
            raise RemoteProtocolError("zip member data runs into the central directory")
        members.append((start, csize))
        pos = end
    members.sort()
    for (a, alen), (b, _) in zip(members, members[1:], strict=False):
        if a + alen > b:
            raise RemoteProtocolError("zip members overlap")
    return (cd_off, cd_size), members
