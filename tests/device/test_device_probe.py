"""The capability probe, on this machine and against NVML where a GPU exists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autoglm.node import _device
from autoglm.node._device import DeviceInfo, probe_device, probe_gpus

try:
    import pynvml

    pynvml.nvmlInit()
    HAVE_GPU = pynvml.nvmlDeviceGetCount() > 0
    pynvml.nvmlShutdown()
except Exception:
    HAVE_GPU = False

needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="no NVIDIA GPU with NVML (nvidia-ml-py) on this machine")


def test_probe_reports_this_machine(tmp_path: Path) -> None:
    d = probe_device(tmp_path / "not-yet-created")
    assert d.cpu.logical_cores >= 1
    assert d.ram_total > 0 and 0 < d.ram_available <= d.ram_total
    assert d.disk_free is not None and abs(d.disk_free - shutil.disk_usage(tmp_path).free) < 1 << 30
    assert d.arch and d.os and d.python.count(".") == 2
    value = json.loads(d.to_json())
    assert value["ram_total"] == d.ram_total and value["cpu"]["avx2"] == d.cpu.avx2


def test_probe_is_frozen() -> None:
    d = probe_device()
    with pytest.raises(AttributeError):
        d.ram_total = 1  # type: ignore[misc]


def test_cpu_flags_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx avx2 avx512f amx_tile amx_bf16 sse\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags, model = _device._cpu_flags_and_model(info)
    cpu = _device.CpuInfo(model, 2, 1, flags)
    assert model == "Xeon" and cpu.avx2 and cpu.avx512 and cpu.amx
    assert "sse" not in flags


def test_no_nvml_degrades_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_pynvml(name: str, *a: object, **k: object) -> object:
        if name == "pynvml":
            raise ImportError(name)
        return real_import(name, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    gpus, driver, err = probe_gpus()
    assert gpus == () and driver is None and err is not None and "nvidia-ml-py" in err


def test_torch_version_without_importing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setattr(_device, "_dist_version", lambda name: "2.3.1+cu121" if name == "torch" else None)
    monkeypatch.setattr(_device.importlib.metadata, "distribution", lambda name: (_ for _ in ()).throw(ValueError()))
    assert _device._torch_versions() == ("2.3.1+cu121", "12.1")
    assert "torch" not in sys.modules


@needs_gpu
def test_gpu_probe_matches_nvml() -> None:
    d: DeviceInfo = probe_device()
    pynvml.nvmlInit()
    try:
        assert len(d.gpus) == pynvml.nvmlDeviceGetCount()
        for g in d.gpus:
            h = pynvml.nvmlDeviceGetHandleByIndex(g.index)
            assert g.memory_total == pynvml.nvmlDeviceGetMemoryInfo(h).total
            assert g.compute_capability == tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
            assert g.name
    finally:
        pynvml.nvmlShutdown()
    assert d.accel_mem == max(g.memory_total for g in d.gpus)
    assert "cuda" in d.accels and d.cuda_driver
