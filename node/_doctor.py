"""``autoglm-node doctor``: environment checks, each pass/warn/fail with what to do.

Checks take their inputs as parameters (device, environment, clock) so tests
run them against made-up machines; only the network checks do IO, each with
its own short timeout.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx

from ._device import DeviceInfo

__all__ = [
    "TORCH_CUDA_PAIRS",
    "Check",
    "check_bootstrap",
    "check_clock",
    "check_data_dir",
    "check_mirror",
    "check_proxies",
    "check_sandbox",
    "check_torch_cuda",
    "parse_multiaddr",
    "run_checks",
]

Status = Literal["pass", "warn", "fail"]
GiB = 1 << 30

#: CUDA builds published for each torch minor release (pytorch.org wheel index).
TORCH_CUDA_PAIRS: dict[str, tuple[str, ...]] = {
    "1.13": ("11.6", "11.7"),
    "2.0": ("11.7", "11.8"),
    "2.1": ("11.8", "12.1"),
    "2.2": ("11.8", "12.1"),
    "2.3": ("11.8", "12.1"),
    "2.4": ("11.8", "12.1", "12.4"),
    "2.5": ("11.8", "12.1", "12.4"),
    "2.6": ("11.8", "12.4", "12.6"),
    "2.7": ("11.8", "12.6", "12.8"),
    "2.8": ("12.6", "12.8", "12.9"),
    "2.9": ("12.6", "12.8", "13.0"),
}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""

    def to_value(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "hint": self.hint}


def _fs_type(path: Path, mounts: str = "/proc/self/mounts") -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it), if known."""
    best, kind = "", None
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mnt = fields[1].replace("\\040", " ")
                    if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                        best, kind = mnt, fields[2]
    except OSError:
        return None
    return kind


def check_data_dir(data_dir: Path, free: int | None = None, *, blocks: int | None = None) -> Check:
    """Writable, on a real filesystem, with room. ``free``/``blocks`` (bytes free, filesystem
    size in blocks) come from statvfs unless given."""
    hint_dir = "pass --data-dir or set AUTOGLM_NODE_HOME to a folder on a disk"
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("data-dir", "fail", f"{data_dir} is not writable", "fix permissions or pass --data-dir / set AUTOGLM_NODE_HOME")
    if free is None or blocks is None:
        try:
            st = os.statvfs(probe)
        except OSError as exc:
            return Check("data-dir", "fail", f"cannot stat {probe}: {exc.strerror}", "check the mount")
        free = st.f_bavail * st.f_frsize if free is None else free
        blocks = st.f_blocks if blocks is None else blocks
    if blocks == 0:
        # proc, sysfs, cgroup...: no storage behind them; "0.0 GiB free" would send people to clean a disk.
        kind = _fs_type(probe.resolve())
        what = f"a {kind} filesystem" if kind else "a filesystem without storage"
        return Check("data-dir", "fail", f"{data_dir} is on {what}, not a usable filesystem for a data directory", hint_dir)
    detail = f"{data_dir} writable, {free / GiB:.1f} GiB free"
    if free < GiB:
        return Check("data-dir", "fail", detail, "free disk space: a model download needs at least its size")
    if free < 20 * GiB:
        return Check("data-dir", "warn", detail, "large models need tens of GiB; consider another --data-dir")
    return Check("data-dir", "pass", detail)


def check_proxies(env: Mapping[str, str]) -> Check:
    found = {k: v for k, v in env.items() if k.lower() in ("http_proxy", "https_proxy", "all_proxy")}
    if not found:
        return Check("proxy", "pass", "no proxy variables set")
    no_proxy = ",".join(v for k, v in env.items() if k.lower() == "no_proxy")
    detail = ", ".join(f"{k}={v}" for k, v in sorted(found.items()))
    bad = [k for k, v in found.items() if "://" not in v]
    if bad:
        return Check("proxy", "fail", detail, f"{', '.join(bad)} should be a URL like http://host:3128")
    if not any(h in no_proxy for h in ("localhost", "127.0.0.1")):
        return Check("proxy", "warn", detail + " (NO_PROXY lacks localhost)", "set NO_PROXY=localhost,127.0.0.1 so local peers and mirrors bypass the proxy")
    return Check("proxy", "pass", detail + f"; NO_PROXY={no_proxy}")


def check_clock(now: datetime) -> Check:
    if not 2024 <= now.year <= 2100:
        return Check("clock", "fail", f"system clock says {now.isoformat()}", "set the clock (NTP): certificates and signatures are checked against it")
    return Check("clock", "pass", f"{now.isoformat(timespec='seconds')}")


def _minor(version: str) -> str:
    return ".".join(version.split("+", 1)[0].split(".")[:2])


def check_torch_cuda(device: DeviceInfo) -> Check:
    if device.torch_version is None:
        hint = "pip install torch to load the .bin checkpoints; safetensors/GGUF loaders do not need it" if device.gpus else ""
        return Check("torch-cuda", "pass", "torch is not installed (the node does not need it)", hint)
    tv, cuda = _minor(device.torch_version), device.torch_cuda
    if cuda is None:
        if device.gpus:
            return Check("torch-cuda", "warn", f"torch {device.torch_version} is a CPU-only build but an NVIDIA GPU is present", "install a CUDA build of torch")
        return Check("torch-cuda", "pass", f"torch {device.torch_version} (CPU)")
    detail = f"torch {device.torch_version} built for CUDA {cuda}"
    known = TORCH_CUDA_PAIRS.get(tv)
    cv = _minor(cuda)
    if device.cuda_driver is not None and tuple(map(int, device.cuda_driver.split("."))) < tuple(map(int, cv.split("."))):
        return Check("torch-cuda", "fail", f"{detail}, but the driver supports CUDA {device.cuda_driver}", "update the NVIDIA driver or install a torch build for an older CUDA")
    if known is None:
        return Check("torch-cuda", "warn", f"{detail} (torch {tv} is not in the known-pairs table)", "check pytorch.org for the supported CUDA versions")
    if cv not in known:
        return Check("torch-cuda", "warn", f"{detail}; torch {tv} ships for CUDA {', '.join(known)}", "reinstall torch from the official index for your CUDA")
    return Check("torch-cuda", "pass", detail + (f", driver CUDA {device.cuda_driver}" if device.cuda_driver else ""))


def check_gpu(device: DeviceInfo) -> Check:
    if device.gpus:
        names = "; ".join(f"{g.name} {g.memory_total / GiB:.0f} GiB cc {'.'.join(map(str, g.compute_capability or ()))}" for g in device.gpus)
        return Check("gpu", "pass", names)
    if Path("/dev/nvidia0").exists():
        return Check("gpu", "warn", f"/dev/nvidia0 exists but NVML gave nothing ({device.nvml_error})", "pip install 'autoglm-node[gpu]' (nvidia-ml-py) and check the driver")
    return Check("gpu", "pass", "no NVIDIA GPU (CPU variants only)")


def check_mirror(url: str, timeout: float = 5.0, probe: tuple[str, int] | None = None) -> Check:
    """HEAD the mirror's folder, or with ``probe`` (a manifest path and its size) one model file in it.

    A model file (``probe``) answering 404/403, or any 401/410, fails. A folder
    answering 404 or 403 warns, never passes: a server that does not list folders
    (``serve-mirror``, nginx without autoindex) answers so for a good mirror's
    folder too, so the hint asks for a manifest, which makes the check look at a
    file instead.
    """
    target = url
    if probe is not None:
        from ._mirrors import file_url

        target = file_url(url, probe[0])
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            r = client.head(target)
            if r.status_code == 405:  # HEAD not allowed: one byte with GET
                r = client.get(target, headers={"Range": "bytes=0-0"})
    except httpx.HTTPError as exc:
        return Check("mirror", "fail", f"{url}: {type(exc).__name__}: {exc}", "check the URL, DNS, firewall and proxy settings")
    rtt = (time.perf_counter() - start) * 1000
    what = f"{probe[0]} on {url}" if probe is not None else url
    detail = f"{what}: HTTP {r.status_code} {r.reason_phrase}, {rtt:.0f} ms"
    st = r.status_code
    if st >= 500:
        return Check("mirror", "fail", detail, "the mirror is failing; try another")
    if st in (401, 403, 404, 410):
        if probe is not None:
            hint = "the mirror does not have this model file: check that the URL is the folder holding the model files"
        else:
            hint = ("check the URL (the folder holding the model files); a server that does not list folders answers "
                    "this for a good one too: add --manifest M.agm to check a model file instead")
        if st in (401, 403):
            hint = "the mirror refuses us: it needs credentials (--mirror-header on fetch) or the URL is wrong"
        # A folder answering 404/403 is not proof of a bad mirror (a good one that does not list
        # folders answers so too): a warning, never a pass. A model file answering so is a failure.
        verdict: Status = "fail" if probe is not None or st in (401, 410) else "warn"
        return Check("mirror", verdict, detail, hint)
    if st >= 400:
        return Check("mirror", "fail", detail, "the mirror answers but refuses the request")
    if probe is not None and st == 200:
        length = r.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != probe[1]:
            return Check("mirror", "fail", f"{detail}; {length} bytes, the manifest says {probe[1]}",
                         "the mirror holds another version of this file")
    return Check("mirror", "warn" if rtt > 500 else "pass", detail, "high latency: prefer a nearer mirror" if rtt > 500 else "")


def parse_multiaddr(addr: str) -> tuple[str, int]:
    """(host, tcp port) from /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[/...]."""
    parts = addr.strip("/").split("/")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[2] != "tcp":
        raise ValueError(f"not a TCP multiaddr: {addr!r} (want /ip4/HOST/tcp/PORT/p2p/ID)")
    port = int(parts[3])
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {addr!r}")
    return parts[1], port


def check_bootstrap(addr: str, timeout: float = 3.0) -> Check:
    try:
        host, port = parse_multiaddr(addr)
    except ValueError as exc:
        return Check("bootstrap", "fail", str(exc), "pass a multiaddr such as /ip4/1.2.3.4/tcp/4001/p2p/12D3...")
    start = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError as exc:
        return Check("bootstrap", "fail", f"{host}:{port}: {exc.strerror or exc}", "check the address and that outbound TCP to it is allowed")
    return Check("bootstrap", "pass", f"{host}:{port} reachable in {(time.perf_counter() - start) * 1000:.0f} ms")


def check_sandbox() -> Check:
    from autoglm.wasm_verify import builtin_module, builtin_pins, run_bytes

    from .errors import SandboxError

    try:
        kinds = sorted(builtin_pins())
        mods = [builtin_module(k) for k in kinds]
    except (SandboxError, OSError, ValueError) as exc:
        return Check("sandbox", "fail", f"verifier modules unusable: {exc}", "reinstall autoglm-node; the shipped .wasm files must match pins.json")
    header = b'{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    sample = len(header).to_bytes(8, "little") + header + b"\0" * 4
    start = time.perf_counter()
    v = run_bytes(builtin_module("safetensors"), sample)
    ms = (time.perf_counter() - start) * 1000
    if not v.ok:
        return Check("sandbox", "fail", f"self-test refused: {v.reason}", "report a bug")
    return Check("sandbox", "pass", f"{len(mods)} verifiers ({', '.join(kinds)}) pinned; self-test {ms:.1f} ms")


def run_checks(
    device: DeviceInfo,
    data_dir: Path,
    *,
    mirrors: tuple[str, ...] = (),
    mirror_probe: tuple[str, int] | None = None,
    bootstraps: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> list[Check]:
    checks = [
        check_data_dir(data_dir, device.disk_free),
        check_proxies(os.environ if env is None else env),
        check_clock(now or datetime.now(UTC)),
        check_gpu(device),
        check_torch_cuda(device),
        check_sandbox(),
    ]
    checks += [check_mirror(u, probe=mirror_probe) for u in mirrors]
    checks += [check_bootstrap(a) for a in bootstraps]
    return checks
