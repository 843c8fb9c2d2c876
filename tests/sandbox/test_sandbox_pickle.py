"""Torch zip pickles: the allow-list walker, the host zip checks, the hostile corpus."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from autoglm.node._gate import verify_path
from autoglm.wasm_verify import builtin_module, run_bytes

from ._corpus import hostile_pickles, load_fake, state_dict_pickle, write_torch_zip

MOD = builtin_module("pickle")
SD = {"encoder.weight": ("F32", [4, 3]), "encoder.bias": ("F16", [4]), "step": ("I64", [])}


def test_good_pickle_is_a_real_pickle_and_passes() -> None:
    data = state_dict_pickle(SD)
    loaded = load_fake(data)
    assert list(loaded) == list(SD)
    v = run_bytes(MOD, data)
    assert v.ok, v.reason
    assert (v.tensor_count, v.param_count) == (3, 12 + 4 + 1)
    assert dict(v.dtype_bytes) == {"F32": 48, "F16": 8, "I64": 8}


def test_memoized_protocol4_pickle_passes() -> None:
    # The same structure through STACK_GLOBAL on memoized constants, as protocol 4 writes it.
    from ._corpus import P, put, s, tup

    g = s("collections") + put(10) + s("OrderedDict") + put(11) + P.STACK_GLOBAL
    body = P.PROTO + b"\x04" + g + P.EMPTY_TUPLE + P.REDUCE + P.BINGET + b"\x0a" + P.BINGET + b"\x0b" + P.STACK_GLOBAL
    body += tup() + P.REDUCE + P.TUPLE2 + P.STOP
    assert pickle.loads(body) is not None
    v = run_bytes(MOD, body)
    assert v.ok, v.reason


def test_good_torch_zip_via_gate(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "pytorch_model.bin", SD)
    v = verify_path(path)
    assert v.ok, v.reason
    assert v.kind == "torch_zip" and v.tensor_count == 3


@pytest.mark.parametrize("name", sorted(hostile_pickles()))
def test_hostile_pickles_refused_with_reason(name: str, tmp_path: Path) -> None:
    data, code = hostile_pickles()[name]
    v = run_bytes(MOD, data)
    assert v.status == "reject", v
    assert v.reason_code == code, v.reason
    # and the same inside a torch zip, through the gate
    path = write_torch_zip(tmp_path / "m.pt", {}, pkl=data)
    gv = verify_path(path)
    assert not gv.ok and gv.reason_code == code


def test_zip_member_path_traversal_refused(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "m.bin", SD, extra={"archive/../../etc/evil": b"x"})
    v = verify_path(path)
    assert v.reason_code == "path_traversal", v.reason


def test_zip_absolute_member_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", state_dict_pickle({}))
        zi = zipfile.ZipInfo("archive/x")
        zi.filename = "/abs/path"
        z.writestr(zi, b"x")
    assert verify_path(path).reason_code == "path_traversal"


def test_zip_storage_bytes_must_match(tmp_path: Path) -> None:
    path = write_torch_zip(tmp_path / "m.bin", SD, extra={"archive/data/99": b"\0" * 10})
    assert verify_path(path).reason_code == "storage_mismatch"


def test_legacy_torch_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "old.bin"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2))
    v = verify_path(path)
    assert v.reason_code == "legacy_torch" and "legacy" in v.reason


def test_plain_pickle_file_checked(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(print, protocol=2))
    v = verify_path(path)
    assert v.reason_code == "forbidden_global" and "__builtin__.print" in v.reason


def test_every_opcode_truncation_is_refused_not_crashed() -> None:
    data = state_dict_pickle(SD)
    for k in range(len(data)):
        v = run_bytes(MOD, data[:k])
        assert v.status == "reject", (k, v)


def test_state_dict_from_the_real_pickler() -> None:
    """torch.save's layout (memo puts, hooks, _metadata via BUILD), emitted by pickle.Pickler itself."""
    from ._corpus import pickler_state_dict

    data = pickler_state_dict(SD)
    v = run_bytes(MOD, data)
    assert v.ok, v.reason
    assert (v.tensor_count, v.param_count) == (3, 17)
    assert dict(v.dtype_bytes) == {"F32": 48, "F16": 8, "I64": 8}


def test_shared_storage_counted_once() -> None:
    from ._corpus import pickler_state_dict

    data = pickler_state_dict({"a": ("F32", [2, 3]), "b": ("F32", [3, 2])}, shared=True)
    v = run_bytes(MOD, data)
    assert v.ok, v.reason
    assert v.tensor_count == 2 and dict(v.dtype_bytes) == {"F32": 24}


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "LongStorage"),
}


class _Watch(pickle.Unpickler):
    """Records every global an unpickler would resolve, and resolves none."""

    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.asked: list[tuple[str, str]] = []

    def find_class(self, module: str, name: str) -> object:
        self.asked.append((module, name))
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        return lambda *a, **k: None

    def persistent_load(self, pid: object) -> object:
        return None


def test_mutation_fuzz_accepted_pickles_only_reach_the_allow_list() -> None:
    """Byte flips of good pickles: never a sandbox error, and nothing accepted names a global outside the list."""
    import random

    from ._corpus import pickler_state_dict

    rng = random.Random(7)
    base = [pickler_state_dict(SD), state_dict_pickle(SD)]
    for case in range(400):
        b = bytearray(rng.choice(base))
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        v = run_bytes(MOD, bytes(b))
        assert v.status in ("ok", "reject"), (case, v)
        if v.ok:
            w = _Watch(bytes(b))
            try:
                w.load()
            except Exception:  # a mutated pickle may fail to load; only the globals matter
                pass
            assert set(w.asked) <= _ALLOWED_GLOBALS, (case, w.asked)
