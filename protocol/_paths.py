"""Validation of the relative file paths a manifest may name.

A manifest path is joined to a local directory by every node that fetches it,
so a hostile publisher (or a tampered manifest that somehow passed signature
checks) must not be able to escape that directory or make two entries land on
the same file on a case-insensitive or normalising filesystem.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from ._errors import RemoteProtocolError

__all__ = ["MAX_PATH_BYTES", "MAX_SEGMENT_BYTES", "check_path", "check_unique_paths", "path_collision_key"]

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
# Windows device names, reserved with any extension and in any case (also after
# trailing spaces: "CON .txt" is CON). COM0/LPT0 and the console names too.
_WINDOWS_RESERVED = frozenset({"con", "prn", "aux", "nul", "conin$", "conout$",
                               *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))})
# Characters Windows cannot put in a name (":" would open an NTFS alternate data stream).
_WINDOWS_FORBIDDEN = frozenset('<>:"|?*')


def check_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise RemoteProtocolError.

    Safe everywhere a node may run: every rule holds for the name as given and
    for its NFKC form, since some systems and tools normalise names (fullwidth
    ``ＣＯＮ`` is ``CON``, ``a：b`` is ``a:b``, ``．．`` is ``..``).
    """
    if not isinstance(path, str):
        raise RemoteProtocolError("file path is not text")
    if not path:
        raise RemoteProtocolError("empty file path")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise RemoteProtocolError(f"file path longer than {MAX_PATH_BYTES} bytes")
    if "\x00" in path:
        raise RemoteProtocolError(f"file path {path!r} contains NUL")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in path):
        raise RemoteProtocolError(f"file path {path!r} contains a lone surrogate")
    if path.startswith("/"):
        raise RemoteProtocolError(f"file path {path!r} is absolute")
    if len(path) >= 2 and path[1] == ":":
        raise RemoteProtocolError(f"file path {path!r} has a drive letter")
    for seg in path.split("/"):
        _check_segment(path, seg)
        if len(seg.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise RemoteProtocolError(f"file path {path!r} has a segment over {MAX_SEGMENT_BYTES} bytes")
        folded = unicodedata.normalize("NFKC", seg)
        if folded != seg:
            if "/" in folded:
                raise RemoteProtocolError(f"file path {path!r} has a character that normalises to '/'")
            _check_segment(path, folded, " after NFKC normalisation")
    return path


def _check_segment(path: str, seg: str, how: str = "") -> None:
    if seg == "":
        raise RemoteProtocolError(f"file path {path!r} has an empty segment{how}")
    if seg in (".", ".."):
        raise RemoteProtocolError(f"file path {path!r} has a {seg!r} segment{how}")
    if "\\" in seg:
        raise RemoteProtocolError(f"file path {path!r} contains a backslash{how}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
        raise RemoteProtocolError(f"file path {path!r} contains a control character{how}")
    bad = _WINDOWS_FORBIDDEN.intersection(seg)
    if bad:
        raise RemoteProtocolError(f"file path {path!r} contains {''.join(sorted(bad))!r}{how}, which Windows forbids")
    if seg.rstrip(" .") != seg:
        raise RemoteProtocolError(f"file path {path!r} has a segment ending in a dot or space{how}")
    if seg.split(".")[0].rstrip(" ").lower() in _WINDOWS_RESERVED:
        raise RemoteProtocolError(f"file path {path!r} uses a reserved device name{how}")


def path_collision_key(path: str) -> str:
    """The key under which two paths would land on the same file somewhere."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFD", path)).casefold()


def check_unique_paths(paths: Iterable[str]) -> None:
    """Refuse duplicates and paths that collide after normalisation or case folding.

    A path that is a prefix directory of another file (``a`` and ``a/b``) is
    refused too: one of the two could not be created.
    """
    seen: dict[str, str] = {}
    for p in paths:
        key = path_collision_key(p)
        if key in seen:
            other = seen[key]
            what = "is listed twice" if other == p else f"collides with {other!r} after Unicode normalisation or case folding"
            raise RemoteProtocolError(f"file path {p!r} {what}")
        seen[key] = p
    dirs = set()
    for key in seen:
        parts = key.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    for key, p in seen.items():
        if key in dirs:
            raise RemoteProtocolError(f"file path {p!r} is also used as a directory")
