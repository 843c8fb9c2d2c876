"""The host runtime: pins, imports and limits hold against hostile modules."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import wasmtime

from autoglm.node.errors import SandboxError
from autoglm.wasm_verify import SandboxLimits, builtin_module, builtin_pins, load_module, run_bytes

WASM_DIR = Path(__file__).resolve().parents[2] / "wasm_verify"

# A module with the verifier interface whose verify_evil body is supplied per test.
_SHELL = """
(module
  (memory (export "memory") 2 65536)
  (global (export "__heap_base") i32 (i32.const 1024))
  (global (export "agv_result") i32 (i32.const 64))
  {extra}
  (func (export "verify_evil") (param i32 i64) (result i32)
    {body}))
"""


def evil(body: str, extra: str = "") -> tuple[bytes, str]:
    wasm = wasmtime.wat2wasm(_SHELL.format(body=body, extra=extra))
    return wasm, hashlib.sha256(wasm).hexdigest()


def run_evil(body: str, extra: str = "", limits: SandboxLimits = SandboxLimits()) -> object:
    wasm, pin = evil(body, extra)
    return run_bytes(load_module(wasm, kind="evil", pin=pin), b"some input", limits=limits)


def test_shipped_modules_match_pins_and_import_nothing() -> None:
    pins = builtin_pins()
    assert set(pins) == {"safetensors", "pickle", "gguf"}
    assert json.loads((WASM_DIR / "pins.json").read_text()) == pins
    for kind, pin in pins.items():
        assert hashlib.sha256((WASM_DIR / f"{kind}.wasm").read_bytes()).hexdigest() == pin
        assert builtin_module(kind).module.imports == []


def test_infinite_loop_runs_out_of_fuel() -> None:
    start = time.perf_counter()
    v = run_evil("(loop (br 0)) (i32.const 1)", limits=SandboxLimits(fuel_base=5_000_000, fuel_per_byte=0))
    assert v.status == "error" and "fuel" in v.reason  # type: ignore[attr-defined]
    assert time.perf_counter() - start < 5


def test_infinite_loop_hits_the_wall_clock_deadline() -> None:
    limits = SandboxLimits(fuel_base=10**15, fuel_per_byte=0, deadline_s=0.2)
    start = time.perf_counter()
    v = run_evil("(loop (br 0)) (i32.const 1)", limits=limits)
    assert v.status == "error" and "deadline" in v.reason  # type: ignore[attr-defined]
    assert time.perf_counter() - start < 5


def test_memory_bomb_stopped_by_the_store_limit() -> None:
    body = "(loop (br_if 0 (i32.ne (memory.grow (i32.const 256)) (i32.const -1)))) unreachable"
    v = run_evil(body, limits=SandboxLimits(memory_bytes=64 << 20))
    assert v.status == "error" and "trap" in v.reason  # type: ignore[attr-defined]


def test_stack_overflow_is_a_trap() -> None:
    extra = "(func $r (param i32) (result i32) (call $r (i32.add (local.get 0) (i32.const 1))))"
    v = run_evil("(call $r (i32.const 0))", extra=extra)
    assert v.status == "error" and "stack_overflow" in v.reason  # type: ignore[attr-defined]


def test_module_with_imports_refused() -> None:
    wasm = wasmtime.wat2wasm(
        '(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'
        ' (memory (export "memory") 1) (global (export "__heap_base") i32 (i32.const 1024))'
        ' (global (export "agv_result") i32 (i32.const 64))'
        ' (func (export "verify_evil") (param i32 i64) (result i32) (i32.const 1)))'
    )
    with pytest.raises(SandboxError, match="imports wasi_snapshot_preview1.fd_write"):
        load_module(wasm, kind="evil", pin=hashlib.sha256(wasm).hexdigest())


def test_module_with_wrong_pin_refused() -> None:
    wasm, _ = evil("(i32.const 1)")
    with pytest.raises(SandboxError, match="does not match its pin"):
        load_module(wasm, kind="evil", pin="00" * 32)
    shipped = (WASM_DIR / "safetensors.wasm").read_bytes()
    tampered = shipped[:-1] + bytes([shipped[-1] ^ 1])
    with pytest.raises(SandboxError, match="pin"):
        load_module(tampered, kind="safetensors", pin=builtin_pins()["safetensors"])


def test_malformed_result_is_an_error_not_ok() -> None:
    # returns "ok" but never writes the result record
    v = run_evil("(i32.const 1)")
    assert v.status == "error" and "malformed" in v.reason  # type: ignore[attr-defined]
    # writes a plausible record whose status disagrees with the return value
    body = "(i32.store (i32.const 64) (i32.const 0x52564741)) (i32.store (i32.const 68) (i32.const 2)) (i32.const 1)"
    v = run_evil(body)
    assert v.status == "error"  # type: ignore[attr-defined]


def test_forged_ok_record_with_garbage_reason_is_an_error() -> None:
    body = (
        "(i32.store (i32.const 64) (i32.const 0x52564741)) (i32.store (i32.const 68) (i32.const 1))"
        " (i32.store (i32.const 76) (i32.const 5)) (i32.store (i32.const 112) (i32.const 0x01020304)) (i32.const 1)"
    )
    v = run_evil(body)
    assert v.status == "error"  # type: ignore[attr-defined]


def test_input_beyond_the_memory_limit_is_an_error() -> None:
    wasm, pin = evil("(i32.const 1)")
    v = run_bytes(load_module(wasm, kind="evil", pin=pin), b"x" * (3 << 20), limits=SandboxLimits(memory_bytes=2 << 20))
    assert v.status == "error" and "memory" in v.reason


def test_mutable_address_globals_refused() -> None:
    wasm = wasmtime.wat2wasm(
        '(module (memory (export "memory") 1) (global (export "__heap_base") (mut i32) (i32.const 1024))'
        ' (global (export "agv_result") i32 (i32.const 64))'
        ' (func (export "verify_evil") (param i32 i64) (result i32) (i32.const 1)))'
    )
    with pytest.raises(SandboxError, match="constant global"):
        load_module(wasm, kind="evil", pin=hashlib.sha256(wasm).hexdigest())


def test_a_fresh_store_per_check() -> None:
    # state left by one check (a global counter) must not leak into the next
    extra = "(global $n (mut i32) (i32.const 0))"
    body = (
        "(global.set $n (i32.add (global.get $n) (i32.const 1)))"
        " (if (i32.gt_u (global.get $n) (i32.const 1)) (then unreachable))"
        " (i32.store (i32.const 64) (i32.const 0x52564741)) (i32.store (i32.const 68) (i32.const 1)) (i32.const 1)"
    )
    wasm, pin = evil(body, extra)
    mod = load_module(wasm, kind="evil", pin=pin)
    assert run_bytes(mod, b"x").ok
    assert run_bytes(mod, b"x").ok
