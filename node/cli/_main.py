"""Entry point: global options, command registry, error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from autoglm.node._config import resolve_data_dir
from autoglm.node._logs import set_libp2p_level
from autoglm.node.errors import AutoglmError

from ._common import EXIT, err_console, exit_code_for

__all__ = ["build_parser", "main"]

# Each module defines register(subparsers); a command's handler is
# args.func(args) -> int. Order sets the order in --help.
_COMMAND_MODULES = ["_manifest_cmds", "_fetch_cmds", "_swarm_cmds", "_verify_cmds", "_mirror_cmds"]
# Which module registers each command: a command line that names one loads
# only that module (tests/cli checks this table against the modules).
COMMANDS = {
    "keygen": "_manifest_cmds", "publish": "_manifest_cmds", "inspect": "_manifest_cmds",
    "verify-manifest": "_manifest_cmds", "sample-model": "_manifest_cmds",
    "fetch": "_fetch_cmds", "ls": "_fetch_cmds", "gc": "_fetch_cmds",
    "join": "_swarm_cmds", "status": "_swarm_cmds", "name-publish": "_swarm_cmds",
    "verify": "_verify_cmds", "doctor": "_verify_cmds", "serve-mirror": "_mirror_cmds",
}


def _command_word(argv: Sequence[str]) -> str | None:
    """The command named on a command line (skipping the global options), or None."""
    it = iter(argv)
    for word in it:
        if word == "--data-dir":
            next(it, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` (a key of COMMANDS) only that command's module is loaded."""
    parser = argparse.ArgumentParser(
        prog="autoglm-node",
        description="Peer-to-peer distribution of model weights: signed manifests, verified "
        "resumable fetch from peers and mirrors, sandboxed checks before load.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage/config, 3 integrity, 4 trust, 5 malformed "
        "input, 6 network/source, 7 storage, 8 refused by verification, 130 interrupted.",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the node's home (keys, store, state); default $AUTOGLM_NODE_HOME or the platform data dir",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [COMMANDS[command]] if command in COMMANDS else _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # py-libp2p logs a great deal, and logs ERROR for what is routine here (a
    # peer that closed a stream); keep it quiet unless -vvv.
    set_libp2p_level(logging.DEBUG if verbose >= 3 else logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_word(words))
    args = parser.parse_args(words)
    _setup_logging(args.verbose)
    args.data_dir = resolve_data_dir(args.data_dir)
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; run the same command again to resume")
        return EXIT["interrupted"]
    except AutoglmError as exc:
        from rich.markup import escape

        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        return exit_code_for(exc)
    return rc


def _entry() -> None:  # pragma: no cover
    from autoglm.node._malloc import tune

    tune()
    sys.exit(main())
