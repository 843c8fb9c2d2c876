"""config show: the effective settings and where each one came from."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._common import print_json

__all__ = ["register"]

_REDACTED = "<redacted>"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "config", help="show the effective settings (config file, environment, defaults)",
        description="Settings come from, in order: a flag, an environment variable, the config file, "
        "the built-in default. The file is --config FILE, else $AUTOGLM_NODE_CONFIG, else the first of "
        "the user's and the system's config.toml that exists (docs/operations.md lists every key).",
    )
    actions = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print every setting, its value and its source")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(func=cmd_config_show)


def _plain(value: Any, kind: str) -> Any:
    """JSON-able, with header values redacted (they often hold tokens)."""
    if kind == "headers":
        return {k: _REDACTED for k in value}
    if kind == "url_headers":
        return {url: {k: _REDACTED for k in hs} for url, hs in value.items()}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [str(v) if isinstance(v, Path) else v for v in value]
    return value


def cmd_config_show(args: argparse.Namespace) -> int:
    import json

    cfg = args.config_file
    rows = []
    for name, v in args.settings.items():
        value = _plain(v.value, v.key.kind)
        if name == "data_dir":
            value = str(args.data_dir)  # the default is the platform's directory: say which
        rows.append({"key": name, "value": value, "source": v.source, "where": v.where,
                     "reserved": v.key.reserved})
    if args.json:
        print_json({"file": str(cfg.path) if cfg.path else None, "searched": [str(p) for p in cfg.searched],
                    "settings": {r["key"]: {k: r[k] for k in ("value", "source", "where", "reserved")} for r in rows}})
        return 0
    if cfg.path:
        print(f"config file: {cfg.path}")
    else:
        looked = ", ".join(map(str, cfg.searched)) or "none (AUTOGLM_NODE_CONFIG is empty)"
        print(f"config file: none (looked for {looked})")
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        source = r["source"] + (f" {r['where']}" if r["where"] else "")
        note = "  (reserved: not used yet)" if r["reserved"] else ""
        print(f"{r['key']:<{width}}  {json.dumps(r['value'])}  [{source}]{note}")
    return 0
