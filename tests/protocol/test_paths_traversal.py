"""Every path-traversal and collision form is refused, by check_path and by the decoder."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoglm.protocol import (
    RemoteProtocolError,
    check_path,
    check_unique_paths,
    decode_manifest,
    encode_canonical,
)

H = hashlib.sha256(b"h").digest()

BAD_PATHS = {
    "absolute": "/etc/passwd",
    "root": "/",
    "absolute nested": "/a/b",
    "dotdot": "..",
    "dotdot first": "../x",
    "dotdot middle": "a/../b",
    "dotdot last": "a/..",
    "dotdot deep": "a/b/../../../x",
    "dot": ".",
    "dot first": "./a",
    "dot middle": "a/./b",
    "empty": "",
    "empty segment": "a//b",
    "trailing slash": "a/",
    "only slashes": "//",
    "backslash": "a\\b",
    "backslash traversal": "..\\..\\x",
    "backslash absolute": "\\x",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "a\x1b[31mb",
    "delete": "a\x7fb",
    "drive letter": "C:x",
    "drive letter absolute": "c:/windows",
    "trailing dot": "a/b.",
    "trailing space": "a/b ",
    "reserved device": "CON",
    "reserved device with extension": "sub/nul.txt",
    "reserved device com": "com1.bin",
    "lone surrogate": "a\ud800b",
    "long segment": "x" * 256,
    "long path": "/".join(["x" * 200] * 6),
}


@pytest.mark.parametrize("what", sorted(BAD_PATHS))
def test_check_path_refuses(what: str) -> None:
    with pytest.raises(RemoteProtocolError):
        check_path(BAD_PATHS[what])


@pytest.mark.parametrize(
    "path",
    ["a", "a/b/c", "model-00001-of-00002.safetensors", ".hidden", "a..b", "x" * 255, "日本/é", "config.json"],
)
def test_check_path_accepts(path: str) -> None:
    assert check_path(path) == path


def test_check_path_refuses_non_text() -> None:
    with pytest.raises(RemoteProtocolError):
        check_path(b"a")  # type: ignore[arg-type]


@given(st.text(alphabet="ab./\\\x00\n:", max_size=12))
def test_accepted_paths_stay_inside_the_directory(path: str) -> None:
    try:
        check_path(path)
    except RemoteProtocolError:
        return
    segments = path.split("/")
    assert not path.startswith("/")
    assert all(s not in ("", ".", "..") for s in segments)
    assert "\\" not in path and "\x00" not in path


COLLISIONS = {
    "duplicate": ["a", "a"],
    "NFC vs NFD": ["caf\u00e9.bin", "cafe\u0301.bin"],
    "NFC vs NFD deeper": ["x/caf\u00e9", "x/cafe\u0301"],
    "case deeper": ["d/Model.bin", "d/model.bin"],
    "case": ["Model.bin", "model.bin"],
    "casefold sharp s": ["stra\u00dfe", "strasse"],
    "compatibility ligature": ["\ufb01le", "file"],
    "file is also a directory": ["a", "a/b"],
    "file is also a deep directory": ["a/b", "a/b/c/d"],
    "file is a directory after case folding": ["A", "a/b"],
}


@pytest.mark.parametrize("what", sorted(COLLISIONS))
def test_check_unique_paths_refuses(what: str) -> None:
    with pytest.raises(RemoteProtocolError):
        check_unique_paths(COLLISIONS[what])
    with pytest.raises(RemoteProtocolError):
        check_unique_paths(reversed(COLLISIONS[what]))


def test_check_unique_paths_accepts_siblings() -> None:
    check_unique_paths(["a/b", "a/c", "ab", "a.b/c", "b"])


def _manifest_with_paths(paths: list[str]) -> bytes:
    files = [{"path": p, "size": 1, "sha256": H, "pieces": [[0, 1, H]]} for p in paths]
    value: dict[str, Any] = {
        "format": 1,
        "name": "m",
        "version": "1",
        "created_at": 0,
        "publisher": "p",
        "max_piece": 8,
        "files": files,
        "variants": [],
    }
    return encode_canonical(value)


def test_decoder_accepts_the_control() -> None:
    assert [f.path for f in decode_manifest(_manifest_with_paths(["a/b", "c"])).files] == ["a/b", "c"]


@pytest.mark.parametrize("what", sorted(set(BAD_PATHS) - {"lone surrogate"}))
def test_decoder_refuses_bad_path(what: str) -> None:
    with pytest.raises(RemoteProtocolError, match="invalid manifest"):
        decode_manifest(_manifest_with_paths([BAD_PATHS[what]]))


@pytest.mark.parametrize("what", sorted(COLLISIONS))
def test_decoder_refuses_colliding_paths(what: str) -> None:
    paths = sorted(COLLISIONS[what], key=lambda s: s.encode())
    with pytest.raises(RemoteProtocolError, match="invalid manifest: (file path|files are not sorted)"):
        decode_manifest(_manifest_with_paths(paths))
