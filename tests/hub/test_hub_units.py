"""Pure parts of the hub client: references, endpoints, tokens, include/exclude, the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoglm.node.errors import ConfigError
from autoglm.node.hub import HubFile, default_endpoints, load_token, parse_ref, select_files
from autoglm.node.hub._api import RepoSnapshot, file_url
from autoglm.node.hub._fetch import hub_manifest
from autoglm.protocol import decode_manifest


def test_parse_ref() -> None:
    r = parse_ref("hf://Qwen/Qwen2-0.5B")
    assert (r.hub, r.repo, r.revision) == ("hf", "Qwen/Qwen2-0.5B", "main")
    assert parse_ref("hf://a/b@v1.0").revision == "v1.0"
    assert parse_ref("hf://a/b@refs/pr/1").revision == "refs/pr/1"
    assert parse_ref("hf://a/b@x", revision="y").revision == "y"
    assert parse_ref("ms://a/b").revision == "master"
    for bad in ("hf://a", "hf://a/b/c", "http://a/b", "hf://../b", "hf://a/b@", "hf://a/b@x/../y"):
        with pytest.raises(ConfigError):
            parse_ref(bad)


def test_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert default_endpoints("hf", []) == ["https://huggingface.co"]
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com/")
    assert default_endpoints("hf", ["https://x.example", "https://hf-mirror.com"]) == ["https://hf-mirror.com", "https://x.example"]
    with pytest.raises(ConfigError):
        default_endpoints("hf", ["ftp://x"])


def test_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert load_token(None) is None
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "token").write_text("stored\n")
    assert load_token(None) == "stored"
    monkeypatch.setenv("HF_TOKEN", "env")
    assert load_token(None) == "env"
    (tmp_path / "f").write_text(" file \n")
    assert load_token(tmp_path / "f") == "file"
    with pytest.raises(ConfigError):
        load_token(tmp_path / "missing")


def _f(path: str, size: int = 3, lfs: bool = False) -> HubFile:
    return HubFile(path, size, "a" * 40, ("b" * 64) if lfs else None)


def test_include_exclude_like_hf_download() -> None:
    files = [_f("config.json"), _f("model.safetensors"), _f("onnx/model.onnx"), _f("tokenizer.json")]
    names = lambda fs: [f.path for f in fs]  # noqa: E731
    assert names(select_files(files, ["*.json"], [])) == ["config.json", "tokenizer.json"]
    assert names(select_files(files, [], ["onnx/"])) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert names(select_files(files, ["*.json", "*.safetensors"], ["tok*"])) == ["config.json", "model.safetensors"]


def test_manifest_is_stable_and_decodes() -> None:
    snap = RepoSnapshot(parse_ref("hf://a/b"), "c" * 40, (_f("x.bin", 20, lfs=True), _f("y.txt", 0)), ("http://e",))
    layout = {"blobs/" + f.etag: f for f in snap.files}
    m1, m2 = hub_manifest(snap, layout, 8), hub_manifest(snap, layout, 8)
    assert m1.id == m2.id
    d = decode_manifest(m1.encode())
    assert sorted(len(f.pieces) for f in d.files) == [0, 3] and d.publisher == "hub-attested"


def test_file_urls_are_pinned_and_quoted() -> None:
    hf = parse_ref("hf://a/b@main")
    assert file_url("https://h", hf, "c" * 40, "dir/a b#.json") == f"https://h/a/b/resolve/{'c' * 40}/dir/a%20b%23.json"
    ms = parse_ref("ms://a/b")
    assert file_url("https://m", ms, "v1", "x/y.bin") == "https://m/api/v1/models/a/b/repo?Revision=v1&FilePath=x%2Fy.bin"


def test_file_hash_cursor_then_rest_from_disk(tmp_path: Path) -> None:
    import hashlib
    import os

    from autoglm.node.errors import IntegrityError
    from autoglm.node.hub._verify import FileHash

    data = os.urandom(3000)
    path = tmp_path / "f"
    path.write_bytes(data)
    lfs = HubFile("w.bin", len(data), "0" * 40, hashlib.sha256(data).hexdigest())
    small = HubFile("c.json", len(data), hashlib.sha1(b"blob 3000\0" + data).hexdigest(), None)
    for f in (lfs, small):
        fh = FileHash(f)
        fh.feed(1000, data[1000:2000])  # ahead of the cursor: ignored
        fh.feed(0, data[:1000])
        assert fh.pos == 1000
        fd = os.open(path, os.O_RDONLY)
        try:
            fh.finish(fd)  # the rest comes from the file
            bad = FileHash(f)
            bad.feed(0, b"x" * 1000)
            with pytest.raises(IntegrityError, match=f.path):
                bad.finish(fd)
        finally:
            os.close(fd)


def test_piece_tap_hashes_the_manifest_pieces_from_an_in_order_read(tmp_path: Path) -> None:
    """publish hf:// (cold) takes a safetensors file's pieces from the fetch's read: the same as reading the file."""
    import hashlib

    import numpy as np
    from safetensors.numpy import save

    from autoglm.node.hub._publish import PieceTap, hash_hub_file

    data = save({f"t{i}": np.arange(i * 5000, dtype=np.float32) for i in range(1, 9)})
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    f = HubFile("m.safetensors", len(data), "0" * 40, hashlib.sha256(data).hexdigest())
    want = hash_hub_file(path, f, 64 << 10)
    assert len(want.pieces) > 1
    tap = PieceTap(f, 64 << 10)
    for off in range(0, len(data), 3000):  # small reads: the header arrives over several of them
        tap.feed(off, data[off : off + 3000])
    assert tap.entry() == want
    # A gap (bytes out of order) leaves no entry: the file is read again instead.
    tap.reset()
    tap.feed(0, data[:100])
    tap.feed(200, data[200:])
    assert tap.entry() is None
    # Not all bytes seen: no entry; after reset, a whole pass gives it again.
    tap.reset()
    tap.feed(0, data[:-1])
    assert tap.entry() is None
    tap.reset()
    tap.feed(0, data)
    assert tap.entry() == want
    # A header that does not parse: no entry (the read path reports the error).
    bad = PieceTap(HubFile("x.safetensors", 64, "0" * 40, "00" * 32), 64 << 10)
    bad.feed(0, b"\xff" * 64)
    assert bad.entry() is None


def test_small_tap_plans_and_hashes_a_small_file_as_reading_it_would(tmp_path: Path) -> None:
    """publish hf:// (cold) takes a small file's entry from the fetch's read: plan (CDC for big enough text) and hashes."""
    import hashlib

    from autoglm.node.hub._publish import SmallTap, git_blob_id, hash_hub_file

    data = b"".join(b'{"token%d": %d},\n' % (i, i * 7919 % 1000) for i in range(40000))  # ~800 KB of JSON
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    f = HubFile("tokenizer.json", len(data), git_blob_id(data), None)
    want = hash_hub_file(path, f, 64 << 10)
    assert len(want.pieces) > 1 and want.sha256 == hashlib.sha256(data).digest()
    tap = SmallTap(f, 64 << 10)
    for off in range(0, len(data), 5000):
        tap.feed(off, data[off : off + 5000])
    assert tap.entry() == want
    tap.reset()
    tap.feed(0, data[:100])
    tap.feed(200, data[200:])  # a gap: no entry, the file is read again
    assert tap.entry() is None
    tap.reset()
    tap.feed(0, data[:-1])
    assert tap.entry() is None
    tap.reset()
    tap.feed(0, data + b"x")  # more than the Hub's size: no entry
    assert tap.entry() is None
