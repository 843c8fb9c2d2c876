"""keygen, publish, inspect, verify-manifest, sample-model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import console, human_bytes, print_json

if TYPE_CHECKING:
    from autoglm.node._publish import VariantSpec
    from autoglm.protocol import SignedManifest, TrustPolicy

# Command modules import only argparse and the standard library at the top:
# every command pays for building the whole parser, and `fetch` handed to a
# running node should start in tens of milliseconds, not hundreds (the engine,
# the store, libp2p, cryptography and rich load inside the commands).

__all__ = ["parse_size", "register"]

def parse_size(text: str) -> int:
    """'8MiB', '512k', '1G', '4096' -> bytes (the config file's sizes parse the same way)."""
    from autoglm.node._settings import parse_size as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 publisher key pair")
    p.add_argument("--out", required=True, type=Path, metavar="KEYFILE", help="private key path (KEYFILE.pub is written too)")
    p.add_argument("--force", action="store_true", help="overwrite an existing key")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("publish", help="hash a model directory (or a Hub commit: hf://ORG/REPO@REV) and write a signed manifest")
    p.add_argument("dir", metavar="DIR|hf://ORG/REPO[@REV]")
    p.add_argument("--key", required=True, type=Path, metavar="KEYFILE")
    p.add_argument("--name", help="model name (required for DIR; default hf:ORG/REPO for hf://)")
    p.add_argument("--version", metavar="VER", help="required for DIR; for hf:// the version is the commit")
    p.add_argument("--out", type=Path, metavar="MANIFEST", help="default: DATA_DIR/published/NAME@VER.agm")
    p.add_argument("--force", action="store_true", help="overwrite an existing manifest at the --out path")
    p.add_argument("--max-piece", type=parse_size, default="8MiB", metavar="SIZE", help="default 8MiB")
    p.add_argument("--variants", type=Path, metavar="FILE.json", help="variant definitions (see docs/manifest.md)")
    p.add_argument("--parent", type=Path, metavar="MANIFEST", help="the previous version, for delta updates")
    p.add_argument("--cert-chain", type=Path, metavar="PEM", help="publisher X.509 chain, leaf first")
    p.add_argument("--json", action="store_true")
    from autoglm.node.hub._publish_cli import add_publish_hub_args

    add_publish_hub_args(p)
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("inspect", help="show the files, pieces and signer of a manifest")
    p.add_argument("manifest", metavar="MANIFEST", help="manifest file or http(s) URL")
    p.add_argument("--json", action="store_true", help="every file and piece as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify-manifest", help="check a manifest's signature against trusted keys")
    p.add_argument("manifest", metavar="MANIFEST", help="manifest file or http(s) URL")
    add_trust_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify_manifest)

    p = sub.add_parser("sample-model", help="write a generated sample model directory (for demos and tests)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--size", type=parse_size, default=64 << 20, metavar="SIZE", help="about this many bytes (default 64MiB)")
    p.add_argument("--seed", default="sample")
    p.set_defaults(func=cmd_sample)


def add_trust_args(p: argparse.ArgumentParser) -> None:
    """--trust/--root/--spiffe-id, shared by every command that checks manifests."""
    p.add_argument("--trust", action="append", type=Path, default=[], metavar="KEY.pub", help="trusted publisher key (repeatable)")
    p.add_argument("--root", action="append", type=Path, default=[], metavar="CA.pem", help="trusted root CA for X.509 publishers")
    p.add_argument("--spiffe-id", action="append", default=[], metavar="ID", help="allowed publisher SPIFFE ID; a trailing / allows a prefix")


def read_manifest_arg(manifest: str) -> SignedManifest:
    """A manifest named on the command line: a file, or an http(s) URL (kept as typed, never a Path)."""
    from autoglm.node._manifests import load_signed_manifest

    if manifest.startswith(("http://", "https://")):
        import trio

        from autoglm.node.api import _get_url
        from autoglm.protocol import RemoteProtocolError, decode_signed_manifest

        data = trio.run(_get_url, manifest)
        try:
            return decode_signed_manifest(data)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{manifest} is not a valid manifest: {exc}") from exc
    return load_signed_manifest(Path(manifest))


def _refuse_public_key(path: Path) -> None:
    """``--key K.pub``: say it is the public half, not that its mode is wrong."""
    from autoglm.protocol import ConfigError

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return  # load_private_key says what is wrong with the path
    if b"PUBLIC KEY-----" in head:
        private = path.with_suffix("") if path.suffix == ".pub" else None
        hint = f" (keygen wrote it next to this one: {private})" if private is not None and private.exists() else ""
        raise ConfigError(f"{path} is a public key; publish signs with the private key{hint}")


def trust_from_args(args: argparse.Namespace) -> TrustPolicy:
    from autoglm.node._keys import load_trust_policy

    return load_trust_policy(args.data_dir, args.trust, args.root, args.spiffe_id)


def cmd_keygen(args: argparse.Namespace) -> int:
    from autoglm.node._keys import write_keypair

    kid = write_keypair(args.out, force=args.force)
    if args.json:
        print_json({"key_id": kid, "private": str(args.out), "public": str(args.out) + ".pub"})
    else:
        console.print(f"key id [bold]{kid}[/]\nprivate key {args.out} (mode 0600)\npublic key  {args.out}.pub")
    return 0


def _load_variants(path: Path) -> list[VariantSpec]:
    from autoglm.node._publish import VariantSpec
    from autoglm.protocol import ConfigError, Requirements

    try:
        raw = json.loads(path.read_text())
        specs = []
        for v in raw:
            req = v.get("requirements", {})
            specs.append(
                VariantSpec(
                    name=v["name"],
                    patterns=tuple(v["files"]),
                    requirements=Requirements(
                        min_ram=req.get("min_ram"),
                        min_accel_mem=req.get("min_accel_mem"),
                        accel=req.get("accel"),
                        dtype=req.get("dtype"),
                    ),
                )
            )
        return specs
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read variants from {path}: {exc}") from exc


def cmd_publish(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from autoglm.node._keys import load_private_key
    from autoglm.node._manifests import (
        default_manifest_path,
        load_signed_manifest,
        write_signed_manifest,
    )
    from autoglm.node._publish import build_manifest, list_model_files
    from autoglm.protocol import ConfigError, key_id, sign_manifest

    if str(args.dir).startswith(("hf://", "ms://")):  # a Hub commit: node/hub/_publish.py
        from autoglm.node.hub._publish_cli import cmd_publish_hub

        return cmd_publish_hub(args)
    hub_only = [f for f, v in (("--endpoint", args.endpoint), ("--revision", args.revision), ("--token-file", args.token_file),
                               ("--cache-dir", args.cache_dir), ("--name-publish", args.name_publish)) if v]
    if hub_only:
        raise ConfigError(f"{', '.join(hub_only)}: only for publish hf://ORG/REPO")
    if not args.name or not args.version:
        raise ConfigError("publish DIR needs --name and --version")
    _refuse_public_key(args.key)
    key = load_private_key(args.key)

    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    out: Path = args.out or default_manifest_path(args.data_dir, args.name, args.version)
    variants = _load_variants(args.variants) if args.variants else []
    parent = load_signed_manifest(args.parent).id if args.parent else None
    chain: tuple[bytes, ...] = ()
    if args.cert_chain:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        try:
            certs = x509.load_pem_x509_certificates(args.cert_chain.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the certificate chain {args.cert_chain}: {exc}") from exc
        chain = tuple(c.public_bytes(Encoding.DER) for c in certs)
    if out.exists() and not args.force:  # after the inputs are checked, before hours of hashing
        raise ConfigError(f"{out} already exists; pass --force to overwrite it")
    root = Path(args.dir)
    exclude = [out, args.key]
    skipped: list[str] = []
    total = sum((root / p).stat().st_size for p in list_model_files(root, exclude, skipped)) if root.is_dir() else 0
    t0 = time.perf_counter()
    with Progress(
        # Binary units, as everywhere else (rich's speed column only has decimal ones).
        TextColumn("hashing"), BarColumn(), DownloadColumn(binary_units=True),
        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
        console=console, disable=args.json or not console.is_terminal, transient=True,
    ) as progress:
        task = progress.add_task("hash", total=total, rate="")

        def advance(n: int) -> None:
            speed = progress.tasks[task].speed
            progress.update(task, advance=n, rate=f"{human_bytes(speed)}/s" if speed else "")

        manifest = build_manifest(
            root, name=args.name, version=args.version, publisher=key_id(raw_pub), created_at=int(time.time()),
            max_piece=args.max_piece, variants=variants, parent=parent, exclude=exclude, progress=advance,
        )
    signed = sign_manifest(manifest, key, chain)
    write_signed_manifest(out, signed)
    elapsed = time.perf_counter() - t0
    if args.json:
        print_json({"manifest": str(out), "id": signed.id.hex(), "files": len(manifest.files),
                    "pieces": manifest.piece_count, "size": manifest.total_size, "seconds": round(elapsed, 3),
                    "skipped": skipped})
    else:
        from rich.markup import escape

        console.print(
            f"published [bold]{escape(manifest.name)}[/] {escape(manifest.version)}: {len(manifest.files)} files, "
            f"{manifest.piece_count} pieces, {human_bytes(manifest.total_size)} in {elapsed:.2f}s\n"
            f"manifest {escape(str(out))}\nid {signed.id.hex()}"
        )
        if skipped:
            shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
            console.print(f"skipped {len(skipped)}: {escape(shown)} (hidden, or the key or manifest itself)", soft_wrap=True)
    return 0


def manifest_json(signed: SignedManifest, signature_ok: bool | None = None) -> dict[str, Any]:
    m = signed.manifest
    return {
        "id": signed.id.hex(),
        "format": 1,
        "name": m.name,
        "version": m.version,
        "created_at": m.created_at,
        "publisher": m.publisher,
        "signer": signed.signer,
        "signature_valid": signature_ok,
        "has_certificate_chain": bool(signed.chain),
        "parent": m.parent.hex() if m.parent else None,
        "max_piece_size": m.max_piece_size,
        "total_size": m.total_size,
        "files": [
            {
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256.hex(),
                "pieces": [{"offset": p.offset, "length": p.length, "hash": p.hash.hex()} for p in f.pieces],
            }
            for f in m.files
        ],
        "variants": [
            {
                "name": v.name,
                "files": list(v.files),
                "requirements": {k: getattr(v.requirements, k) for k in ("min_ram", "min_accel_mem", "accel", "dtype")
                                 if getattr(v.requirements, k) is not None},
            }
            for v in m.variants
        ],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from autoglm.protocol import SignatureError, verify_signature
    from autoglm.protocol._signing import DOMAIN_MANIFEST

    signed = read_manifest_arg(args.manifest)
    m = signed.manifest
    try:
        verify_signature(signed.public_key, signed.signature, DOMAIN_MANIFEST, m.encode())
        sig_ok = m.publisher == signed.signer
    except SignatureError:
        sig_ok = False
    if args.json:
        print_json(manifest_json(signed, sig_ok))
        return 0
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created_at))
    console.print(f"[bold]{m.name}[/] {m.version}  (created {created})")
    console.print(f"id       {signed.id.hex()}")
    state = "[green]valid signature[/]" if sig_ok else "[bold red]INVALID signature[/]"
    console.print(f"signer   {signed.signer}  {state} (trust not checked: use verify-manifest)")
    if signed.chain:
        console.print(f"chain    {len(signed.chain)} X.509 certificate(s)")
    if m.parent:
        console.print(f"parent   {m.parent.hex()}")
    table = Table(show_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("pieces", justify="right")
    table.add_column("sha256")
    for f in m.files:
        table.add_row(f.path, human_bytes(f.size), str(len(f.pieces)), f.sha256.hex()[:16] + "…")
    table.add_row("[bold]total[/]", human_bytes(m.total_size), str(m.piece_count), "")
    console.print(table)
    for v in m.variants:
        req = {k: getattr(v.requirements, k) for k in ("min_ram", "min_accel_mem", "accel", "dtype")
               if getattr(v.requirements, k) is not None}
        console.print(f"variant [bold]{v.name}[/]: {len(v.files)} files, requires {req or 'nothing'}")
    return 0


def cmd_verify_manifest(args: argparse.Namespace) -> int:
    from autoglm.node._manifests import check_manifest

    signed = read_manifest_arg(args.manifest)
    policy = trust_from_args(args)
    m = check_manifest(signed, policy)
    if args.json:
        print_json({"valid": True, "id": signed.id.hex(), "name": m.name, "version": m.version, "signer": signed.signer})
    else:
        console.print(f"[green]valid[/]: {m.name} {m.version} signed by trusted key {signed.signer}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from autoglm.node._sample import write_sample_model

    write_sample_model(args.dir, size=args.size, seed=args.seed.encode())
    console.print(f"wrote sample model to {args.dir}")
    return 0


