"""Names that Windows cannot create, or creates as something else, are refused in manifests.

A fleet may include Windows nodes: a name with ``:`` opens an NTFS alternate
data stream, ``<>|?*"`` cannot be created, ``CON``/``NUL``/``COM1`` (any case,
any extension, also as fullwidth or superscript forms that normalise to them)
are devices, and a trailing dot or space is silently dropped (so two names
collide). Checked on the name as given and on its NFKC form.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm.protocol import RemoteProtocolError, check_path

RESERVED = ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10)),
            "CONIN$", "CONOUT$"]

BAD = [
    "a:b", "dir/a:stream", "a<b", "a>b", "a|b", "a?b", "a*b", 'a"b',
    "a\x01b", "a\x1fb", "a\x7fb",
    "a.", "a ", "dir./x", "dir /x", "a..",
    *RESERVED, *(r.lower() for r in RESERVED), "Con", "cOm1",
    "con.txt", "NUL.tar.gz", "aux.", "dir/LPT1.bin", "CON .txt", "nul  .x",
    # compatibility forms: NFKC turns them into the characters above
    "ＣＯＮ", "ｃｏｎ.txt", "COM¹", "LPT²", "COM³.log", "a：b", "a＜b", "a＞b", "a｜b", "a？b", "a＊b", "a＂b",
    "a．", "a\u3000", "a\u00a0", "．．/x", "a／b",
]


@pytest.mark.parametrize("path", BAD)
def test_windows_hostile_names_are_refused(path: str) -> None:
    with pytest.raises(RemoteProtocolError):
        check_path(path)


@pytest.mark.parametrize("path", ["CONFIG.json", "console.bin", "com10", "lpt", "nul_x", "a.b.c", "con-1/x",
                                  "model-00001-of-00002.safetensors", "tokenizer.json", "dir/sub/file", "été.txt"])
def test_ordinary_names_still_pass(path: str) -> None:
    assert check_path(path) == path


_HOSTILE_CHARS = st.sampled_from(list(':<>|?*"') + ["：", "＜", "＞", "｜", "？", "＊", "＂"])
_SAFE = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x7F), min_size=1, max_size=8)


@settings(max_examples=500, deadline=None)
@given(_SAFE, _HOSTILE_CHARS, _SAFE)
def test_any_forbidden_character_anywhere_is_refused(a: str, bad: str, b: str) -> None:
    with pytest.raises(RemoteProtocolError):
        check_path(f"{a}/{a}{bad}{b}")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(RESERVED), st.lists(st.booleans(), min_size=7, max_size=7), st.text("abc.", max_size=5),
       st.booleans())
def test_reserved_names_in_any_case_with_any_extension_are_refused(name: str, upper: list[bool], ext: str,
                                                                    fullwidth: bool) -> None:
    mixed = "".join(c.upper() if u else c.lower() for c, u in zip(name, upper, strict=False))
    if fullwidth:  # U+FF01..U+FF5E mirror ASCII 0x21..0x7E
        mixed = "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else c for c in mixed)
    with pytest.raises(RemoteProtocolError):
        check_path(f"dir/{mixed}{'.' + ext if ext else ''}")


@settings(max_examples=1000, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_accepted_names_are_windows_safe_after_nfkc(path: str) -> None:
    try:
        check_path(path)
    except RemoteProtocolError:
        return
    for form in (path, unicodedata.normalize("NFKC", path)):
        for seg in form.split("/"):
            assert seg and seg not in (".", "..")
            assert not any(c in ':<>|?*"\\' or ord(c) < 0x20 for c in seg)
            assert seg.rstrip(" .") == seg
            assert seg.split(".")[0].rstrip(" ").upper() not in RESERVED
