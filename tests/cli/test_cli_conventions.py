"""CLI conventions in real subprocesses: --version, global options after the command,
typo suggestions, -v/-q, mirror URLs without a scheme."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest

from autoglm.node.cli._common import EXIT

CLI = [sys.executable, "-m", "autoglm.node.cli"]


def run(env: dict[str, str], *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("conv")
    e = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    e.update({"AUTOGLM_NODE_CONFIG": "", "AUTOGLM_DATA_DIR": str(home / "default"), "COLUMNS": "200",
              "NO_COLOR": "1"})
    return e


@dataclass
class Model:
    manifest: Path
    pub: Path
    mirror: str


@pytest.fixture(scope="module")
def model(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    """A published sample model behind a real `serve-mirror` process."""
    base = tmp_path_factory.mktemp("model")
    assert run(env, "sample-model", base / "m", "--size", "128KiB").returncode == 0
    assert run(env, "keygen", "--out", base / "k.key").returncode == 0
    r = run(env, "publish", base / "m", "--key", base / "k.key", "--name", "t/m", "--version", "1",
            "--out", base / "m.agm")
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([*CLI, "serve-mirror", str(base / "m")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        yield Model(base / "m.agm", base / "k.key.pub", url)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_version(env: dict[str, str]) -> None:
    r = run(env, "--version")
    assert r.returncode == 0
    assert r.stdout == f"autoglm-node {version('autoglm-node')}\n"


@pytest.mark.parametrize(("typo", "meant"), [("fech", "fetch"), ("pubish", "publish"), ("staus", "status"),
                                             ("cofnig", "config")])
def test_did_you_mean(env: dict[str, str], typo: str, meant: str) -> None:
    r = run(env, "-v", typo, "x")
    assert r.returncode == EXIT["usage"]
    assert f"unknown command {typo!r}; did you mean {meant!r}?" in r.stderr


def test_unknown_command_lists_the_commands(env: dict[str, str]) -> None:
    r = run(env, "zzzz")
    assert r.returncode == EXIT["usage"]
    assert "unknown command 'zzzz'" in r.stderr and "fetch" in r.stderr and "serve-mirror" in r.stderr


def test_global_options_after_the_command(env: dict[str, str], tmp_path: Path) -> None:
    r = run(env, "config", "show", "--json", "--data-dir", tmp_path / "after", "-v")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["settings"]
    assert s["data_dir"]["value"] == str(tmp_path / "after") and s["data_dir"]["source"] == "flag"
    assert s["log_level"] == {"value": "info", "source": "flag", "where": "-v", "reserved": False}
    # Before and after the command add up; after wins for values.
    r = run(env, "-v", "--data-dir", tmp_path / "before", "config", "show", "--json", "-v", "--data-dir", tmp_path / "x")
    s = json.loads(r.stdout)["settings"]
    assert s["log_level"]["value"] == "debug" and s["data_dir"]["value"] == str(tmp_path / "x")
    r = run(env, "ls", "-q", "--json")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = run(env, "ls", "-q", "-v")
    assert r.returncode == EXIT["usage"] and "-q and -v" in r.stderr
    assert "global options (before or after the command)" in run(env, "fetch", "--help").stdout


def test_data_dir_after_the_command_is_used(env: dict[str, str], model: Model, tmp_path: Path) -> None:
    r = run(env, "fetch", model.manifest, "--out", tmp_path / "out", "--trust", model.pub, "--mirror", model.mirror,
            "--standalone", "--json", "--data-dir", tmp_path / "node")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "node" / "store.sqlite").is_file()
    r = run(env, "ls", "--json", "--data-dir", tmp_path / "node")
    assert json.loads(r.stdout)["name"] == "t/m"


def test_verbose_and_quiet_set_the_log_level(env: dict[str, str], model: Model, tmp_path: Path) -> None:
    """An unreachable bootstrap peer logs a WARNING; -q silences it, -v adds INFO lines."""
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    peer = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    conf = tmp_path / "c.toml"
    conf.write_text(f'[network]\nbootstrap = ["/ip4/127.0.0.1/tcp/1/p2p/{peer}"]\n[mirrors]\nurls = ["http://127.0.0.1:1/", "{model.mirror}"]\n')

    def fetch(tag: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return run({**env, "AUTOGLM_NODE_CONFIG": str(conf)}, "fetch", model.manifest, "--out", tmp_path / tag,
                   "--trust", model.pub, "--json", "--data-dir", tmp_path / f"d-{tag}", *flags)

    plain, quiet, verbose = fetch("plain"), fetch("quiet", "-q"), fetch("verbose", "-v")
    for r in (plain, quiet, verbose):
        assert r.returncode == 0, r.stderr
    assert "WARNING autoglm.node._p2p: bootstrap peer unreachable" in plain.stderr
    assert " INFO " not in plain.stderr
    assert "WARNING" not in quiet.stderr and " INFO " not in quiet.stderr
    assert "INFO autoglm.node._engine: source mirror:http://127.0.0.1:1/ failed" in verbose.stderr


@pytest.mark.parametrize("url", ["127.0.0.1:8080/models/", "mirror.example.com", "ftp://m/", "http:/m/"])
def test_a_mirror_url_without_a_scheme_is_a_usage_error(env: dict[str, str], model: Model, tmp_path: Path,
                                                         url: str) -> None:
    r = run(env, "fetch", model.manifest, "--out", tmp_path / "out", "--trust", model.pub, "--mirror", url)
    assert r.returncode == EXIT["usage"], r.stderr
    assert f"--mirror {url!r}" in r.stderr and "http:// or https://" in r.stderr
    assert not (tmp_path / "out").exists()
    r = run({**env, "AUTOGLM_MIRRORS": url}, "doctor", "--json")
    assert r.returncode == EXIT["usage"] and "AUTOGLM_MIRRORS" in r.stderr
