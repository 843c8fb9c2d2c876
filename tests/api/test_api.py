"""The public surface of autoglm.node under each way Python code runs: a plain
script, trio, asyncio.run, and a thread whose asyncio loop is already running
(a notebook). Real mirror process, real files (conftest.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

import autoglm.node as api
from autoglm.node import afetch, aopen_model, fetch, open_model, trust_policy
from autoglm.node.errors import ConfigError, TrustError
from autoglm.protocol import encode_public_key, generate_private_key, parse_public_key

from .conftest import Served

FILES = ("config.json", "model.safetensors", "tokenizer.json")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default data directory (data_dir=None) for this test."""
    d = tmp_path / "data"
    monkeypatch.setenv("AUTOGLM_DATA_DIR", str(d))
    monkeypatch.delenv("AUTOGLM_NODE_HOME", raising=False)
    return d


def assert_fetched(served: Served, out: Path) -> None:
    for name in FILES:
        assert (out / name).read_bytes() == (served.work / "tiny" / name).read_bytes(), name


def test_import_is_light_and_all_names_resolve() -> None:
    code = textwrap.dedent(
        """
        import sys
        import autoglm.node
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("trio", "wasmtime", "libp2p", "httpx", "cryptography")
                       or m.startswith("autoglm.node."))
        print(heavy)
        from autoglm.node import *
        print(sorted(autoglm.node.__all__) == sorted(n for n in autoglm.node.__all__ if n in globals()))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.split("\n")[:2] == ["[]", "True"], r.stdout + r.stderr
    with pytest.raises(AttributeError):
        _ = api.no_such_name  # type: ignore[attr-defined]


def test_plain_script_with_str_paths_and_a_key_file(served: Served, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from autoglm.node import fetch, open_model
        r = fetch({served.manifest_url!r}, out="out", trust="publisher.pub", data_dir="data")
        print(sum(r.bytes_by_source.values()))
        m = open_model("org/tiny@1", data_dir="data", trust="publisher.pub")
        print(m.root)
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOGLM_DATA_DIR", "AUTOGLM_NODE_HOME")}
    env["HOME"] = str(tmp_path / "home")  # the platform default must not be used: data_dir was given
    os.symlink(served.pub, tmp_path / "publisher.pub")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    fetched, root = r.stdout.split()
    assert int(fetched) > 1_000_000 and Path(root) == (tmp_path / "out").resolve()
    assert_fetched(served, tmp_path / "out")
    assert not (tmp_path / "home").exists()


def test_default_data_dir_is_consulted(served: Served, tmp_path: Path, data_dir: Path) -> None:
    fetch(served.manifest_url, out=tmp_path / "out", trust=served.pub)
    assert (data_dir / "store.sqlite").exists()
    by_name = open_model("org/tiny", trust=served.pub)  # data_dir=None: the same default as fetch
    by_path = open_model(str(tmp_path / "out"), trust=served.pub)  # its stored manifest vouches for it
    assert by_name.root == by_path.root == (tmp_path / "out").resolve()
    assert by_path.manifest is not None and by_path.manifest.name == "org/tiny"


def test_trust_store_is_the_default_and_an_empty_one_says_what_to_do(served: Served, tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="trust add"):
        fetch(served.manifest_url, out=tmp_path / "out")
    (data_dir / "trust").mkdir(parents=True)
    (data_dir / "trust" / "publisher.pub").write_bytes(served.pub.read_bytes())
    fetch(served.manifest_url, out=tmp_path / "out")
    assert open_model(tmp_path / "out").manifest is not None


def test_trust_forms(served: Served, tmp_path: Path, data_dir: Path) -> None:
    pem = served.pub.read_bytes()
    raw = parse_public_key(pem)
    other = encode_public_key(generate_private_key())
    policy = trust_policy(keys=[served.pub])
    for trust in (str(served.pub), served.pub, pem, raw, raw.hex().encode(), [other, served.pub], policy, trust_policy(keys=pem)):
        assert open_model(served.work / "tiny", trust=trust).manifest is not None, trust
    assert trust_policy(keys=[str(served.pub), pem]).keys == frozenset({raw})
    assert trust_policy(spiffe_ids="spiffe://example.org/m/").spiffe_ids == ("spiffe://example.org/m/",)
    with pytest.raises(TrustError):
        fetch(served.manifest_url, out=tmp_path / "out", trust=other)
    with pytest.raises(ConfigError, match="not an Ed25519"):
        trust_policy(keys=b"not a key")
    with pytest.raises(ConfigError, match="cannot read public key"):
        fetch(served.manifest_url, out=tmp_path / "out", trust="missing.pub")
    with pytest.raises(ConfigError, match="key file path or key bytes"):
        trust_policy(keys=[42])  # type: ignore[list-item]


def test_a_manifest_file_needs_mirrors(served: Served, tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ConfigError, match="mirror"):
        fetch(served.work / "tiny" / "tiny.agm", out=tmp_path / "out", trust=served.pub)
    r = fetch(served.work / "tiny" / "tiny.agm", out=tmp_path / "out", trust=served.pub, mirrors=[served.url])
    assert r.bytes_total > 1_000_000
    assert_fetched(served, tmp_path / "out")


def test_under_trio(served: Served, tmp_path: Path, data_dir: Path) -> None:
    async def main() -> None:
        r = await afetch(served.manifest_url, out=tmp_path / "a", trust=served.pub)
        assert r.bytes_total > 1_000_000
        m = await aopen_model(tmp_path / "a", trust=served.pub)
        assert m.manifest is not None
        # The blocking form from inside trio runs in a worker thread instead of failing.
        again = fetch(served.manifest_url, out=tmp_path / "a", trust=served.pub)
        assert sum(again.bytes_by_source.values()) == 0

    trio.run(main)
    assert_fetched(served, tmp_path / "a")


def test_under_asyncio_run_the_loop_keeps_running(served: Served, tmp_path: Path, data_dir: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> None:
        t = asyncio.ensure_future(ticker())
        r = await afetch(served.manifest_url, out=tmp_path / "b", trust=served.pub)
        m = await aopen_model(tmp_path / "b", trust=served.pub)
        t.cancel()
        assert r.bytes_total > 1_000_000 and m.manifest is not None

    asyncio.run(main())
    assert ticks > 10  # the fetch ran beside the loop, not on it
    assert_fetched(served, tmp_path / "b")


def test_blocking_calls_inside_a_running_asyncio_loop_like_a_notebook_cell(served: Served, tmp_path: Path, data_dir: Path) -> None:
    async def cell() -> None:
        asyncio.get_running_loop()  # what IPython's kernel has while a cell runs
        r = fetch(served.manifest_url, out=tmp_path / "c", trust=served.pub)
        assert r.bytes_total > 1_000_000
        assert open_model(tmp_path / "c", trust=served.pub).manifest is not None

    asyncio.run(cell())
    assert_fetched(served, tmp_path / "c")


def test_errors_cross_the_worker_thread_unchanged(served: Served, tmp_path: Path, data_dir: Path) -> None:
    async def cell() -> None:
        with pytest.raises(TrustError):
            fetch(served.manifest_url, out=tmp_path / "d", trust=encode_public_key(generate_private_key()))

    asyncio.run(cell())


def test_reprs_are_readable(served: Served, tmp_path: Path, data_dir: Path) -> None:
    m = open_model(served.work / "tiny", trust=served.pub)
    text = repr(m)
    assert "org/tiny@1" in text and "files=3" in text and len(text) < 300
    assert m.manifest is not None
    for f in m.manifest.files:
        for p in f.pieces:
            assert p.hash.hex()[:16] not in text


CANCEL_SCRIPT = """
import asyncio, os, signal, socket, sys, threading, time
from autoglm.node import afetch, fetch

hole = socket.socket()
hole.bind(("127.0.0.1", 0))
hole.listen(8)  # never accepts, never answers: the fetch waits on it
mirror = f"http://127.0.0.1:{hole.getsockname()[1]}/"
kw = dict(out="out", trust=sys.argv[3], mirrors=[mirror], data_dir="data")

async def task_cancel():
    task = asyncio.ensure_future(afetch(sys.argv[2], **kw))
    await asyncio.sleep(1.0)
    t0 = time.monotonic()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        print("cancelled in", round(time.monotonic() - t0, 1), "; still there:", os.path.exists("out"))

async def cell_interrupted():
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    try:
        fetch(sys.argv[2], **kw)
    except KeyboardInterrupt:
        # The fetch has wound down before fetch() re-raised: its failed start is gone.
        print("interrupted; still there:", os.path.exists("out"))

# As IPython runs a cell: a loop that runs, with Python's own SIGINT handler
# (asyncio.run would install one that only cancels the main task).
loop = asyncio.new_event_loop()
loop.run_until_complete(task_cancel() if sys.argv[1] == "task" else cell_interrupted())
loop.close()
print("nothing left behind:", not os.path.exists("out"))
"""


@pytest.mark.parametrize("how", ["task", "interrupt"])
def test_cancelling_stops_the_fetch_in_the_worker_thread(how: str, served: Served, tmp_path: Path) -> None:
    """A cancelled asyncio task, or Ctrl-C in a notebook cell, stops the fetch instead of leaving it running."""
    env = {k: v for k, v in os.environ.items() if k not in ("AUTOGLM_DATA_DIR", "AUTOGLM_NODE_HOME")}
    r = subprocess.run(
        [sys.executable, "-c", CANCEL_SCRIPT, how, str(served.work / "tiny" / "tiny.agm"), str(served.pub)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    if how == "task":
        assert float(r.stdout.split("cancelled in")[1].split()[0]) < 10, r.stdout
    assert "still there: False" in r.stdout, r.stdout
    assert "nothing left behind: True" in r.stdout, r.stdout
