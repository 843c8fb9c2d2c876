"""Writers for the test corpus: good model files and hostile ones.

torch is not installed, so torch-style checkpoints are assembled opcode by
opcode, matching what ``torch.save`` writes: a zip with ``<root>/data.pkl``
(pickle protocol 2), ``<root>/data/<key>`` storages and ``<root>/version``.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

P = pickle  # opcode constants: P.MARK, P.GLOBAL, ...

_STORAGE = {"F32": ("FloatStorage", 4), "F16": ("HalfStorage", 2), "BF16": ("BFloat16Storage", 2), "I64": ("LongStorage", 8)}


def s(text: str) -> bytes:
    """BINUNICODE string constant."""
    raw = text.encode()
    return P.BINUNICODE + struct.pack("<I", len(raw)) + raw


def i(n: int) -> bytes:
    if 0 <= n < 256:
        return P.BININT1 + bytes([n])
    if 0 <= n < 65536:
        return P.BININT2 + struct.pack("<H", n)
    return P.BININT + struct.pack("<i", n)


def glob(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    if not items:
        return P.EMPTY_TUPLE
    return P.MARK + b"".join(items) + P.TUPLE


def put(k: int) -> bytes:
    return P.BINPUT + bytes([k])


def get(k: int) -> bytes:
    return P.BINGET + bytes([k])


def rebuild_tensor(key: str, dtype: str, shape: Sequence[int]) -> bytes:
    storage_type, _ = _STORAGE[dtype]
    numel = int(np.prod(shape)) if shape else 1
    stride = [int(np.prod(shape[k + 1 :])) for k in range(len(shape))]
    persid = tup(s("storage"), glob("torch", storage_type), s(key), s("cpu"), i(numel)) + P.BINPERSID
    args = tup(
        persid,
        i(0),
        tup(*[i(d) for d in shape]),
        tup(*[i(d) for d in stride]),
        P.NEWFALSE,
        glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE,
    )
    return glob("torch._utils", "_rebuild_tensor_v2") + args + P.REDUCE


def state_dict_pickle(tensors: dict[str, tuple[str, Sequence[int]]], *, body: bytes | None = None) -> bytes:
    """A protocol-2 pickle of an OrderedDict of tensors, as torch.save writes it."""
    items = b"".join(s(name) + rebuild_tensor(str(k), dt, shape) for k, (name, (dt, shape)) in enumerate(tensors.items()))
    inner = body if body is not None else P.MARK + items + P.SETITEMS
    return P.PROTO + b"\x02" + glob("collections", "OrderedDict") + put(0) + P.EMPTY_TUPLE + P.REDUCE + put(1) + inner + P.STOP


def write_torch_zip(
    path: Path,
    tensors: dict[str, tuple[str, Sequence[int]]],
    *,
    pkl: bytes | None = None,
    root: str = "archive",
    extra: dict[str, bytes] | None = None,
) -> Path:
    data = pkl if pkl is not None else state_dict_pickle(tensors)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", data)
        for k, (_name, (dt, shape)) in enumerate(tensors.items()):
            numel = int(np.prod(shape)) if shape else 1
            z.writestr(f"{root}/data/{k}", b"\0" * (numel * _STORAGE[dt][1]))
        z.writestr(f"{root}/version", b"3\n")
        for name, blob in (extra or {}).items():
            z.writestr(name, blob)
    return path


class FakeTorchUnpickler(pickle.Unpickler):
    """Loads our torch-style pickles without torch, to prove they are real pickles."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, off, size, stride, rg, hooks, *rest: ("tensor", storage, tuple(size))
        if module == "torch":
            return f"torch.{name}"
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return ("storage", pid[2], pid[4])


def load_fake(data: bytes) -> Any:
    return FakeTorchUnpickler(io.BytesIO(data)).load()


def hostile_pickles() -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, expected reason_code)."""
    sd = {"w": ("F32", [2, 2])}
    good_items = s("w") + rebuild_tensor("0", "F32", [2, 2])

    def wrap(body: bytes) -> bytes:
        return state_dict_pickle(sd, body=body)

    os_system = glob("os", "system") + tup(s("echo pwned")) + P.REDUCE
    cases: dict[str, tuple[bytes, str]] = {
        "os_system_top": (P.PROTO + b"\x02" + os_system + P.STOP, "forbidden_global"),
        "os_system_nested": (wrap(P.MARK + good_items + s("x") + tup(tup(os_system)) + P.SETITEMS), "forbidden_global"),
        "builtins_eval": (wrap(P.MARK + s("x") + glob("builtins", "eval") + tup(s("1+1")) + P.REDUCE + P.SETITEMS), "forbidden_global"),
        "builtins_exec_in_list": (
            wrap(P.MARK + s("x") + P.EMPTY_LIST + P.MARK + glob("builtins", "exec") + tup(s("import os")) + P.REDUCE + P.APPENDS + P.SETITEMS),
            "forbidden_global",
        ),
        "getattr_chain": (
            wrap(
                P.MARK
                + s("x")
                + glob("builtins", "getattr")
                + tup(glob("collections", "OrderedDict"), s("__init__"))
                + P.REDUCE
                + P.SETITEMS
            ),
            "forbidden_global",
        ),
        "py2_builtin_eval": (P.PROTO + b"\x02" + glob("__builtin__", "eval") + tup(s("1")) + P.REDUCE + P.STOP, "forbidden_global"),
        "stack_global_os": (P.PROTO + b"\x04" + s("os") + s("system") + P.STACK_GLOBAL + tup(s("id")) + P.REDUCE + P.STOP, "forbidden_global"),
        "stack_global_computed": (
            # module name produced by a call (OrderedDict().__class__ ...): not a constant
            P.PROTO
            + b"\x04"
            + glob("collections", "OrderedDict")
            + P.EMPTY_TUPLE
            + P.REDUCE
            + s("system")
            + P.STACK_GLOBAL
            + P.STOP,
            "computed_global",
        ),
        "stack_global_bytes_operands": (
            P.PROTO + b"\x04" + P.SHORT_BINBYTES + b"\x02os" + P.SHORT_BINBYTES + b"\x06system" + P.STACK_GLOBAL + P.STOP,
            "computed_global",
        ),
        "memo_smuggle_callable": (
            # allowed callable memoized, then an evil global stored over... and fetched by BINGET
            P.PROTO + b"\x02" + glob("posix", "system") + put(5) + P.POP + get(5) + tup(s("id")) + P.REDUCE + P.STOP,
            "forbidden_global",
        ),
        "memo_computed_name": (
            # a call result memoized and fetched back as a STACK_GLOBAL operand
            P.PROTO
            + b"\x04"
            + glob("collections", "OrderedDict")
            + P.EMPTY_TUPLE
            + P.REDUCE
            + put(3)
            + P.POP
            + get(3)
            + s("system")
            + P.STACK_GLOBAL
            + P.STOP,
            "computed_global",
        ),
        "reduce_on_storage_type": (
            wrap(P.MARK + s("x") + glob("torch", "FloatStorage") + tup(i(1 << 30)) + P.REDUCE + P.SETITEMS),
            "forbidden_call",
        ),
        "reduce_on_call_result": (
            wrap(P.MARK + s("x") + glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + tup() + P.REDUCE + P.SETITEMS),
            "forbidden_call",
        ),
        "inst_os_system": (P.MARK + s("id") + P.INST + b"os\nsystem\n" + P.STOP, "forbidden_global"),
        "obj_subprocess": (P.PROTO + b"\x02" + P.MARK + glob("subprocess", "Popen") + s("id") + P.OBJ + P.STOP, "forbidden_global"),
        "ext_opcode": (P.PROTO + b"\x02" + P.EXT1 + b"\x01" + P.STOP, "forbidden_opcode"),
        "persid_text": (P.PERSID + b"evil\n" + P.STOP, "forbidden_opcode"),
        "build_on_dict": (P.PROTO + b"\x02" + P.EMPTY_DICT + P.EMPTY_DICT + P.BUILD + P.STOP, "forbidden_call"),
        "binpersid_not_storage": (P.PROTO + b"\x02" + s("x") + P.BINPERSID + P.STOP, "forbidden_call"),
        "nested_dotted_name": (P.PROTO + b"\x04" + s("torch") + s("_utils.os.system") + P.STACK_GLOBAL + P.STOP, "forbidden_global"),
        "truncated": (state_dict_pickle(sd)[:-5], "bad_pickle"),
        "trailing_bytes": (state_dict_pickle(sd) + b"junk", "trailing_bytes"),
        "unknown_opcode": (P.PROTO + b"\x02" + b"\xff" + P.STOP, "bad_pickle"),
    }
    return cases


# ---- safetensors ---------------------------------------------------------------


def safetensors_bytes(header: dict[str, Any], data: bytes, *, pad_to: int = 8) -> bytes:
    import json

    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % pad_to)
    return struct.pack("<Q", len(h)) + h + data


def raw_safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def hostile_safetensors() -> dict[str, tuple[bytes, str]]:
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases: dict[str, tuple[bytes, str]] = {
        "header_beyond_file": (struct.pack("<Q", 1 << 20) + b"{}", "header_beyond_file"),
        "header_too_large": (struct.pack("<Q", 1 << 40) + b"{}", "header_too_large"),
        "overlap": (
            safetensors_bytes({"a": t, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
            "overlap",
        ),
        "out_of_bounds": (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "out_of_bounds"),
        "shape_mismatch": (safetensors_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "shape_mismatch"),
        "gap": (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "gap"),
        "trailing": (safetensors_bytes({"a": t}, b"\0" * 9), "trailing_bytes"),
        "unknown_dtype": (safetensors_bytes({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown_dtype"),
        "negative_dim": (safetensors_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad_schema"),
        "float_offset": (raw_safetensors(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', b"\0" * 8), "bad_schema"),
        "duplicate_name": (
            raw_safetensors(
                b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
                b"\0" * 8,
            ),
            "duplicate",
        ),
        "not_json": (struct.pack("<Q", 8) + b"{garbage" + b"\0" * 8, "bad_json"),
        "bad_utf8": (struct.pack("<Q", 8) + b'{"\xff":1}' + b"\0" * 8, "bad_utf8"),
        "metadata_not_string": (safetensors_bytes({"__metadata__": {"k": 1}}, b""), "metadata"),
        "overflow_shape": (
            safetensors_bytes({"a": {"dtype": "F32", "shape": [1 << 32, 1 << 32, 16], "data_offsets": [0, 8]}}, b"\0" * 8),
            "overflow",
        ),
        "unknown_field": (safetensors_bytes({"a": {**t, "evil": 1}}, b"\0" * 8), "bad_schema"),
    }
    return cases


Writer = Callable[[Path], Path]


# ---- torch.save, reproduced with the real pickler ------------------------------------


def pickler_state_dict(tensors: dict[str, tuple[str, Sequence[int]]], *, shared: bool = False) -> bytes:
    """What ``torch.save(model.state_dict())`` puts in data.pkl, made by pickle.Pickler.

    Fake ``torch`` and ``torch._utils`` modules stand in while pickling, so the
    pickler emits torch's exact globals, memo puts, persistent ids and the
    ``_metadata`` attribute that real state dicts carry.
    """
    import collections
    import sys
    import types

    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args: Any) -> Any:
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    torch._utils = utils  # type: ignore[attr-defined]
    storage_types = {}
    for dt, (name, _size) in _STORAGE.items():
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
        storage_types[dt] = cls

    class Storage:
        def __init__(self, key: str, dtype: str, numel: int) -> None:
            self.key, self.dtype, self.numel = key, dtype, numel

    class Tensor:
        def __init__(self, storage: Storage, shape: Sequence[int]) -> None:
            self.storage, self.shape = storage, tuple(shape)

        def __reduce_ex__(self, proto: int) -> Any:
            stride = tuple(int(np.prod(self.shape[k + 1 :])) for k in range(len(self.shape)))
            return (_rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))

    class TorchPickler(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if isinstance(obj, Storage):
                return ("storage", storage_types[obj.dtype], obj.key, "cpu", obj.numel)
            return None

    sd: Any = collections.OrderedDict()
    first: Storage | None = None
    for k, (name, (dt, shape)) in enumerate(tensors.items()):
        numel = int(np.prod(shape)) if shape else 1
        st = first if (shared and first is not None and first.dtype == dt and first.numel == numel) else Storage(str(k), dt, numel)
        first = first or st
        sd[name] = Tensor(st, shape)
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("encoder", {"version": 1})])
    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        buf = io.BytesIO()
        TorchPickler(buf, protocol=2).dump(sd)
        return buf.getvalue()
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
