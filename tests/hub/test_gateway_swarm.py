"""The gateway served from the swarm: a trusted ``publish hf://`` manifest covers the commit.

Real processes: a Hub-shaped server, a seeding node, a gateway node joined to it,
and the real huggingface_hub client at the gateway. The Hub server counts what it
sent, so a gateway that fetched the big file from the Hub instead of the peer
fails here; the node's Prometheus endpoint is scraped and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save

from tests.fetch.faultserver import FaultServer

from .conftest import REPO, Hub, clean_env, model_files, run_cli, run_py, tree

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FOLDER = "models--" + REPO.replace("/", "--")
BIG = "big.safetensors"
BIN = "weights.bin"
OTHER = "acme/other-model"


def _snapshot_code(repo: str, revision: str | None = None) -> str:
    rev = "" if revision is None else f", revision={revision!r}"
    return f"from huggingface_hub import snapshot_download\nprint(snapshot_download({repo!r}{rev}))\n"


def _client(code: str, env: dict[str, str]) -> str:
    """The real huggingface_hub in a fresh process (from a worker thread: the Hub server runs on the test's loop)."""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done.stdout.decode().strip()


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in metrics.items() if n == name and all((k, labels[k]) in ls for k in labels))


async def test_gateway_takes_a_published_commit_from_the_peer_not_the_hub(hub: Hub, tmp_path: Path) -> None:
    from tests.swarm.harness import processes, start_node

    files = {**hub.files, BIG: save({"w": np.random.default_rng(5).integers(0, 255, size=(6 << 20) // 4, dtype=np.int32)})}
    commit = hub.server.add_commit(REPO, files)  # main now points here
    other = hub.server.add_commit(OTHER, model_files(seed=9))  # covered by no manifest
    big_obj = "objects/" + hashlib.sha256(files[BIG]).hexdigest()
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
    res = await run_cli(["--data-dir", str(tmp_path / "pub"), "publish", f"hf://{REPO}@main", "--key", str(tmp_path / "key"),
                         "--cache-dir", str(tmp_path / "pubcache"), "--out", str(tmp_path / "m.agm"), "--max-piece", "1MiB",
                         "--json"], env)
    assert json.loads(res.stdout.decode().splitlines()[-1])["commit"] == commit
    direct = tmp_path / "direct"  # the reference tree: the same client straight at the Hub server
    await run_py(_snapshot_code(REPO), clean_env(direct, HF_ENDPOINT=hub.url))
    pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}
    node_env = clean_env(tmp_path / "gwnode", HF_ENDPOINT=hub.url)

    def swarm() -> tuple[dict[str, int], dict[Any, float], dict[Any, float], str, str]:
        with processes() as procs:
            a = start_node(procs, tmp_path, "a", pub, env=env)  # the seed: fetches it (Hub as web seed), then serves it
            a.event("complete", 120)
            before = dict(hub.cdn.stats.by_path)
            b = start_node(procs, tmp_path, "b", pub, seed=False, bootstrap=[a.seen[0]["addrs"][0]], env=node_env,
                           extra=["--hf-gateway", "127.0.0.1:0", "--hf-manifest", str(pub["manifest"]),
                                  "--metrics", "127.0.0.1:0"])
            ready = b.event("ready", 10)
            url, metrics_url = ready["hf_gateway"], ready["metrics"]
            assert ready["hf_gateway_swarm"] == [f"{REPO}@{commit[:12]}"]
            client = tmp_path / "client"
            snap = _client(_snapshot_code(REPO), clean_env(client, HF_ENDPOINT=url))
            during = {k: v - before.get(k, 0) for k, v in hub.cdn.stats.by_path.items()}
            swarm_metrics = _scrape(metrics_url)
            # A repository no manifest covers: the gateway's own hub fetch serves it.
            assert Path(_client(_snapshot_code(OTHER), clean_env(tmp_path / "client-other", HF_ENDPOINT=url))).name == other
            return during, swarm_metrics, _scrape(metrics_url), snap, url

    during, m1, m2, snap, _ = await trio.to_thread.run_sync(swarm)
    assert Path(snap).name == commit
    for path, data in files.items():
        assert (Path(snap) / path).read_bytes() == data, path
    # The client's cache is exactly what a direct download writes.
    assert tree(tmp_path / "client" / "hf-home" / "hub" / FOLDER) == tree(direct / "hf-home" / "hub" / FOLDER)
    # The big file came from the peer: the Hub (its CDN) sent none of its bytes while the gateway served it.
    assert during.get(big_obj, 0) == 0, during
    size = sum(len(d) for d in set(files.values()))
    assert _sum(m1, "autoglm_gateway_served_bytes_total", via="swarm") >= len(files[BIG])
    assert _sum(m1, "autoglm_fetched_bytes_total", source="peer") >= len(files[BIG])
    assert _sum(m1, "autoglm_fetched_bytes_total", source="hub") == 0
    assert _sum(m1, "autoglm_fetched_bytes_total") <= size
    # Then the uncovered repository through the hub fetch: bytes in by source kind "hub", served via "hub".
    old = sum(len(d) for d in set(model_files(seed=9).values()))
    assert _sum(m2, "autoglm_fetched_bytes_total", source="hub") >= old > 0
    assert _sum(m2, "autoglm_gateway_served_bytes_total", via="hub") >= old
    assert _sum(m2, "autoglm_gateway_flights_total") >= len(set(files.values()))
    # The node holds the files once: each blob is a hard link to the file it keeps seeding.
    blob = tmp_path / "gwnode" / "hf-home" / "hub" / FOLDER / "blobs" / hashlib.sha256(files[BIG]).hexdigest()
    seeded = tmp_path / "gwnode" / "hf-home" / "hub" / FOLDER / ".autoglm-files" / commit / BIG
    assert blob.read_bytes() == files[BIG] and blob.stat().st_ino == seeded.stat().st_ino


async def test_a_manifest_the_node_is_already_fetching_is_served_through_the_hub_fetch(tmp_path: Path) -> None:
    """`join --seed M.agm --hf-manifest M.agm`: while the seed runs, the node cannot start a second fetch of that
    manifest; the gateway hands the file to its hub fetch instead of failing the client."""
    from tests.swarm.harness import processes, start_node

    from .hubserver import HubServer
    from .test_gateway import SlowTail

    root = tmp_path / "slowroot"
    cdn = SlowTail(root)
    cdn.pause = 6.0  # the seed's fetch is still running when the client asks
    server = HubServer(root, cdn=cdn)
    files = {"config.json": b'{"model_type": "big"}', BIN: np.random.default_rng(9).bytes(20 << 20)}
    repo = "acme/seeded"
    commit = server.add_commit(repo, files)
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(server.serve)
        url = f"http://127.0.0.1:{server.port}"
        env = clean_env(tmp_path, HF_ENDPOINT=url)
        await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
        cdn.pause = 0.0
        await run_cli(["--data-dir", str(tmp_path / "pub"), "publish", f"hf://{repo}@main", "--key", str(tmp_path / "key"),
                       "--cache-dir", str(tmp_path / "pubcache"), "--out", str(tmp_path / "m.agm"), "--json"], env)
        cdn.pause = 6.0
        pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}

        def run() -> tuple[str, str]:
            with processes() as procs:
                n = start_node(procs, tmp_path, "n", pub, env=clean_env(tmp_path / "node", HF_ENDPOINT=url),
                               extra=["--hf-gateway", "127.0.0.1:0", "--hf-manifest", str(pub["manifest"])])
                gw = n.event("ready", 10)["hf_gateway"]
                snap = _client(f"from huggingface_hub import hf_hub_download\nprint(hf_hub_download({repo!r}, {BIN!r}))\n",
                               clean_env(tmp_path / "client", HF_ENDPOINT=gw, HF_HUB_DOWNLOAD_TIMEOUT="60"))
                return snap, n.stderr_tail(20000)

        path, log = await trio.to_thread.run_sync(run)
        nursery.cancel_scope.cancel()
    assert Path(path).read_bytes() == files[BIN]  # noqa: ASYNC240
    assert Path(path).parent.name == commit
    assert "already fetching" in log, log[-3000:]


class PacedCdn(FaultServer):
    """A slow upstream: one answer at a time, in the order asked (a fair lock), each 256 KiB ``pace`` seconds apart.

    So the bytes it sent before some range is what the node asked for first.
    """

    pace = 0.0

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.one_at_a_time = trio.Lock()

    async def _respond(self, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str],
                       reused: bool = False) -> bool:
        async with self.one_at_a_time:
            return await super()._respond(stream, method, target, headers, reused)

    async def _send_body(self, stream: trio.SocketStream, rel: str, data: bytes) -> None:
        step = 256 << 10
        for i in range(0, len(data), step):
            await super()._send_body(stream, rel, data[i : i + step])
            if self.pace:
                await trio.sleep(self.pace)


async def test_a_swarm_flight_streams_the_front_of_the_file_while_the_fetch_runs(tmp_path: Path) -> None:
    """The gateway's swarm fetch follows the streaming order (picker rule 6): the client gets the first bytes of a
    big file when the upstream has sent little of it, and the node logs the file's first streamable bytes well
    before every piece is verified. (In the first-copy rank order the node asks for the front at a random point:
    the first MiB came after 25-33 of the 32 MiB in about half the runs; tests/protocol/test_stream_order.py pins
    the order itself.)"""
    from tests.swarm.harness import processes, start_node

    from .hubserver import HubServer
    from .test_gateway import http

    root = tmp_path / "pacedroot"
    cdn = PacedCdn(root)
    server = HubServer(root, cdn=cdn)
    data = np.random.default_rng(11).bytes(32 << 20)
    files = {"config.json": b'{"model_type": "paced"}', BIN: data}
    repo = "acme/paced"
    server.add_commit(repo, files)
    obj = "objects/" + hashlib.sha256(data).hexdigest()
    async with trio.open_nursery() as nursery:
        await nursery.start(cdn.serve)
        await nursery.start(server.serve)
        url = f"http://127.0.0.1:{server.port}"
        env = clean_env(tmp_path, HF_ENDPOINT=url)
        await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
        await run_cli(["--data-dir", str(tmp_path / "pub"), "publish", f"hf://{repo}@main", "--key", str(tmp_path / "key"),
                       "--cache-dir", str(tmp_path / "pubcache"), "--out", str(tmp_path / "m.agm"), "--max-piece", "1MiB",
                       "--json"], env)
        pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}
        cdn.pace = 0.05  # 5 MiB/s: the fetch takes seconds
        with processes() as procs:
            n = await trio.to_thread.run_sync(lambda: start_node(
                procs, tmp_path, "n", pub, seed=False, env=clean_env(tmp_path / "node", HF_ENDPOINT=url),
                extra=["--hf-gateway", "127.0.0.1:0", "--hf-manifest", str(pub["manifest"])]))
            gw = (await trio.to_thread.run_sync(n.event, "ready", 10))["hf_gateway"]
            sent_before = cdn.stats.by_path.get(obj, 0)
            st, h, head = await http(f"{gw}/{repo}/resolve/main/{BIN}", read_until=1 << 20)
            sent_at_head = cdn.stats.by_path.get(obj, 0) - sent_before
            assert st == 200 and h["content-length"] == str(len(data))
            assert head[: 1 << 20] == data[: 1 << 20]
            # The node's first requests cover the front (it opens 4 connections at once, served in the order they came).
            assert sent_at_head < len(data) * 3 // 4, (f"the first MiB came after {sent_at_head} of {len(data)} bytes",
                                                      cdn.stats.log)
            st, _, body = await http(f"{gw}/{repo}/resolve/main/{BIN}")
            assert st == 200 and body == data

            log = n.stderr_tail(200_000)
        nursery.cancel_scope.cancel()
    first = re.search(rf"{re.escape(BIN)}: first \d+ byte\(s\) streamable ([\d.]+)s", log)
    every = re.search(rf"{re.escape(BIN)}: every piece verified ([\d.]+)s", log)
    assert first is not None and every is not None, log[-3000:]
    assert float(first.group(1)) < float(every.group(1)), (first.group(0), every.group(0))


async def test_gateway_finds_the_covering_manifest_through_the_signed_name_record(hub: Hub, tmp_path: Path) -> None:
    """No --hf-manifest: `publish hf://… --name-publish` wrote the record hf:ORG/REPO; a gateway node that trusts
    the publisher's key looks it up, fetches the manifest from a peer, and serves the commit from the swarm. A
    repository with no record is served through the hub fetch."""
    from tests.swarm.harness import CLI, processes, start_node

    files = {**hub.files, BIG: save({"w": np.random.default_rng(6).integers(0, 255, size=(6 << 20) // 4, dtype=np.int32)})}
    commit = hub.server.add_commit(REPO, files)
    other = hub.server.add_commit(OTHER, model_files(seed=9))
    big_obj = "objects/" + hashlib.sha256(files[BIG]).hexdigest()
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await run_cli(["--data-dir", str(tmp_path / "a"), "keygen", "--out", str(tmp_path / "key")], env)
    pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}

    def swarm() -> tuple[dict[str, int], dict[str, int], str, str, str]:
        with processes() as procs:
            a = start_node(procs, tmp_path, "a", pub, seed=False, env=env)  # the publisher's node
            boot = a.seen[0]["addrs"][0]
            done = subprocess.run([*CLI, "--data-dir", str(tmp_path / "a"), "publish", f"hf://{REPO}@main", "--key",
                                   str(tmp_path / "key"), "--cache-dir", str(tmp_path / "pubcache"), "--out",
                                   str(pub["manifest"]), "--max-piece", "1MiB", "--name-publish", "--json"],
                                  capture_output=True, timeout=120, env=env)
            assert done.returncode == 0, done.stderr.decode()[-3000:]
            b = start_node(procs, tmp_path, "b", pub, bootstrap=[boot], env=env)  # a seed of the manifest
            b.event("complete", 120)
            before = dict(hub.cdn.stats.by_path)
            g = start_node(procs, tmp_path, "g", pub, seed=False, bootstrap=[boot],
                           env=clean_env(tmp_path / "gwnode", HF_ENDPOINT=hub.url),
                           extra=["--hf-gateway", "127.0.0.1:0"])  # no --hf-manifest; --trust key.pub
            url = g.event("ready", 10)["hf_gateway"]
            snap = _client(_snapshot_code(REPO), clean_env(tmp_path / "client", HF_ENDPOINT=url))
            during = {k: v - before.get(k, 0) for k, v in hub.cdn.stats.by_path.items()}
            mid = dict(hub.cdn.stats.by_path)
            got_other = _client(_snapshot_code(OTHER), clean_env(tmp_path / "client-other", HF_ENDPOINT=url))
            after = {k: v - mid.get(k, 0) for k, v in hub.cdn.stats.by_path.items()}
            return during, after, snap, got_other, g.stderr_tail(200_000)

    during, after, snap, got_other, log = await trio.to_thread.run_sync(swarm)
    assert Path(snap).name == commit
    for path, data in files.items():
        assert (Path(snap) / path).read_bytes() == data, path
    # Covered through the record: the big file came from the peers, the Hub sent none of it.
    assert during.get(big_obj, 0) == 0, during
    assert f"{REPO}@{commit[:12]} is covered by manifest" in log, log[-3000:]
    assert "file(s) from the swarm" in log
    # The repository with no record: its shards came from the Hub (its CDN), through the gateway's hub fetch.
    assert Path(got_other).name == other
    assert sum(after.values()) >= sum(len(d) for p, d in model_files(seed=9).items() if p.endswith(".safetensors"))
    assert f"hf:{OTHER}: " in log and "no manifest found by name" in log
    blob = tmp_path / "gwnode" / "hf-home" / "hub" / FOLDER / "blobs" / hashlib.sha256(files[BIG]).hexdigest()
    seeded = tmp_path / "gwnode" / "hf-home" / "hub" / FOLDER / ".autoglm-files" / commit / BIG
    assert blob.read_bytes() == files[BIG] and blob.stat().st_ino == seeded.stat().st_ino


async def test_the_revision_call_arms_the_swarm_hold_and_a_partial_download_fetches_only_what_it_asked_for(
        hub: Hub, tmp_path: Path) -> None:
    """The real huggingface_hub at a gateway node whose manifest covers the commit (the Hub its web seed).

    ``snapshot_download(allow_patterns=...)`` resolves the revision (which arms the hold of every file) and
    asks for one file: the armed hold stands down before any request and the node fetches that file only.
    Then a whole ``snapshot_download``: the armed hold goes on as the client's batch, one swarm fetch.
    """
    from tests.swarm.harness import processes, start_node

    files = {**hub.files, BIG: save({"w": np.random.default_rng(7).integers(0, 255, size=(3 << 20) // 4, dtype=np.int32)})}
    commit = hub.server.add_commit(REPO, files)
    env = clean_env(tmp_path, HF_ENDPOINT=hub.url)
    await run_cli(["--data-dir", str(tmp_path / "pub"), "keygen", "--out", str(tmp_path / "key")], env)
    await run_cli(["--data-dir", str(tmp_path / "pub"), "publish", f"hf://{REPO}@main", "--key", str(tmp_path / "key"),
                   "--cache-dir", str(tmp_path / "pubcache"), "--out", str(tmp_path / "m.agm"), "--max-piece", "1MiB",
                   "--json"], env)
    pub = {"manifest": tmp_path / "m.agm", "key": tmp_path / "key.pub"}
    seeded = tmp_path / "gwnode" / "hf-home" / "hub" / FOLDER / ".autoglm-files" / commit

    def run() -> tuple[str, list[str], str, str]:
        with processes() as procs:
            n = start_node(procs, tmp_path, "n", pub, seed=False, env=clean_env(tmp_path / "gwnode", HF_ENDPOINT=hub.url),
                           extra=["--hf-gateway", "127.0.0.1:0", "--hf-manifest", str(pub["manifest"])])
            url = n.event("ready", 10)["hf_gateway"]
            part = _client("from huggingface_hub import snapshot_download\n"
                           f"print(snapshot_download({REPO!r}, allow_patterns=['config.json']))\n",
                           clean_env(tmp_path / "client-part", HF_ENDPOINT=url))
            held = sorted(str(p.relative_to(seeded)) for p in seeded.rglob("*") if p.is_file())
            log_part = n.stderr_tail(1 << 24)
            whole = _client(_snapshot_code(REPO), clean_env(tmp_path / "client", HF_ENDPOINT=url))
            return part, held, log_part, whole + "\n" + n.stderr_tail(1 << 24)

    part, held, log_part, out = await trio.to_thread.run_sync(run)
    whole, log = out.split("\n", 1)
    assert (Path(part) / "config.json").read_bytes() == files["config.json"]
    assert not (Path(part) / BIG).exists()
    assert held == ["config.json"], held  # the node fetched the file asked for, not the manifest's other files
    assert "the armed hold stood down before any request (1 of" in log_part, log_part[-3000:]
    for path, data in files.items():
        assert (Path(whole) / path).read_bytes() == data, path
    # The whole download: the armed hold went on with the client's files (one swarm fetch for all of them).
    assert re.search(r"\d+ file\(s\) from the swarm \(.*the hold armed [\d.]+ s before", log), log[-3000:]
    # holds: the partial download's armed one (stood down) and its own, then the whole download's armed one
    assert log.count("fetch of hf:") == 3, log[-3000:]
