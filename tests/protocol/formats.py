"""Real model files for planning tests: GGUF through the gguf package, torch-layout zip through zipfile."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np


def write_gguf(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str] | None = None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in (meta or {}).items():
        w.add_string(k, v)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_data_spans(path: Path) -> list[tuple[int, int]]:
    """Each tensor's (offset, length) as the gguf package reads them."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return sorted((int(t.data_offset), int(t.n_bytes)) for t in r.tensors)


def write_torch_zip(path: Path, tensors: dict[str, np.ndarray], align: int = 64) -> None:
    """The layout torch.save writes: stored members under archive/, each storage's data aligned to 64 bytes.

    ``archive/data.pkl`` is a plain pickle of name -> (storage key, dtype, shape);
    torch's own pickle uses persistent ids, which the piece planner never reads.
    """
    index = {name: (str(i), str(a.dtype), a.shape) for i, (name, a) in enumerate(tensors.items())}
    members = [("archive/data.pkl", pickle.dumps(index, protocol=2)), ("archive/byteorder", b"little")]
    members += [(f"archive/data/{i}", a.tobytes()) for i, a in enumerate(tensors.values())]
    members += [("archive/version", b"3\n"), ("archive/.data/serialization_id", b"0" * 40)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            start = zf.fp.tell() + 30 + len(name.encode()) + 4  # type: ignore[union-attr]
            pad = -start % align
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch does
            zf.writestr(info, data)


def zip_data_spans(path: Path) -> list[tuple[int, int]]:
    out = []
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            n, e = struct.unpack("<HH", f.read(4))
            out.append((info.header_offset + 30 + n + e, info.compress_size))
    return sorted(out)
