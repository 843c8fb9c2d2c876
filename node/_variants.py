"""Variant choice: which named subset of a model's files this device should fetch.

Pure decisions: the device is a parameter (the probe is only the default), so
``fetch --variant auto`` and the tests reach the same answer from the same
inputs.

Strategy for ``auto``: among the variants whose requirements the device meets,
prefer the one that asks for the most accelerator memory (a bigger GPU
variant is the better model for a device that can hold it), then the most
RAM, then the name, so the choice is deterministic.
"""

from __future__ import annotations

from autoglm.protocol import ConfigError, Manifest, Requirements, Variant

from ._device import DeviceInfo, probe_device

__all__ = ["fit_problems", "resolve_variant"]

_GPU_ACCELS = frozenset({"cuda", "gpu", "nvidia"})
_CPU_ACCELS = frozenset({"cpu", "any"})
#: dtypes that need a minimum CUDA compute capability to run natively.
_DTYPE_MIN_CC: dict[str, tuple[int, int]] = {
    "bf16": (8, 0),
    "bfloat16": (8, 0),
    "fp8": (8, 9),
    "f8": (8, 9),
    "float8": (8, 9),
}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def fit_problems(req: Requirements, device: DeviceInfo) -> list[str]:
    """Why ``device`` cannot run something that needs ``req``; empty when it fits."""
    problems: list[str] = []
    if req.min_ram is not None and device.ram_total < req.min_ram:
        problems.append(f"needs {_gib(req.min_ram)} RAM, the device has {_gib(device.ram_total)}")
    accel = req.accel.lower() if req.accel else None
    wants_gpu = accel in _GPU_ACCELS or (req.min_accel_mem is not None and req.min_accel_mem > 0)
    if accel is not None and accel not in _GPU_ACCELS and accel not in _CPU_ACCELS:
        problems.append(f"needs accelerator {req.accel!r}, which this node cannot detect")
        return problems
    if not wants_gpu:
        return problems
    if not device.gpus:
        problems.append("needs a CUDA GPU, none was found" + (f" ({device.nvml_error})" if device.nvml_error else ""))
        return problems
    if req.min_accel_mem is not None and device.accel_mem < req.min_accel_mem:
        problems.append(
            f"needs {_gib(req.min_accel_mem)} accelerator memory, the largest GPU has {_gib(device.accel_mem)}"
        )
    need_cc = _DTYPE_MIN_CC.get((req.dtype or "").lower())
    if need_cc is not None:
        have = max((g.compute_capability for g in device.gpus if g.compute_capability), default=None)
        if have is not None and have < need_cc:
            problems.append(
                f"dtype {req.dtype} needs compute capability {need_cc[0]}.{need_cc[1]}, the GPU has {have[0]}.{have[1]}"
            )
    return problems


def _rank(v: Variant) -> tuple[int, int, str]:
    r = v.requirements
    return (-(r.min_accel_mem or 0), -(r.min_ram or 0), v.name)


def resolve_variant(
    manifest: Manifest, spec: str | None, device: DeviceInfo | None = None
) -> tuple[Variant | None, list[str]]:
    """Turn ``--variant SPEC`` into a variant and warnings.

    ``None`` or ``"all"``: ``(None, [])``, meaning every file. ``"auto"``: the
    best variant the device can run (ConfigError when none fits; a manifest
    without variants means all files). A name: that variant, with a warning per
    unmet requirement. An unknown name is a ConfigError that lists the choices.
    """
    if spec is None or spec == "all":
        return None, []
    names = ", ".join(v.name for v in manifest.variants) or "(none)"
    if spec == "auto":
        if not manifest.variants:
            return None, ["the manifest defines no variants; fetching all files"]
        dev = device if device is not None else probe_device()
        fitting = [v for v in manifest.variants if not fit_problems(v.requirements, dev)]
        if not fitting:
            details = "; ".join(
                f"{v.name}: {', '.join(fit_problems(v.requirements, dev))}" for v in sorted(manifest.variants, key=_rank)
            )
            raise ConfigError(f"no variant of {manifest.name} fits this device ({details}); choose one with --variant NAME")
        return min(fitting, key=_rank), []
    for v in manifest.variants:
        if v.name == spec:
            dev = device if device is not None else probe_device()
            warnings = [f"variant {v.name!r} may not run here: {p}" for p in fit_problems(v.requirements, dev)]
            return v, warnings
    raise ConfigError(f"unknown variant {spec!r}; {manifest.name} has: {names} (or use auto / all)")
