"""Host side of the verification sandbox, on wasmtime.

Theory of operation: one :class:`wasmtime.Engine` per process compiles each
verifier module once. Every check gets a fresh :class:`wasmtime.Store` with a
fuel budget, an epoch deadline (wall clock, driven by a ticker thread that
runs only while checks are in flight), a memory cap with a single memory, and
the engine's stack cap. The host writes the bytes to check at the module's
``__heap_base`` (growing its memory to fit), calls ``verify_<kind>(len,
file_size)`` and reads the fixed-layout record at ``agv_result``. Only a well-formed record that says "ok" is an ok;
traps, exhausted fuel, deadlines and malformed records are errors, and
errors refuse just as rejections do.

Modules are refused before they run if they import anything or if their
SHA-256 differs from the pin in ``pins.json``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import wasmtime

from autoglm.protocol._errors import SandboxError

__all__ = [
    "DEFAULT_LIMITS",
    "REASON_NAMES",
    "SandboxLimits",
    "Verdict",
    "VerifierModule",
    "builtin_module",
    "builtin_pins",
    "load_module",
    "run_bytes",
    "run_verifier",
]

Status = Literal["ok", "reject", "error"]

#: Mirrors the R_* enum in src/common.h.
REASON_NAMES: dict[int, str] = {
    1: "truncated",
    2: "header_too_large",
    3: "header_beyond_file",
    4: "bad_utf8",
    5: "bad_json",
    6: "bad_schema",
    7: "unknown_dtype",
    8: "shape_mismatch",
    9: "out_of_bounds",
    10: "overlap",
    11: "gap",
    12: "trailing_bytes",
    13: "duplicate",
    14: "limit",
    15: "forbidden_global",
    16: "forbidden_opcode",
    17: "computed_global",
    18: "bad_pickle",
    19: "bad_magic",
    20: "bad_version",
    21: "misaligned",
    22: "overflow",
    23: "metadata",
    24: "out_of_memory",
    25: "forbidden_call",
}

_MAGIC = 0x52564741
_ST_OK, _ST_REJECT, _ST_NEED_MORE = 1, 2, 3
# struct result in src/common.h: 4 x u32, 3 x u64, 2 x u32, reason, 32 x (name[16], u64).
_HEAD = struct.Struct("<IIIIQQQII")
_REASON_MAX = 240
_DTYPE = struct.Struct("<16sQ")
_DTYPE_SLOTS = 32
_RESULT_SIZE = _HEAD.size + _REASON_MAX + _DTYPE.size * _DTYPE_SLOTS
_EXPORTS = ("memory", "__heap_base", "agv_result")
_TICK_S = 0.05
_IDLE_EXIT_S = 5.0
_PAGE = 65536
_MAX_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Per-check limits. Fuel is per byte of input on top of a fixed base."""

    fuel_base: int = 20_000_000
    fuel_per_byte: int = 400
    memory_bytes: int = 512 * 1024 * 1024
    deadline_s: float = 20.0
    max_input: int = 128 * 1024 * 1024

    def fuel_for(self, n: int) -> int:
        return self.fuel_base + self.fuel_per_byte * n


DEFAULT_LIMITS = SandboxLimits()
#: Wasm stack cap, set on the engine (wasmtime configures it per engine).
STACK_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome of one structural check. Only ``status == "ok"`` lets a file load."""

    status: Status
    kind: str
    reason: str = ""
    reason_code: str | None = None
    tensor_count: int = 0
    param_count: int = 0
    dtype_bytes: tuple[tuple[str, int], ...] = ()
    pin: str = ""
    fuel_used: int = 0
    elapsed_s: float = field(default=0.0, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def tensor_bytes(self) -> int:
        return sum(n for _, n in self.dtype_bytes)

    def to_value(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "kind": self.kind,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "tensor_count": self.tensor_count,
            "param_count": self.param_count,
            "dtype_bytes": dict(self.dtype_bytes),
            "tensor_bytes": self.tensor_bytes,
            "pin": self.pin,
            "fuel_used": self.fuel_used,
            "elapsed_s": round(self.elapsed_s, 6),
        }

    @classmethod
    def from_value(cls, v: dict[str, Any]) -> Verdict:
        return cls(
            status=v["status"],
            kind=v["kind"],
            reason=v["reason"],
            reason_code=v["reason_code"],
            tensor_count=int(v["tensor_count"]),
            param_count=int(v["param_count"]),
            dtype_bytes=tuple(sorted((str(k), int(n)) for k, n in v["dtype_bytes"].items())),
            pin=v["pin"],
            fuel_used=int(v.get("fuel_used", 0)),
        )


class _Ticker:
    """Advances the engine epoch every tick while checks are being made.

    One daemon thread per engine. It starts with the first check and exits
    after a while without any, so an idle node has no timer thread. A check
    pays one uncontended lock, never a thread start or a wake-up.
    """

    def __init__(self, engine: wasmtime.Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._active = 0
        self._last_exit = 0.0
        self._running = False

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="wasm-epoch", daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            self._last_exit = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(_TICK_S)
            self._engine.increment_epoch()
            with self._lock:
                if self._active == 0 and time.monotonic() - self._last_exit > _IDLE_EXIT_S:
                    self._running = False
                    return


_engine_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_ticker: _Ticker | None = None


def _get_engine() -> tuple[wasmtime.Engine, _Ticker]:
    global _engine, _ticker
    with _engine_lock:
        if _engine is None or _ticker is None:
            cfg = wasmtime.Config()
            cfg.consume_fuel = True
            cfg.epoch_interruption = True
            cfg.max_wasm_stack = STACK_BYTES
            cfg.wasm_threads = False
            _engine = wasmtime.Engine(cfg)
            _ticker = _Ticker(_engine)
        return _engine, _ticker


@dataclass(frozen=True, slots=True)
class VerifierModule:
    """A compiled verifier whose bytes matched their pin and which imports nothing."""

    kind: str
    pin: str
    module: wasmtime.Module = field(repr=False, compare=False)
    input_base: int = 0
    result_addr: int = 0


def load_module(wasm: bytes, *, kind: str, pin: str) -> VerifierModule:
    """Compile ``wasm`` after checking its pin, its imports and its exports.

    Raises SandboxError for a pin mismatch, any import, or a missing export.
    """
    digest = hashlib.sha256(wasm).hexdigest()
    if digest != pin.lower():
        raise SandboxError(f"verifier {kind!r}: SHA-256 {digest} does not match its pin {pin}")
    engine, _ = _get_engine()
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        raise SandboxError(f"verifier {kind!r} does not compile: {exc}") from exc
    imports = [f"{i.module}.{i.name}" for i in module.imports]
    if imports:
        raise SandboxError(f"verifier {kind!r} imports {', '.join(imports)}; verifier modules may import nothing")
    names = {e.name for e in module.exports}
    missing = [n for n in (*_EXPORTS, f"verify_{kind}") if n not in names]
    if missing:
        raise SandboxError(f"verifier {kind!r} lacks exports {missing}")
    input_base, result_addr = _static_addresses(engine, module, kind)
    return VerifierModule(kind, digest, module, input_base, result_addr)


def _static_addresses(engine: wasmtime.Engine, module: wasmtime.Module, kind: str) -> tuple[int, int]:
    """The input and result addresses: constant globals, read once in a throwaway store."""
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=DEFAULT_LIMITS.memory_bytes, memories=1, tables=1, instances=1)
    store.set_fuel(1_000_000)
    store.set_epoch_deadline(1 << 40)
    try:
        exports = wasmtime.Instance(store, module, []).exports(store)
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        raise SandboxError(f"verifier {kind!r} does not instantiate: {exc}") from exc
    values = []
    for name in ("__heap_base", "agv_result"):
        g = exports[name]
        if not isinstance(g, wasmtime.Global) or g.type(store).mutable:
            raise SandboxError(f"verifier {kind!r}: export {name!r} is not a constant global")
        v = g.value(store)
        if not isinstance(v, int) or v <= 0:
            raise SandboxError(f"verifier {kind!r}: export {name!r} is not an address")
        values.append(v)
    return values[0], values[1]


_builtin: dict[str, VerifierModule] = {}
_builtin_lock = threading.Lock()


def builtin_pins() -> dict[str, str]:
    """kind -> SHA-256 hex of the verifier modules shipped with this package."""
    text = resources.files(__package__).joinpath("pins.json").read_text()
    pins: dict[str, str] = json.loads(text)
    return pins


def builtin_module(kind: str) -> VerifierModule:
    """The shipped verifier for ``kind`` (compiled once per process)."""
    with _builtin_lock:
        mod = _builtin.get(kind)
        if mod is None:
            pins = builtin_pins()
            if kind not in pins:
                raise SandboxError(f"no verifier for {kind!r}; known: {sorted(pins)}")
            wasm = resources.files(__package__).joinpath(f"{kind}.wasm").read_bytes()
            mod = _builtin[kind] = load_module(wasm, kind=kind, pin=pins[kind])
        return mod


def _error(mod: VerifierModule, reason: str, started: float, fuel_used: int = 0) -> Verdict:
    return Verdict("error", mod.kind, reason, None, pin=mod.pin, fuel_used=fuel_used, elapsed_s=time.perf_counter() - started)


def _parse_result(raw: bytes, status: int, mod: VerifierModule) -> tuple[int, int, Verdict] | str:
    """(record status, need_bytes, verdict) or the reason the record is malformed."""
    if len(raw) != _RESULT_SIZE:
        return "result record has the wrong size"
    magic, rstatus, code, rlen, tensors, params, need, n_dtypes, _flags = _HEAD.unpack_from(raw)
    if magic != _MAGIC or rstatus != status or rstatus not in (_ST_OK, _ST_REJECT, _ST_NEED_MORE):
        return f"malformed result record (status {status}, record status {rstatus})"
    if rlen > _REASON_MAX or n_dtypes > _DTYPE_SLOTS:
        return "malformed result record (lengths out of range)"
    reason_raw = raw[_HEAD.size : _HEAD.size + rlen]
    if any(b < 0x20 or b > 0x7E for b in reason_raw):
        return "malformed result record (reason is not printable ASCII)"
    dtypes: list[tuple[str, int]] = []
    for i in range(n_dtypes):
        name_raw, nbytes = _DTYPE.unpack_from(raw, _HEAD.size + _REASON_MAX + i * _DTYPE.size)
        name = name_raw.rstrip(b"\0")
        if not name or b"\0" in name or not name.isascii() or not name.decode().isprintable():
            return "malformed result record (dtype name)"
        dtypes.append((name.decode(), nbytes))
    if rstatus == _ST_OK and code != 0:
        return "malformed result record (ok with a reason code)"
    if rstatus == _ST_REJECT and (code not in REASON_NAMES or rlen == 0):
        return "malformed result record (reject without a known reason)"
    if rstatus != _ST_OK:
        tensors, params, dtypes = 0, 0, []
    v = Verdict(
        status="ok" if rstatus == _ST_OK else "reject",
        kind=mod.kind,
        reason=reason_raw.decode(),
        reason_code=REASON_NAMES.get(code),
        tensor_count=tensors,
        param_count=params,
        dtype_bytes=tuple(sorted(dtypes)),
        pin=mod.pin,
    )
    return rstatus, need, v


def _run_once(mod: VerifierModule, data: bytes, file_size: int, limits: SandboxLimits) -> tuple[int, int, Verdict] | str:
    engine, ticker = _get_engine()
    store = wasmtime.Store(engine)
    store.set_limits(memory_size=limits.memory_bytes, memories=1, tables=1, instances=1, table_elements=10_000)
    fuel = limits.fuel_for(len(data))
    store.set_fuel(fuel)
    store.set_epoch_deadline(max(1, int(limits.deadline_s / _TICK_S)))
    with ticker:
        try:
            exports = wasmtime.Instance(store, mod.module, []).exports(store)
            memory, verify = exports["memory"], exports[f"verify_{mod.kind}"]
            if not isinstance(memory, wasmtime.Memory) or not isinstance(verify, wasmtime.Func):
                return "exports have the wrong kinds"
            end = mod.input_base + len(data)
            have = memory.data_len(store)
            if end > have:
                memory.grow(store, (end - have + _PAGE - 1) // _PAGE)
            if end > memory.data_len(store):
                return f"input of {len(data)} bytes does not fit the sandbox memory limit"
            # Direct, bounds-checked copies: the bindings' read/write build a ctypes type per call.
            base = ctypes.addressof(memory.data_ptr(store).contents)
            ctypes.memmove(base + mod.input_base, data, len(data))
            status = verify(store, len(data), file_size)
            size = memory.data_len(store)
            if not isinstance(status, int) or mod.result_addr + _RESULT_SIZE > size:
                return "malformed result (bad status or result address)"
            base = ctypes.addressof(memory.data_ptr(store).contents)
            raw = ctypes.string_at(base + mod.result_addr, _RESULT_SIZE)
            used = fuel - store.get_fuel()
        except wasmtime.Trap as exc:
            code = exc.trap_code
            if code == wasmtime.TrapCode.OUT_OF_FUEL:
                return f"verifier ran out of fuel ({fuel} units)"
            if code == wasmtime.TrapCode.INTERRUPT:
                return f"verifier passed its {limits.deadline_s:g} s deadline"
            name = code.name.lower() if code is not None else "unknown"
            return f"verifier trapped ({name})"
        except wasmtime.WasmtimeError as exc:
            if "grow" in str(exc) or "memory" in str(exc):
                return f"input of {len(data)} bytes does not fit the sandbox memory limit"
            return f"sandbox error: {exc}"
    parsed = _parse_result(raw, status, mod)
    if isinstance(parsed, str):
        return parsed
    return parsed[0], parsed[1], dataclasses.replace(parsed[2], fuel_used=used)


def run_verifier(
    mod: VerifierModule,
    read: Callable[[int], bytes],
    file_size: int,
    *,
    first_read: int = 1 << 20,
    limits: SandboxLimits = DEFAULT_LIMITS,
) -> Verdict:
    """Check a file whose first bytes ``read(n)`` returns (fewer at EOF).

    The host hands the module a prefix of the file; a module that needs more
    (a safetensors header longer than the first read, a GGUF tokenizer) says
    how much, and the check reruns in a fresh store with that much, up to
    ``limits.max_input``. Never raises for hostile input: the verdict says.
    """
    started = time.perf_counter()
    want = min(first_read, file_size, limits.max_input)
    used = 0
    for _ in range(_MAX_ROUNDS):
        data = read(want)
        out = _run_once(mod, data, file_size, limits)
        if isinstance(out, str):
            return _error(mod, out, started)
        rstatus, need, verdict = out
        if rstatus != _ST_NEED_MORE:
            return Verdict(
                verdict.status,
                verdict.kind,
                verdict.reason,
                verdict.reason_code,
                verdict.tensor_count,
                verdict.param_count,
                verdict.dtype_bytes,
                mod.pin,
                used + verdict.fuel_used,
                time.perf_counter() - started,
            )
        if need <= len(data) or need > file_size:
            return _error(mod, f"verifier asked for {need} bytes, which is not more than it had or past the end of the file", started)
        if need > limits.max_input:
            return Verdict(
                "reject",
                mod.kind,
                f"the header region ({need} bytes) is over the {limits.max_input}-byte sandbox input limit",
                "limit",
                pin=mod.pin,
                elapsed_s=time.perf_counter() - started,
            )
        used += verdict.fuel_used
        want = need
    return _error(mod, "verifier kept asking for more input", started)


def run_bytes(mod: VerifierModule, data: bytes, *, limits: SandboxLimits = DEFAULT_LIMITS) -> Verdict:
    """Check an in-memory blob (a pickle member, a test vector) as a whole file."""
    return run_verifier(mod, lambda n: data[:n], len(data), first_read=len(data) or 1, limits=limits)
