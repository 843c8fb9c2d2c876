"""Entry point: global options, command registry, settings, error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autoglm.node._config import resolve_data_dir
from autoglm.node.errors import AutoglmError, ConfigError

from ._common import EXIT, err_console, exit_code_for

__all__ = ["build_parser", "main"]

# Each module defines register(subparsers); a command's handler is
# args.func(args) -> int. Order sets the order in --help.
_COMMAND_MODULES = ["_manifest_cmds", "_fetch_cmds", "_update_cmds", "_swarm_cmds", "_verify_cmds", "_trust_cmds", "_mirror_cmds", "_config_cmds"]
# Which module registers each command: a command line that names one loads
# only that module (tests/cli checks this table against the modules).
COMMANDS = {
    "keygen": "_manifest_cmds", "publish": "_manifest_cmds", "inspect": "_manifest_cmds",
    "verify-manifest": "_manifest_cmds", "sample-model": "_manifest_cmds",
    "fetch": "_fetch_cmds", "ls": "_fetch_cmds", "gc": "_fetch_cmds",
    "update": "_update_cmds", "rollback": "_update_cmds", "versions": "_update_cmds",
    "join": "_swarm_cmds", "status": "_swarm_cmds", "name-publish": "_swarm_cmds",
    "verify": "_verify_cmds", "doctor": "_verify_cmds", "serve-mirror": "_mirror_cmds",
    "config": "_config_cmds", "trust": "_trust_cmds",
}
# Commands that turn the garbage collector back on themselves once started
# (node/_startup.py: `join` once it listens); every other command gets it back
# before it runs.
_RESUMES_GC = frozenset({"join"})
# Global options that take a value (skipped when looking for the command word).
_VALUE_OPTIONS = ("--data-dir", "--config", "--log-format")


def _command_word(argv: Sequence[str]) -> str | None:
    """The command named on a command line (skipping the global options), or None."""
    it = iter(argv)
    for word in it:
        if word in _VALUE_OPTIONS:
            next(it, None)
        elif not word.startswith("-"):
            return word
    return None


class _Version(argparse.Action):
    """--version, reading the installed distribution's metadata only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("autoglm-node")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        sys.stdout.write(f"autoglm-node {v}\n")
        parser.exit()


def _add_global_options(p: argparse.ArgumentParser, *, sub: bool) -> None:
    """-v/-q/--data-dir/--config, before the command and (``sub``) after it.

    After the command they land in their own dests with no default, so a
    subcommand never overwrites what was given before it; main() merges them.
    """
    pre = "sub_" if sub else ""
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if sub else {}
    g = p.add_argument_group("global options (before or after the command)") if sub else p
    g.add_argument("--data-dir", dest=f"{pre}data_dir", metavar="DIR", **kw,
                   help="the node's home (keys, store, state); default $AUTOGLM_DATA_DIR, the config "
                   "file's data_dir, or the platform data dir")
    g.add_argument("--config", dest=f"{pre}config", metavar="FILE", **kw,
                   help="settings file (TOML); default $AUTOGLM_NODE_CONFIG, else the user's then the "
                   "system's config.toml (docs/operations.md)")
    g.add_argument("--log-format", dest=f"{pre}log_format", choices=("text", "json"), **kw,
                   help="log lines as key=value text or one JSON object per line (config: log_format)")
    g.add_argument("-v", "--verbose", dest=f"{pre}verbose", action="count", **(kw or {"default": 0}),
                   help="more logging (-vv debug, -vvv libp2p too)")
    g.add_argument("-q", "--quiet", dest=f"{pre}quiet", action="store_true", **kw,
                   help="errors and results only: no progress, info or warning lines")


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: it accepts the global options too (`ls -v`, `fetch ... -q`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", "Flags set once (mirrors, trust, bootstrap, listen addresses, limits) can "
                          "live in the config file: `autoglm-node config show` lists them and their sources.")
        super().__init__(*args, **kwargs)
        _add_global_options(self, sub=True)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` (a key of COMMANDS) only that command's module is loaded."""
    parser = argparse.ArgumentParser(
        prog="autoglm-node",
        description="Peer-to-peer distribution of model weights: signed manifests, verified "
        "resumable fetch from peers and mirrors, sandboxed checks before load.",
        epilog="Exit codes: 0 ok, 1 error, 2 usage/config, 3 integrity, 4 trust, 5 malformed "
        "input, 6 network/source, 7 storage, 8 refused by verification, 9 doctor check failed, 130 interrupted.",
    )
    parser.add_argument("--version", action=_Version)
    _add_global_options(parser, sub=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name in [COMMANDS[command]] if command in COMMANDS else _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        mod.register(sub)
    return parser


# -- settings ----------------------------------------------------------------


def _managed_actions(parser: argparse.ArgumentParser, command: str | None) -> dict[str, argparse.Action]:
    """The command's flags that a setting backs, by key name, with their defaults cleared.

    A flag left unset then parses as None, so a value the user typed is told
    apart from one that happens to equal the default.
    """
    from autoglm.node._settings import KEYS

    if command is None:
        return {}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cmd_parser = sub.choices.get(command)
    if cmd_parser is None:
        return {}
    by_dest = {a.dest: a for a in cmd_parser._actions}
    out = {}
    for key in KEYS:
        if key.dest and command in key.commands and key.dest in by_dest:
            action = by_dest[key.dest]
            action.default = None
            out[key.name] = action
    return out


def _as_arg(kind: str, value: Any, mirrors: list[str]) -> Any:
    """A setting's value as its flag would have parsed it."""
    if kind == "paths":
        return [Path(p) for p in value]
    if kind == "path":
        return None if value is None else Path(value)
    if kind == "headers":
        return [f"{k}: {v}" for k, v in value.items()]
    if kind == "url_headers":
        # Only for the mirrors in use: a file may hold headers for mirrors a flag left out.
        wanted = {m.rstrip("/") for m in mirrors}
        return [f"{url}={k}: {v}" for url, hs in value.items() if url.rstrip("/") in wanted for k, v in hs.items()]
    return list(value) if isinstance(value, list) else value


def _apply_settings(args: argparse.Namespace, actions: dict[str, argparse.Action]) -> None:
    """Fill every unset flag of the command from env, config file or default; record all values."""
    from autoglm.node._settings import find_config, read_config, resolve

    path, searched = find_config(args.config, os.environ)
    cfg = read_config(path, searched)
    flags: dict[str, tuple[Any, str]] = {}
    for name, action in actions.items():
        given = getattr(args, action.dest, None)
        if given is not None and given != []:
            flags[name] = (given, "/".join(action.option_strings))
    if args.data_dir:
        flags["data_dir"] = (Path(args.data_dir), "--data-dir")
    if args.log_format:
        flags["log_format"] = (args.log_format, "--log-format")
    if args.verbose or args.quiet:
        level = "error" if args.quiet else "info" if args.verbose == 1 else "debug"
        flags["log_level"] = (level, "-q" if args.quiet else "-" + "v" * args.verbose)
    values = resolve(cfg, os.environ, flags)
    mirrors = values["mirrors.urls"].value
    for name, action in actions.items():
        if name not in flags:
            setattr(args, action.dest, _as_arg(values[name].key.kind, values[name].value, mirrors))
    args.data_dir = resolve_data_dir(values["data_dir"].value)
    args.config_file = cfg
    args.settings = values


def _setup_logging(level_name: str, log_format: str, verbose: int, args: argparse.Namespace) -> None:
    from autoglm.node._logs import secrets_from_args, setup_logging

    secrets_from_args(args)
    setup_logging(level_name, log_format, verbose)


def _merge_global_options(args: argparse.Namespace) -> None:
    """Global options given after the command join those given before it."""
    args.verbose += getattr(args, "sub_verbose", 0)
    args.quiet = args.quiet or getattr(args, "sub_quiet", False)
    for name in ("data_dir", "config", "log_format"):
        if getattr(args, f"sub_{name}", None) is not None:
            setattr(args, name, getattr(args, f"sub_{name}"))
    if args.verbose and args.quiet:
        raise ConfigError("-q and -v contradict each other: give one")


def _unknown_command(word: str) -> int:
    import difflib

    near = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else f"; the commands are: {', '.join(COMMANDS)}"
    sys.stderr.write(f"usage: autoglm-node [options] COMMAND ...\nautoglm-node: error: unknown command {word!r}{hint}\n")
    return EXIT["usage"]


def _report(exc: AutoglmError) -> int:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    return exit_code_for(exc)


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = _command_word(words)
    if command is not None and command not in COMMANDS:
        return _unknown_command(command)
    parser = build_parser(command)
    # --help exits while parsing: it needs no settings (and stays fast).
    actions = {} if {"-h", "--help"} & set(words) else _managed_actions(parser, command)
    args = parser.parse_args(words)
    try:
        _merge_global_options(args)
        _apply_settings(args, actions)
    except AutoglmError as exc:
        return _report(exc)
    settings = args.settings
    _setup_logging(settings["log_level"].value, settings["log_format"].value, args.verbose, args)
    if command not in _RESUMES_GC:
        from autoglm.node._startup import resume

        resume()
    try:
        rc: int = args.func(args)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]; run the same command again to resume")
        return EXIT["interrupted"]
    except AutoglmError as exc:
        return _report(exc)
    return rc


def _entry() -> None:  # pragma: no cover
    from autoglm.node._malloc import tune
    from autoglm.node._startup import pause, skip_unused_imports

    pause()
    skip_unused_imports()
    tune()
    sys.exit(main())
