"""Device capability probe: CPU, RAM, disk, GPUs (NVML), torch/CUDA, OS.

The probe is the only IO here; decisions that use it (variant choice, the
fit check before load) take a :class:`DeviceInfo` as a parameter so tests pass
a made-up device. Every part of the probe degrades to "unknown" rather than
failing: a node without NVML or without /proc still runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["CpuInfo", "DeviceInfo", "GpuInfo", "probe_device", "probe_gpus"]

#: cpuinfo flags worth reporting; the rest are noise for model loading.
_INTERESTING_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "neon",
    "asimd",
    "sve",
)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One accelerator as NVML reports it."""

    index: int
    name: str
    memory_total: int
    memory_free: int
    compute_capability: tuple[int, int] | None
    vendor: str = "nvidia"


@dataclass(frozen=True, slots=True)
class CpuInfo:
    model: str
    logical_cores: int
    physical_cores: int | None
    flags: tuple[str, ...]

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def amx(self) -> bool:
        return any(f.startswith("amx") for f in self.flags)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What this machine can run. ``gpus`` is empty where NVML is absent."""

    os: str
    arch: str
    python: str
    cpu: CpuInfo
    ram_total: int
    ram_available: int
    disk_free: int | None
    data_dir: str | None
    gpus: tuple[GpuInfo, ...] = ()
    torch_version: str | None = None
    torch_cuda: str | None = None
    cuda_driver: str | None = None
    nvml_error: str | None = field(default=None, compare=False)

    @property
    def accel_mem(self) -> int:
        """Memory of the largest accelerator (0 without one)."""
        return max((g.memory_total for g in self.gpus), default=0)

    @property
    def accels(self) -> tuple[str, ...]:
        """Accelerator kinds present; ``cpu`` always is."""
        kinds = ["cpu"]
        if self.gpus:
            kinds.append("cuda")
        return tuple(kinds)

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["cpu"]["avx2"] = self.cpu.avx2
        value["cpu"]["avx512"] = self.cpu.avx512
        value["cpu"]["amx"] = self.cpu.amx
        value["accel_mem"] = self.accel_mem
        return value

    def to_json(self) -> str:
        return json.dumps(self.to_value(), sort_keys=True)


def _cpu_flags_and_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[tuple[str, ...], str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return (), platform.processor() or platform.machine()
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(val.split())
        elif key in ("model name", "Hardware", "cpu model") and not model:
            model = val.strip()
    return tuple(f for f in _INTERESTING_FLAGS if f in flags), model or platform.machine()


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_versions() -> tuple[str | None, str | None]:
    """torch's version and the CUDA it was built for, without importing torch.

    Importing torch takes seconds; the wheel's version string carries the
    CUDA build (``2.3.1+cu121``) and ``torch/version.py`` names it exactly.
    """
    version = _dist_version("torch")
    if version is None:
        return None, None
    cuda: str | None = None
    try:
        dist = importlib.metadata.distribution("torch")
        vfile = Path(str(dist.locate_file("torch/version.py")))
        for line in vfile.read_text().splitlines():
            if line.startswith("cuda") and "=" in line:
                raw = line.split("=", 1)[1].strip().strip("'\"")
                cuda = None if raw in ("None", "") else raw
    except (OSError, ValueError):
        pass
    if cuda is None and "+cu" in version:
        tag = version.split("+cu", 1)[1]
        if tag.isdigit() and len(tag) >= 3:
            cuda = f"{tag[:-1]}.{tag[-1]}"
    return version, cuda


def probe_gpus() -> tuple[tuple[GpuInfo, ...], str | None, str | None]:
    """GPUs through NVML: (gpus, driver CUDA version, error text or None)."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return (), None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return (), None, f"NVML unavailable: {exc}"
    try:
        driver: str | None = None
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            driver = f"{v // 1000}.{(v % 1000) // 10}"
        except pynvml.NVMLError:
            pass
        gpus = []
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc: tuple[int, int] | None = (int(major), int(minor))
            except pynvml.NVMLError:
                cc = None
            gpus.append(GpuInfo(i, str(name), int(mem.total), int(mem.free), cc))
        return tuple(gpus), driver, None
    except pynvml.NVMLError as exc:
        return (), None, f"NVML error: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def probe_device(data_dir: Path | None = None) -> DeviceInfo:
    """Probe this machine. Cheap (tens of milliseconds); never imports torch."""
    flags, model = _cpu_flags_and_model()
    vm = psutil.virtual_memory()
    disk_free: int | None = None
    if data_dir is not None:
        probe_at = data_dir
        while not probe_at.exists() and probe_at != probe_at.parent:
            probe_at = probe_at.parent
        try:
            disk_free = shutil.disk_usage(probe_at).free
        except OSError:
            disk_free = None
    gpus, driver, nvml_error = probe_gpus()
    torch_version, torch_cuda = _torch_versions()
    cpu = CpuInfo(
        model=model,
        logical_cores=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        flags=flags,
    )
    return DeviceInfo(
        os=f"{platform.system()} {platform.release()}",
        arch=platform.machine(),
        python=platform.python_version(),
        cpu=cpu,
        ram_total=int(vm.total),
        ram_available=int(vm.available),
        disk_free=disk_free,
        data_dir=str(data_dir) if data_dir is not None else None,
        gpus=gpus,
        torch_version=torch_version,
        torch_cuda=torch_cuda,
        cuda_driver=driver,
        nvml_error=nvml_error,
    )
