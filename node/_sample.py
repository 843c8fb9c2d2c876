"""A generated sample model for demos, tests and benchmarks (no downloads)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import blake3

__all__ = ["write_safetensors", "write_sample_model"]

_DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1}


def _stream_bytes(f: object, seed: bytes, n: int) -> None:
    # BLAKE3's extendable output is a fast deterministic byte stream.
    xof = blake3.blake3(seed)
    chunk = 4 * 1024 * 1024
    pos = 0
    while pos < n:
        take = min(chunk, n - pos)
        f.write(xof.digest(length=take, seek=pos))  # type: ignore[attr-defined]
        pos += take


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], seed: bytes = b"") -> None:
    """Write a valid safetensors file with deterministic pseudo-random tensor data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    sizes = []
    for name, (dtype, shape) in tensors.items():
        n = _DTYPE_SIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append((name, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, n in sizes:
            _stream_bytes(f, seed + name.encode(), n)


def write_sample_model(root: Path, size: int = 64 * 1024 * 1024, layers: int = 4, seed: bytes = b"sample") -> None:
    """A small Hugging Face-style folder: config, tokenizer and a safetensors file of about ``size`` bytes."""
    root.mkdir(parents=True, exist_ok=True)
    hidden = 256
    per_layer = max(size // layers, 4 * hidden * hidden)
    rows = max(1, per_layer // (2 * 2 * hidden))
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {"embed.weight": ("F16", (512, hidden))}
    for i in range(layers):
        tensors[f"layers.{i}.norm.weight"] = ("F32", (hidden,))
        tensors[f"layers.{i}.mlp.up.weight"] = ("F16", (rows, hidden))
        tensors[f"layers.{i}.mlp.down.weight"] = ("F16", (hidden, rows))
    write_safetensors(root / "model.safetensors", tensors, seed)
    (root / "config.json").write_text(
        json.dumps({"model_type": "sample", "hidden_size": hidden, "num_hidden_layers": layers}, indent=2) + "\n"
    )
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}) + "\n")
