"""The config file reaches the commands: real `autoglm-node` processes with a TOML file.

Each test writes a config file, runs the CLI in a subprocess (no flags for what
the file sets) and looks at the effect: which mirror served the bytes, which
headers the mirror saw, which data directory holds the store, which exit code
and message an error gets.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from fetch.conftest import Published, publish
from fetch.faultserver import FaultServer

from autoglm.node.cli._common import EXIT

CLI = [sys.executable, "-m", "autoglm.node.cli"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    # No user or system config may leak in: each test names its own file.
    env.update({"AUTOGLM_NODE_CONFIG": "", "XDG_CONFIG_HOME": str(tmp / "xdg"), "HOME": str(tmp / "home"),
                "COLUMNS": "200", "NO_COLOR": "1"})
    env.update(extra)
    return env


async def run(env: dict[str, str], *args: str | Path) -> trio.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process([*CLI, *map(str, args)], env=env, capture_stdout=True, capture_stderr=True,
                                      check=False)


def _lines(p: trio.CompletedProcess[bytes]) -> list[dict[str, object]]:
    return [json.loads(ln) for ln in p.stdout.decode().splitlines()]


@pytest.fixture
def published(tmp_path: Path) -> Published:
    return publish(tmp_path, size=256 * 1024)


@pytest.fixture
async def server(published: Published) -> AsyncIterator[FaultServer]:
    srv = FaultServer(published.root)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server2(published: Published) -> AsyncIterator[FaultServer]:
    srv = FaultServer(published.root, prefix="/m2/")
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield srv
        nursery.cancel_scope.cancel()


async def test_mirror_trust_headers_and_data_dir_come_from_the_file(
    published: Published, server: FaultServer, tmp_path: Path
) -> None:
    conf = tmp_path / "etc" / "config.toml"
    conf.parent.mkdir()
    (conf.parent / "keys").mkdir()
    (conf.parent / "keys" / "pub.pub").write_bytes(published.pub_path.read_bytes())
    conf.write_text(f"""
data_dir = "state"      # relative to this file's directory

[mirrors]
urls = ["{server.url}"]
stall_timeout = 5
headers = {{ "X-Fleet" = "blue" }}

[mirrors.url_headers."{server.url}"]
Authorization = "Bearer from-the-file"

[trust]
keys = ["keys/pub.pub"]
""")
    env = _env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf))
    p = await run(env, "fetch", published.manifest_path, "--out", tmp_path / "out", "--json", "--standalone")
    assert p.returncode == 0, p.stderr.decode()
    done = _lines(p)[-1]
    assert done["bytes_by_source"] == {f"mirror:{server.url}": published.signed.manifest.total_size}
    published.assert_identical(tmp_path / "out")
    assert server.stats.headers
    assert all(h.get("authorization") == "Bearer from-the-file" for h in server.stats.headers)
    assert all(h.get("x-fleet") == "blue" for h in server.stats.headers)
    # The store went into the file's data_dir, and `ls` with the same file finds it there.
    assert (conf.parent / "state" / "store.sqlite").is_file()
    p = await run(env, "ls", "--json")
    assert json.loads(p.stdout)["complete"] is True
    p = await run(_env(tmp_path, AUTOGLM_DATA_DIR=str(tmp_path / "elsewhere")), "ls", "--json")
    assert p.stdout == b""


async def test_config_flag_names_the_file(published: Published, server: FaultServer, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[mirrors]\nurls = ["{server.url}"]\n[trust]\nkeys = ["{published.pub_path}"]\n')
    # --config after the command, like any global option.
    p = await run(_env(tmp_path), "--data-dir", tmp_path / "d", "fetch", published.manifest_path,
                  "--out", tmp_path / "out", "--json", "--standalone", "--config", conf)
    assert p.returncode == 0, p.stderr.decode()
    published.assert_identical(tmp_path / "out")


async def test_flag_beats_env_beats_file(
    published: Published, server: FaultServer, server2: FaultServer, tmp_path: Path
) -> None:
    refused = "http://127.0.0.1:1/"
    conf = tmp_path / "c.toml"
    conf.write_text(f'[mirrors]\nurls = ["{refused}"]\nstall_timeout = 2\n[trust]\nkeys = ["{published.pub_path}"]\n')
    base = ["fetch", published.manifest_path, "--json", "--standalone"]

    # env over file: the file's refused mirror is never used.
    env = _env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf), AUTOGLM_MIRRORS=server.url)
    p = await run(env, *base, "--out", tmp_path / "a", "--data-dir", tmp_path / "da")
    assert p.returncode == 0, p.stderr.decode()
    assert set(_lines(p)[-1]["bytes_by_source"]) == {f"mirror:{server.url}"}  # type: ignore[arg-type]

    # flag over env.
    p = await run(env, *base, "--out", tmp_path / "b", "--data-dir", tmp_path / "db", "--mirror", server2.url)
    assert p.returncode == 0, p.stderr.decode()
    assert set(_lines(p)[-1]["bytes_by_source"]) == {f"mirror:{server2.url}"}  # type: ignore[arg-type]

    # And `config show` says so.
    p = await run(env, "config", "show", "--json")
    got = json.loads(p.stdout)
    assert got["file"] == str(conf)
    s = got["settings"]
    assert s["mirrors.urls"] == {"value": [server.url], "source": "env", "where": "AUTOGLM_MIRRORS", "reserved": False}
    assert s["mirrors.stall_timeout"]["source"] == "file" and s["mirrors.stall_timeout"]["where"] == f"{conf}:3"
    assert s["mirrors.stall_timeout"]["value"] == 2.0
    assert s["mirrors.connections"] == {"value": 4, "source": "default", "where": "", "reserved": False}
    assert s["network.gateway"]["reserved"] is False and s["network.metrics"]["reserved"] is False


async def test_trust_from_the_environment(published: Published, server: FaultServer, tmp_path: Path) -> None:
    base = ["--data-dir", tmp_path / "d", "fetch", published.manifest_path, "--json", "--standalone",
            "--mirror", server.url]
    p = await run(_env(tmp_path), *base, "--out", tmp_path / "a")
    assert p.returncode == EXIT["trust"], p.stderr.decode()
    p = await run(_env(tmp_path, AUTOGLM_TRUST=f"{tmp_path / 'nope.pub'}{os.pathsep}{published.pub_path}"),
                  *base, "--out", tmp_path / "b")
    assert p.returncode == EXIT["usage"]  # a key file that is not there is named
    assert "nope.pub" in p.stderr.decode()
    p = await run(_env(tmp_path, AUTOGLM_TRUST=str(published.pub_path)), *base, "--out", tmp_path / "c")
    assert p.returncode == 0, p.stderr.decode()
    published.assert_identical(tmp_path / "c")


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('log_level = "info"\n[mirrors]\nconections = 4\n', 3, ["unknown key 'mirrors.conections'", "'mirrors.connections'"]),
        ('[network]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\nupload_slots = "8"\n', 3, ["network.upload_slots", "must be an integer, got a string"]),
        ('[mirrors]\nurls = [\n  "https://ok/",\n  "mirror.example.com/models/",\n]\n', 2, ["http:// or https://"]),
        ('[mirrors.url_headers."https://m/"]\nAuthorization = 5\n', 1, ["mirrors.url_headers", "must be a string"]),
        ('log_level = "loud"\n', 1, ["must be one of error, warning, info, debug"]),
        ('mirrors = ["https://m/"]\n', 1, ["unknown key 'mirrors'"]),
        ('[trust]\nkeys = "a.pub"\n', 2, ["trust.keys", "must be an array of strings"]),
        ('[network]\nup_rate = "fast"\n', 2, ["not a size"]),
        ('data_dir = \n', 1, ["not valid TOML", "line 1"]),
        ('[join]\nverify = "yes"\n', 2, ["join.verify", "must be true or false, got a string"]),
        ('[join]\nfollow_interval = 0\n', 2, ["join.follow_interval", "must be at least 1"]),
    ],
)
async def test_a_bad_file_is_a_config_error_with_its_line(tmp_path: Path, text: str, line: int, words: list[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    for argv in (["config", "show"], ["ls"]):  # every command reads the file first
        p = await run(_env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf)), *argv)
        err = p.stderr.decode()
        assert p.returncode == EXIT["usage"], err
        if "not valid TOML" not in words:
            assert f"{conf}:{line}:" in err, err
        for w in words:
            assert w in err, err


async def test_a_named_file_that_is_missing(tmp_path: Path) -> None:
    p = await run(_env(tmp_path), "--config", tmp_path / "nope.toml", "ls")
    assert p.returncode == EXIT["usage"] and "nope.toml: no such file" in p.stderr.decode()
    p = await run(_env(tmp_path, AUTOGLM_NODE_CONFIG=str(tmp_path / "gone.toml")), "ls")
    assert p.returncode == EXIT["usage"] and "gone.toml: no such file" in p.stderr.decode()


async def test_the_user_config_location_is_read(tmp_path: Path) -> None:
    env = _env(tmp_path)
    del env["AUTOGLM_NODE_CONFIG"]
    user = tmp_path / "xdg" / "autoglm-node" / "config.toml"
    p = await run(env, "config", "show", "--json")
    got = json.loads(p.stdout)
    assert got["file"] is None and str(user) in got["searched"] and "/etc/autoglm-node/config.toml" in got["searched"]
    user.parent.mkdir(parents=True)
    user.write_text('data_dir = "/srv/autoglm"\nlog_format = "json"\n')
    p = await run(env, "config", "show", "--json")
    got = json.loads(p.stdout)
    assert got["file"] == str(user)
    assert got["settings"]["data_dir"] == {"value": "/srv/autoglm", "source": "file", "where": f"{user}:1", "reserved": False}
    p = await run(env, "--data-dir", tmp_path / "x", "config", "show", "--json")
    assert json.loads(p.stdout)["settings"]["data_dir"]["source"] == "flag"
    p = await run({**env, "AUTOGLM_DATA_DIR": str(tmp_path / "y")}, "config", "show", "--json")
    assert json.loads(p.stdout)["settings"]["data_dir"] == {
        "value": str(tmp_path / "y"), "source": "env", "where": "AUTOGLM_DATA_DIR", "reserved": False}


async def test_join_follow_verify_and_gateway_keys_come_from_the_file(tmp_path: Path) -> None:
    """The keys an operator sets once for a following, verifying gateway node reach `join`'s flags."""
    from autoglm.node.cli._main import _apply_settings, _managed_actions, build_parser

    conf = tmp_path / "c.toml"
    (tmp_path / "m").mkdir()
    conf.write_text('[join]\nverify = true\nfollow = ["a", "b"]\nfollow_keep = 3\nfollow_interval = 30\n'
                    '[hub]\nendpoints = ["http://127.0.0.1:9/"]\nmanifests = ["m"]\n')
    parser = build_parser("join")
    actions = _managed_actions(parser, "join")
    args = parser.parse_args(["--config", str(conf), "join", "--follow-keep", "5"])
    args.data_dir = None
    _apply_settings(args, actions)
    assert args.verify is True and args.follow == ["a", "b"] and args.follow_interval == 30.0
    assert args.follow_keep == 5  # the flag beats the file
    assert args.endpoint == ["http://127.0.0.1:9/"] and args.hf_manifest == [tmp_path / "m"]
    p = await run(_env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf)), "config", "show", "--json")
    s = json.loads(p.stdout)["settings"]
    assert s["join.verify"]["value"] is True and s["join.verify"]["where"] == f"{conf}:2"
    assert s["join.follow_keep"]["source"] == "file"


async def test_config_show_text_redacts_header_values(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[mirrors]\nurls = ["https://m.example/"]\n[mirrors.url_headers."https://m.example/"]\n'
                    'Authorization = "Bearer sekrit"\n')
    p = await run(_env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf)), "config", "show")
    out = p.stdout.decode()
    assert p.returncode == 0, p.stderr.decode()
    assert f"config file: {conf}" in out
    assert "sekrit" not in out and "Authorization" in out
    assert f"file {conf}:2" in out  # mirrors.urls and its line


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_join_runs_from_the_file_alone(tmp_path: Path) -> None:
    """`join --json` with nothing but a config file: it seeds the file's manifest from the
    file's mirror, trusts the file's key, writes into the file's data_dir and out."""
    from swarm.harness import CLI as SWARM_CLI
    from swarm.harness import Proc, processes, same_tree, start_mirror
    from swarm.harness import publish as publish_model

    pub = publish_model(tmp_path / "pub", size="2MiB", piece="256KiB")
    conf = tmp_path / "etc" / "config.toml"
    conf.parent.mkdir()
    with processes() as procs:
        url = start_mirror(procs, tmp_path, pub["model"])
        conf.write_text(f"""
data_dir = "state"
log_format = "json"
log_level = "info"
[network]
upload_slots = 3
[mirrors]
urls = ["{url}"]
[trust]
keys = ["{pub['key']}"]
[join]
seed = ["{pub['manifest']}"]
out = "models/m"
""")
        env = _env(tmp_path, AUTOGLM_NODE_CONFIG=str(conf))
        node = Proc([*SWARM_CLI, "join", "--json"], "node", tmp_path, env=env)
        procs.append(node)
        done = node.event("complete", 90)
        assert set(done["bytes_by_source"]) == {f"mirror:{url}"}
        assert same_tree(pub["model"], conf.parent / "models" / "m")
        st = json.loads(subprocess_run(env, "status", "--json"))
        assert st["models"][done["manifest_id"]]["complete"]
        assert (conf.parent / "state" / "control.sock").exists()
        assert node.stop() == 0
    # log_format = "json": every log line on stderr is one JSON object.
    logs = [json.loads(ln) for ln in node.err_path.read_text().splitlines() if ln.strip()]
    assert logs and all({"ts", "level", "logger", "message"} <= set(ln) for ln in logs)
    assert any(ln["level"] == "info" and ln["logger"].startswith("autoglm.node") for ln in logs)


def subprocess_run(env: dict[str, str], *args: str) -> str:
    import subprocess

    r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=30, check=True)
    return r.stdout


async def test_verify_manifest_and_doctor_read_the_file(published: Published, server: FaultServer, tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[trust]\nkeys = ["{published.pub_path}"]\n[mirrors]\nurls = ["{server.url}"]\n')
    bare = _env(tmp_path, AUTOGLM_DATA_DIR=str(tmp_path / "d"))
    with_file = {**bare, "AUTOGLM_NODE_CONFIG": str(conf)}
    assert (await run(bare, "verify-manifest", published.manifest_path)).returncode == EXIT["trust"]
    p = await run(with_file, "verify-manifest", published.manifest_path)
    assert p.returncode == 0, p.stderr.decode()
    p = await run(with_file, "doctor", "--json")
    checks = {c["name"]: c for c in json.loads(p.stdout)["checks"]}
    mirror = [c for name, c in checks.items() if name.startswith("mirror")]
    # Reached (a loaded machine may answer slowly: "warn" is a high RTT, not a failure).
    assert mirror and server.url in mirror[0]["detail"] and mirror[0]["status"] in ("pass", "warn"), checks
    assert server.stats.requests > 0
