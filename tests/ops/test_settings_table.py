"""The settings table against the parser: each key backs a real flag with the same default,
the docs list every key, and reading settings stays light."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from autoglm.node._settings import KEYS, read_config
from autoglm.node.cli._main import build_parser

REPO = Path(__file__).resolve().parents[2]


def _command_actions(command: str) -> dict[str, argparse.Action]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


def test_every_key_backs_a_flag_with_the_same_default() -> None:
    for key in KEYS:
        for command in key.commands:
            actions = _command_actions(command)
            assert key.dest in actions, (key.name, command)
            action = actions[key.dest]
            assert key.flag in action.option_strings, (key.name, command, action.option_strings)
            default = action.default
            if key.name == "network.listen":
                # join --listen: no flag means DEFAULT_LISTEN (the command fills it in)
                from autoglm.node.cli._swarm_cmds import DEFAULT_LISTEN

                assert default == [] and key.default == [DEFAULT_LISTEN]
                continue
            if key.kind in ("headers", "url_headers"):
                assert default == [] and key.default == {}
                continue
            assert default == key.default, (key.name, command, default, key.default)


def test_keys_without_a_flag_are_few_and_known() -> None:
    assert {k.name for k in KEYS if not k.commands} == {
        "data_dir", "log_level", "log_format"}
    assert {k.name for k in KEYS if k.reserved} == set()


def test_operations_doc_lists_every_key_and_env_var() -> None:
    doc = (REPO / "docs" / "operations.md").read_text()
    for key in KEYS:
        assert f"`{key.name}`" in doc, key.name
        for env in key.env:
            assert f"`{env}`" in doc, env


def test_the_example_config_in_the_docs_is_valid(tmp_path: Path) -> None:
    """docs/deploy/config.toml is the reference file: it must parse and set every non-reserved key."""
    path = REPO / "docs" / "deploy" / "config.toml"
    cfg = read_config(path)
    assert set(cfg.values) == {k.name for k in KEYS}


def test_reading_settings_imports_no_event_loop_or_network_stack() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from autoglm.node.cli._main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = main(['config', 'show', '--json'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p', 'httpx', 'rich', 'cryptography')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                       env={"AUTOGLM_NODE_CONFIG": str(REPO / "docs" / "deploy" / "config.toml"), "PATH": "/usr/bin"})
    assert r.returncode == 0, r.stderr
    rc, mods = r.stdout.split(" ", 1)
    assert rc == "0" and json.loads(mods.replace("'", '"')) == []
