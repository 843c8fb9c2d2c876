"""verify, doctor."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from autoglm.node.errors import ConfigError

from ._common import EXIT, console, human_bytes, print_json
from ._manifest_cmds import add_trust_args, trust_from_args

if TYPE_CHECKING:
    from autoglm.node._device import DeviceInfo
    from autoglm.wasm_verify import Verdict

# The verifier (wasmtime), device probe, doctor and rich load when their
# command runs (see _manifest_cmds.py).

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="check model files in the WebAssembly sandbox (exit 8 if any is refused)",
        description="Structural checks before load: safetensors, torch zip pickles (allow-listed globals only), "
        "GGUF, strict JSON. With --manifest, also the signature and the SHA-256 of every file.",
    )
    p.add_argument("target", metavar="PATH|MODEL", help="a file, a model directory or NAME[@VERSION] of a completed download")
    p.add_argument("--manifest", metavar="MANIFEST", help="signed manifest to check the files against (file or http(s) URL)")
    add_trust_args(p)
    p.add_argument("--no-cache", action="store_true", help="ignore and do not update the verdict cache")
    p.add_argument("--no-fit", action="store_true", help="skip the check that the tensors fit this device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("doctor", help="probe this machine and check the environment")
    p.add_argument("--mirror", action="append", default=[], metavar="URL", help="check reachability and RTT of a mirror (repeatable)")
    p.add_argument("--manifest", metavar="MANIFEST",
                   help="with --mirror: check that each mirror has a file of this manifest (file or URL)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="check TCP reachability of a DHT bootstrap peer (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)


def cmd_verify(args: argparse.Namespace) -> int:
    from autoglm.node._device import probe_device
    from autoglm.node._gate import (
        VerdictCache,
        check_fit,
        check_manifest_files,
        iter_model_files,
        load_checked_manifest,
        resolve_model,
        verify_tree,
    )

    resolved = resolve_model(args.target, args.data_dir)
    root = resolved.path
    files = [root] if root.is_file() else list(iter_model_files(root))
    hashes: dict[Path, str] = {}
    signer = trusted_by = None
    if args.manifest is not None or resolved.signed_manifest is not None:
        with _trust_hint(args):
            if args.manifest is not None and args.manifest.startswith(("http://", "https://")):
                from autoglm.node._manifests import check_manifest

                from ._manifest_cmds import read_manifest_arg

                manifest = check_manifest(read_manifest_arg(args.manifest), trust_from_args(args))
            else:
                path = Path(args.manifest) if args.manifest is not None else None
                checked = load_checked_manifest(resolved, path, trust_from_args(args))
                assert checked is not None
                manifest = checked
        signer, trusted_by = manifest.publisher, _trusted_by(args, manifest.publisher)
        hashes = check_manifest_files(root, manifest, files)
    elif args.trust or args.root:
        raise ConfigError("--trust/--root need --manifest")
    cache = None if args.no_cache else VerdictCache.in_data_dir(args.data_dir)
    try:
        results = verify_tree(root, cache=cache, hashes=hashes)
    finally:
        if cache is not None:
            cache.close()
    refused = [(f, v) for f, v in results if not v.ok]
    tensor_bytes = sum(v.tensor_bytes for _, v in results)
    device: DeviceInfo | None = None if args.no_fit else probe_device(args.data_dir)
    fit = check_fit(tensor_bytes, device) if device is not None else None
    ok = not refused and fit is None
    if args.json:
        print_json(
            {
                "ok": ok,
                "path": str(root),
                "signer": signer,
                "trusted_by": trusted_by,
                "tensor_bytes": tensor_bytes,
                "fit": fit,
                "files": [{"path": str(f), **v.to_value()} for f, v in results],
            }
        )
    else:
        _print_verdicts(root, results, tensor_bytes, fit, f"{signer}, trusted by {trusted_by}" if signer else None)
    return EXIT["ok"] if ok else EXIT["refused"]


@contextmanager
def _trust_hint(args: argparse.Namespace) -> Iterator[None]:
    """A TrustError says how to trust a publisher for every command (the trust store)."""
    from autoglm.node._config import trust_dir
    from autoglm.node.errors import TrustError

    try:
        yield
    except TrustError as exc:
        raise TrustError(
            f"{exc} (to trust a publisher for every command: `autoglm-node trust add KEY.pub`; "
            f"trust store: {trust_dir(args.data_dir)})"
        ) from exc


def _trusted_by(args: argparse.Namespace, publisher: str) -> str:
    """Where the trust in the signer came from (a --trust file or the trust store), for the output."""
    from autoglm.node._keys import trust_origins
    from autoglm.protocol import key_id

    origins = trust_origins(args.data_dir, args.trust, args.root)
    for key, origin in origins.items():
        if len(key) == 32 and key_id(key) == publisher:
            return origin
    roots = [o for k, o in origins.items() if len(k) != 32]
    return "an X.509 root: " + "; ".join(roots) if roots else "the trust policy"


def _print_verdicts(root: Path, results: list[tuple[Path, Verdict]], tensor_bytes: int, fit: str | None, signer: str | None) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("file", "kind", "verdict", "tensors", "params", "bytes", "reason"):
        table.add_column(col, justify="right" if col in ("tensors", "params", "bytes") else "left")
    for f, v in results:
        name = str(f.relative_to(root)) if f != root else f.name
        style = {"ok": "green", "reject": "bold red", "error": "bold red"}[v.status]
        verdict = "refused" if v.status != "ok" else "ok"
        table.add_row(
            escape(name),
            v.kind,
            f"[{style}]{verdict}[/]",
            str(v.tensor_count) if v.tensor_count else "",
            f"{v.param_count:,}" if v.param_count else "",
            human_bytes(v.tensor_bytes) if v.tensor_bytes else "",
            escape(v.reason),
        )
    console.print(table)
    if signer:
        console.print(f"signature and SHA-256 of every file: [green]ok[/] (signer {signer})")
    if fit:
        console.print(f"[bold red]refused:[/] {escape(fit)}")
    refused = sum(1 for _, v in results if not v.ok)
    summary = f"{len(results)} files, {human_bytes(tensor_bytes)} of tensors"
    if refused or fit:
        console.print(f"[bold red]REFUSED[/] {summary}, {refused} refused")
    else:
        console.print(f"[green]OK[/] {summary}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from autoglm.node._device import probe_device
    from autoglm.node._doctor import run_checks

    probe = None
    if args.manifest:
        from ._manifest_cmds import read_manifest_arg

        files = [f for f in read_manifest_arg(args.manifest).manifest.files if f.size]
        if files:
            small = min(files, key=lambda f: f.size)  # HEAD costs the same; a GET fallback reads one byte
            probe = (small.path, small.size)
    device = probe_device(args.data_dir)
    checks = run_checks(device, args.data_dir, mirrors=tuple(args.mirror), mirror_probe=probe,
                        bootstraps=tuple(args.bootstrap))
    failed = any(c.status == "fail" for c in checks)
    rc = EXIT["doctor"] if failed else EXIT["ok"]
    if args.json:
        print_json({"device": device.to_value(), "checks": [c.to_value() for c in checks], "ok": not failed})
        return rc
    cpu = device.cpu
    feats = ", ".join(f for f, on in (("AVX2", cpu.avx2), ("AVX-512", cpu.avx512), ("AMX", cpu.amx)) if on) or "none"
    console.print(f"[bold]{escape(cpu.model)}[/], {cpu.logical_cores} threads ({cpu.physical_cores or '?'} cores), vector: {feats}")
    console.print(f"RAM {human_bytes(device.ram_total)} ({human_bytes(device.ram_available)} available); {device.os} {device.arch}; Python {device.python}")
    for g in device.gpus:
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        console.print(f"GPU {g.index}: {escape(g.name)}, {human_bytes(g.memory_total)}, compute capability {cc}")
    if device.torch_version:
        console.print(f"torch {device.torch_version} (CUDA {device.torch_cuda or 'none'})")
    marks = {"pass": "[green]pass[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]fail[/]"}
    for c in checks:
        console.print(f"{marks[c.status]}  {c.name:<11} {escape(c.detail)}")
        if c.hint and c.status != "pass":
            console.print(f"      [dim]-> {escape(c.hint)}[/]")
    return rc
