"""trust add|list|remove: the data directory's trust store (DATA_DIR/trust/)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._common import console, print_json

if TYPE_CHECKING:
    from autoglm.node._keys import TrustEntry

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trust",
        help="manage trusted publishers (keys, root CAs, SPIFFE IDs) in the data directory",
        description="The trust store in DATA_DIR/trust/ is used by fetch, join, verify and verify-manifest "
        "(on top of --trust/--root/--spiffe-id) and by the Python API when trust is not given.",
    )
    actions = p.add_subparsers(dest="trust_action", metavar="ACTION", required=True)
    a = actions.add_parser("add", help="trust publisher keys, root CAs or SPIFFE IDs")
    a.add_argument("keys", nargs="*", type=Path, metavar="KEY.pub", help="publisher public key file(s); only the public key is stored")
    a.add_argument("--root", dest="add_roots", action="append", type=Path, default=[], metavar="CA.pem", help="a root CA for X.509 publishers")
    a.add_argument("--spiffe-id", dest="add_ids", action="append", default=[], metavar="ID", help="an allowed publisher SPIFFE ID (a trailing / allows a prefix)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_trust_add)
    ls = actions.add_parser("list", help="show what the trust store trusts")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_trust_list)
    r = actions.add_parser("remove", help="stop trusting a key, root CA or SPIFFE ID")
    r.add_argument("names", nargs="+", metavar="KEY.pub|KEY-ID|CA.pem|ID", help="a key or certificate file, a key id (or 8+ leading characters), a fingerprint, or a SPIFFE ID")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_trust_remove)


def _show(entries: list[TrustEntry], verb: str, json_mode: bool) -> None:
    if json_mode:
        print_json({verb: [{"kind": e.kind, "id": e.id, "detail": e.detail} for e in entries]})
        return
    from rich.markup import escape

    for e in entries:
        console.print(f"{verb} {e.kind} [bold]{escape(e.id)}[/]  {escape(e.detail)}")


def cmd_trust_add(args: argparse.Namespace) -> int:
    from autoglm.node._keys import add_to_trust_store
    from autoglm.node.errors import ConfigError

    if not (args.keys or args.add_roots or args.add_ids):
        raise ConfigError("name a key file, --root CA.pem or --spiffe-id ID to trust")
    _show(add_to_trust_store(args.data_dir, args.keys, args.add_roots, args.add_ids), "added", args.json)
    return 0


def cmd_trust_list(args: argparse.Namespace) -> int:
    from autoglm.node._config import trust_dir
    from autoglm.node._keys import list_trust_store

    entries = list_trust_store(args.data_dir)
    if args.json:
        print_json({"trust_dir": str(trust_dir(args.data_dir)), "entries": [{"kind": e.kind, "id": e.id, "detail": e.detail} for e in entries]})
    elif not entries:
        console.print(f"the trust store ({trust_dir(args.data_dir)}) is empty; add a publisher with `autoglm-node trust add KEY.pub`")
    else:
        _show(entries, "trusted", False)
    return 0


def cmd_trust_remove(args: argparse.Namespace) -> int:
    from autoglm.node._keys import remove_from_trust_store

    _show(remove_from_trust_store(args.data_dir, args.names), "removed", args.json)
    return 0
