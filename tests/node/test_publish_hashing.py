"""The publish pipeline on real files: hash_file against hashlib/blake3, tensor-aligned pieces."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors.numpy import save_file

from autoglm.node._publish import (
    CHUNK,
    VariantSpec,
    build_manifest,
    hash_file,
    list_model_files,
    plan_file,
)
from autoglm.node._sample import write_safetensors
from autoglm.protocol import (
    ConfigError,
    FileEntry,
    Manifest,
    Requirements,
    cdc_params_for,
    decode_manifest,
    plan_cdc,
    plan_fixed,
)

KIB = 1024


def _write_random(path: Path, size: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _odd_spans(size: int) -> list[tuple[int, int]]:
    """Spans that start and end off chunk boundaries: 1, 7, CHUNK-3, 1_000_003, then the rest."""
    spans, pos = [], 0
    for n in (1, 7, CHUNK - 3, 1_000_003):
        if pos + n > size:
            break
        spans.append((pos, n))
        pos += n
    spans += [(pos + o, n) for o, n in plan_fixed(size - pos, 3 * CHUNK // 2 + 1)]
    return spans


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12_345]


@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
def test_hash_file_matches_hashlib_and_blake3(tmp_path: Path, size: int) -> None:
    data = _write_random(tmp_path / "f", size, seed=size)
    for spans in (_odd_spans(size), plan_fixed(size, 8 * 1024 * 1024), plan_fixed(size, 65_537)):
        seen: list[int] = []
        sha, hashes = hash_file(tmp_path / "f", spans, seen.append)
        assert sha == hashlib.sha256(data).digest()
        assert hashes == [blake3.blake3(data[o : o + n]).digest() for o, n in spans]
        assert sum(seen) == size


def test_hash_file_notices_a_file_longer_than_its_plan(tmp_path: Path) -> None:
    _write_random(tmp_path / "f", 100)
    with pytest.raises(ConfigError, match="grew"):
        hash_file(tmp_path / "f", plan_fixed(90, 10))


def test_hash_file_notices_a_file_shorter_than_its_plan(tmp_path: Path) -> None:
    _write_random(tmp_path / "f", 100)
    with pytest.raises(ConfigError, match="shrank"):
        hash_file(tmp_path / "f", plan_fixed(110, 10))


def test_hash_file_propagates_progress_errors(tmp_path: Path) -> None:
    _write_random(tmp_path / "f", CHUNK * 2)

    class Stop(Exception):
        pass

    def progress(n: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        hash_file(tmp_path / "f", plan_fixed(CHUNK * 2, CHUNK), progress)


# --- tensor-aligned pieces ------------------------------------------------------------------

MAX_PIECE = 64 * KIB


def _numpy_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": rng.standard_normal((300, 128)).astype(np.float16),  # 76_800 B: 2 pieces
        "layers.0.norm": rng.standard_normal(128).astype(np.float32),  # 512 B
        "layers.0.mlp": rng.standard_normal((256, 256)).astype(np.float32),  # 262_144 B: 4 pieces
        "layers.1.mlp": rng.standard_normal((100, 333)).astype(np.float32),  # 133_200 B: 3 pieces
        "lm_head": rng.integers(-128, 127, (77, 13), dtype=np.int8),  # odd size
    }


def _tensor_spans(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return base, {
        k: (base + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    }


def _check_tensor_aligned(entry: FileEntry, path: Path, max_piece: int) -> None:
    header_end, tensors = _tensor_spans(path)
    pieces = [(p.offset, p.length) for p in entry.pieces]
    assert all(1 <= n <= max_piece for _, n in pieces)
    assert sum(n for _, n in pieces) == entry.size == path.stat().st_size
    # the header (8-byte length + JSON) is its own piece, or max-size pieces if it is large
    header_pieces = [(o, min(max_piece, header_end - o)) for o in range(0, header_end, max_piece)]
    assert pieces[: len(header_pieces)] == header_pieces
    # each tensor is exactly the pieces its span splits into
    allowed = {o for o, _ in header_pieces} | {header_end, entry.size}
    for off, n in tensors.values():
        expect = [(o, min(max_piece, off + n - o)) for o in range(off, off + n, max_piece)]
        assert [p for p in pieces if off <= p[0] < off + n] == expect
        allowed |= {o for o, _ in expect} | {off + n}
    assert {o for o, _ in pieces} | {o + n for o, n in pieces} <= allowed


def _publish(root: Path, max_piece: int = MAX_PIECE, **kw: object) -> Manifest:
    return build_manifest(
        root, name="org/m", version="1", publisher="p", created_at=1, max_piece=max_piece, **kw  # type: ignore[arg-type]
    )


def test_safetensors_pieces_follow_tensors(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    save_file(_numpy_tensors(), str(model / "model.safetensors"), metadata={"format": "np"})
    (model / "config.json").write_text('{"a": 1}\n')
    m = _publish(model)
    assert [f.path for f in m.files] == ["config.json", "model.safetensors"]
    _check_tensor_aligned(m.file("model.safetensors"), model / "model.safetensors", MAX_PIECE)
    assert len(m.file("model.safetensors").pieces) > len(_numpy_tensors()) + 1
    assert decode_manifest(m.encode()) == m


def test_sample_writer_pieces_follow_tensors(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {
        "a": ("F16", (1000, 70)),
        "b": ("F32", (3,)),
        "c": ("BF16", (64, 1024)),
        "d": ("I8", (12_345,)),
    }
    write_safetensors(model / "w.safetensors", tensors, seed=b"t")
    m = _publish(model, max_piece=32 * KIB)
    _check_tensor_aligned(m.file("w.safetensors"), model / "w.safetensors", 32 * KIB)


def test_large_header_gets_split(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    tensors = {f"t{i:04d}": ("U8", (3,)) for i in range(300)}
    write_safetensors(model / "w.safetensors", tensors)
    header_end, _ = _tensor_spans(model / "w.safetensors")
    max_piece = 4 * KIB
    assert header_end > 2 * max_piece
    m = _publish(model, max_piece=max_piece)
    _check_tensor_aligned(m.file("w.safetensors"), model / "w.safetensors", max_piece)


def _changed_ranges(a: Manifest, b: Manifest, path: str) -> list[tuple[int, int]]:
    pa, pb = a.file(path).pieces, b.file(path).pieces
    assert [(p.offset, p.length) for p in pa] == [(p.offset, p.length) for p in pb]
    return [(p.offset, p.length) for p, q in zip(pa, pb, strict=True) if p.hash != q.hash]


def test_fine_tune_of_one_tensor_changes_only_its_pieces(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    tensors = _numpy_tensors()
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text("{}\n")
    before = _publish(model)
    tensors["layers.0.mlp"] = tensors["layers.0.mlp"] + np.float32(1e-3)
    save_file(tensors, str(model / "model.safetensors"))
    after = _publish(model)
    _, spans = _tensor_spans(model / "model.safetensors")
    off, n = spans["layers.0.mlp"]
    changed = _changed_ranges(before, after, "model.safetensors")
    assert changed == [(o, min(MAX_PIECE, off + n - o)) for o in range(off, off + n, MAX_PIECE)]
    assert before.file("config.json") == after.file("config.json")
    assert before.file("model.safetensors").sha256 != after.file("model.safetensors").sha256


def test_fine_tune_in_place_with_sample_writer(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    path = model / "w.safetensors"
    write_safetensors(path, {"a": ("F16", (4096, 10)), "b": ("F16", (5000, 9)), "c": ("F32", (777,))}, seed=b"s")
    before = _publish(model, max_piece=16 * KIB)
    _, spans = _tensor_spans(path)
    off, n = spans["b"]
    with open(path, "r+b") as f:
        f.seek(off + n // 2)
        byte = f.read(1)
        f.seek(off + n // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    after = _publish(model, max_piece=16 * KIB)
    changed = _changed_ranges(before, after, "w.safetensors")
    assert len(changed) == 1
    (c_off, c_len) = changed[0]
    assert off <= c_off <= off + n // 2 < c_off + c_len <= off + n


def test_publish_is_deterministic(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    save_file(_numpy_tensors(), str(model / "model.safetensors"))
    assert _publish(model).encode() == _publish(model).encode()


def test_non_safetensors_files_get_content_defined_pieces(tmp_path: Path) -> None:
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    _write_random(model / "sub" / "blob.bin", 200 * KIB + 1)
    m = _publish(model)
    params = cdc_params_for(MAX_PIECE)
    assert params is not None
    expected = plan_cdc((model / "sub" / "blob.bin").read_bytes(), params)
    assert [(p.offset, p.length) for p in m.file("sub/blob.bin").pieces] == expected
    assert expected != plan_fixed(200 * KIB + 1, MAX_PIECE)


def test_invalid_safetensors_is_a_config_error(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ConfigError, match="not a valid safetensors file"):
        _publish(model)
    with pytest.raises(ConfigError):
        plan_file(model / "w.safetensors", (model / "w.safetensors").stat().st_size, MAX_PIECE)


# --- walking the model directory ------------------------------------------------------------


def test_list_model_files(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("x")
    (root / ".hidden").write_text("x")
    (root / "b").mkdir()
    (root / "b" / "z.bin").write_text("x")
    (root / "a.json").write_text("x")
    (root / "B.txt").write_text("x")
    blob = tmp_path / "blob"
    blob.write_text("x")
    os.symlink(blob, root / "link.bin")
    os.symlink(tmp_path, root / "dirlink")
    (root / "skip.key").write_text("x")
    assert list_model_files(root, exclude=[root / "skip.key"]) == ["B.txt", "a.json", "b/z.bin", "link.bin"]


@pytest.mark.parametrize("names", [("Model.bin", "model.bin"), ("caf\u00e9", "cafe\u0301")])
def test_colliding_names_are_refused_at_publish(tmp_path: Path, names: tuple[str, str]) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for n in names:
        (root / n).write_text(n)
    if len(list(root.iterdir())) < 2:
        pytest.skip("this filesystem folds these names itself")
    with pytest.raises(ConfigError, match="collides"):
        _publish(root)


def test_empty_or_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no files"):
        _publish(tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        _publish(tmp_path / "missing")


def test_variants_are_resolved_from_globs(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    for n in ("config.json", "model.safetensors", "model-q4.gguf"):
        (root / n).write_bytes(b"x" * 10)
    specs = [
        VariantSpec("fp16", ("config.json", "*.safetensors"), Requirements(min_accel_mem=1 << 30, dtype="F16")),
        VariantSpec("q4", ("config.json", "*.gguf")),
    ]
    (root / "model.safetensors").unlink()
    save_file({"w": np.zeros(4, dtype=np.float16)}, str(root / "model.safetensors"))
    m = _publish(root, variants=specs)
    assert m.variant("fp16").files == ("config.json", "model.safetensors")
    assert m.variant("fp16").requirements.dtype == "F16"
    assert m.variant("q4").files == ("config.json", "model-q4.gguf")
    with pytest.raises(ConfigError, match="matches no files"):
        _publish(root, variants=[VariantSpec("none", ("*.onnx",))])
