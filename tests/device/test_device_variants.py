"""Variant choice, table-driven: the device is a parameter, never probed here."""

from __future__ import annotations

from dataclasses import replace

import pytest

from autoglm.node._device import CpuInfo, DeviceInfo, GpuInfo
from autoglm.node._variants import fit_problems, resolve_variant
from autoglm.protocol import ConfigError, FileEntry, Manifest, Requirements, Variant

GiB = 1 << 30
CPU16 = DeviceInfo("Linux", "x86_64", "3.11.7", CpuInfo("cpu", 16, 8, ("avx2",)), 16 * GiB, 15 * GiB, None, None)


def gpu(mem_gib: int, cc: tuple[int, int] = (8, 0)) -> GpuInfo:
    return GpuInfo(0, "GPU", mem_gib * GiB, mem_gib * GiB, cc)


def dev(ram_gib: int = 16, *gpus: GpuInfo) -> DeviceInfo:
    return replace(CPU16, ram_total=ram_gib * GiB, gpus=tuple(gpus))


def manifest(*variants: Variant) -> Manifest:
    f = FileEntry("a", 0, b"\0" * 32, ())
    return Manifest("m", "1", 0, "p", (f,), variants)


V_Q4 = Variant("q4-gguf", ("a",), Requirements(min_ram=6 * GiB, accel="cpu"))
V_Q8 = Variant("q8-gguf", ("a",), Requirements(min_ram=12 * GiB, accel="cpu"))
V_FP16 = Variant("fp16", ("a",), Requirements(min_ram=16 * GiB, min_accel_mem=24 * GiB, accel="cuda", dtype="fp16"))
V_BF16 = Variant("bf16", ("a",), Requirements(min_ram=16 * GiB, min_accel_mem=24 * GiB, accel="cuda", dtype="bf16"))
V_FP8 = Variant("fp8", ("a",), Requirements(min_accel_mem=80 * GiB, accel="cuda", dtype="fp8"))
M = manifest(V_Q4, V_Q8, V_FP16, V_BF16, V_FP8)


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (dev(8), "q4-gguf"),
        (dev(16), "q8-gguf"),
        (dev(32, gpu(24)), "bf16"),  # bf16 and fp16 tie on needs: name breaks the tie
        (dev(32, gpu(24, (7, 5))), "fp16"),  # Turing: no native bf16
        (dev(32, gpu(80, (9, 0))), "fp8"),
        (dev(32, gpu(80, (8, 0))), "bf16"),  # A100: no fp8
        (dev(64, gpu(16)), "q8-gguf"),  # GPU too small for the GPU variants
    ],
)
def test_auto_picks_the_best_fitting_variant(device: DeviceInfo, expected: str) -> None:
    v, warnings = resolve_variant(M, "auto", device)
    assert v is not None and v.name == expected
    assert warnings == []


def test_auto_with_nothing_fitting_explains_why() -> None:
    with pytest.raises(ConfigError, match=r"no variant .* fits.*q4-gguf: needs 6\.0 GiB RAM"):
        resolve_variant(M, "auto", dev(2))


def test_all_and_none_mean_every_file() -> None:
    assert resolve_variant(M, None, dev(2)) == (None, [])
    assert resolve_variant(M, "all", dev(2)) == (None, [])


def test_auto_without_variants_fetches_everything() -> None:
    v, warnings = resolve_variant(manifest(), "auto", dev(2))
    assert v is None and warnings


def test_named_variant_that_does_not_fit_warns() -> None:
    v, warnings = resolve_variant(M, "fp16", dev(8))
    assert v == V_FP16
    assert any("CUDA GPU" in w for w in warnings) and any("RAM" in w for w in warnings)
    assert resolve_variant(M, "q4-gguf", dev(8)) == (V_Q4, [])


def test_unknown_name_lists_the_variants() -> None:
    with pytest.raises(ConfigError, match="q4-gguf, q8-gguf, fp16, bf16, fp8"):
        resolve_variant(M, "int3", dev(8))


def test_unknown_accelerator_does_not_fit() -> None:
    r = Requirements(accel="metal")
    assert fit_problems(r, dev(64, gpu(80))) == ["needs accelerator 'metal', which this node cannot detect"]
    assert fit_problems(Requirements(), dev(1)) == []


def test_default_device_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    from autoglm.node import _variants

    monkeypatch.setattr(_variants, "probe_device", lambda: dev(8))
    v, _ = resolve_variant(M, "auto")
    assert v is not None and v.name == "q4-gguf"
