"""`join --metrics`: real nodes, a real mirror, scraped over HTTP and parsed with prometheus_client.

A seed node fetches a model from a serve-mirror process, a second node then
fetches it from the seed; both are scraped while they run and after, and the
numbers must match what happened: the model's size in bytes, its piece count,
the source kind that delivered them, the bytes the seed uploaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from swarm.harness import CLI, Proc, processes, publish, start_mirror, start_node

from autoglm.protocol import decode_signed_manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docs" / "deploy" / "grafana-dashboard.json"
MODEL = "demo/m@1"


@pytest.fixture(scope="module")
def pub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return publish(tmp_path_factory.mktemp("published"), size="3MiB", piece="256KiB")


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (sample name, sorted labels) -> value."""
    status, body = _get(url)
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _model_size(model: Path) -> int:
    return sum(p.stat().st_size for p in model.rglob("*") if p.is_file())


def _metrics_url(node: Proc) -> str:
    url = node.seen[0]["metrics"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url
    return str(url)


def test_scrape_matches_the_fetch_and_health_follows_the_swarm(tmp_path: Path, pub: dict[str, Path]) -> None:
    size = _model_size(pub["model"])
    pieces = decode_signed_manifest(pub["manifest"].read_bytes()).manifest.piece_count
    with processes() as procs:
        mirror = start_mirror(procs, tmp_path, pub["model"])
        seed = start_node(procs, tmp_path, "seed", pub, mirrors=[mirror], extra=["--metrics", "127.0.0.1:0"])
        seed_url = _metrics_url(seed)
        during = scrape(seed_url)  # while the fetch runs (or just after): it parses, peers and DHT are there
        assert value(during, "autoglm_peers_connected") == 0
        seed.event("complete", 90)
        after = scrape(seed_url)
        assert value(after, "autoglm_fetched_bytes_total", source="mirror", model=MODEL) == size
        assert value(after, "autoglm_pieces_verified_total", source="mirror", model=MODEL) == pieces
        assert value(after, "autoglm_fetched_bytes_total", source="peer", model=MODEL) == 0
        assert value(after, "autoglm_source_failures_total", source="mirror", model=MODEL, reason="integrity") == 0
        assert value(after, "autoglm_fetches_done_total", model=MODEL) == 1
        assert value(after, "autoglm_store_verified_bytes", model=MODEL) == size
        assert value(after, "autoglm_mirror_errors_total", mirror=mirror.rstrip("/") + "/") == 0
        assert value(after, "autoglm_disk_free_bytes") > 0
        # A lone node: no peers, an empty DHT -> degraded, and /healthz says why with a 503.
        status, body = _get(seed_url.replace("/metrics", "/healthz"))
        assert status == 503
        assert "DHT routing table empty" in json.loads(body)["reasons"]
        assert _get(seed_url.replace("/metrics", "/livez"))[0] == 200

        leech = start_node(procs, tmp_path, "leech", pub, bootstrap=[seed.seen[0]["addrs"][0]],
                           extra=["--metrics", "127.0.0.1:0", "--down-rate", "2MiB"])
        leech_url = _metrics_url(leech)
        leech.event("fetch-started", 60)
        mid = scrape(leech_url)  # during the fetch (2 MiB/s for 3 MiB): the model's series exist, counts so far
        assert value(mid, "autoglm_model_size_bytes", model=MODEL) == size
        assert 0 <= value(mid, "autoglm_fetched_bytes_total", source="peer", model=MODEL) <= size
        leech.event("complete", 90)
        got = scrape(leech_url)
        assert value(got, "autoglm_fetched_bytes_total", source="peer", model=MODEL) == size
        assert value(got, "autoglm_pieces_verified_total", source="peer", model=MODEL) == pieces
        assert value(got, "autoglm_peers_connected") >= 1
        assert value(got, "autoglm_dht_routing_table_peers") >= 1
        assert value(got, "autoglm_dht_lookup_duration_seconds_count") >= 1  # the leech looked the model up
        # 3 MiB at 2 MiB/s with a 512 KiB burst: transfers waited about a second in all.
        assert value(got, "autoglm_ratelimit_waits_total", direction="down") >= 1
        assert value(got, "autoglm_ratelimit_wait_seconds_total", direction="down") > 0.5
        assert value(got, "autoglm_ratelimit_waits_total", direction="up") == 0
        seed_now = scrape(seed_url)
        assert value(seed_now, "autoglm_peer_sent_bytes_total") >= size
        assert value(seed_now, "autoglm_peers_connected") >= 1
        # Cardinality: no label value carries a peer id.
        for _name, labels in got:
            for _k, v in labels:
                assert leech.seen[0]["peer_id"] not in v and seed.seen[0]["peer_id"] not in v
        status, body = _get(leech_url.replace("/metrics", "/healthz"))
        assert status == 200, body
        assert json.loads(body)["status"] == "ready"
        # `status --json` reports the same health.
        st = subprocess.run([*CLI, "--data-dir", str(tmp_path / "leech"), "status", "--json"],
                            capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(st.stdout)["health"]["status"] == "ready"

        # Every metric the dashboard plots exists in a scrape of a node that fetched from a mirror and a peer.
        names = {n for n, _ in after} | {n for n, _ in got} | {n for n, _ in seed_now}
        # Labelled counters with no sample yet (sandbox verdicts: this node ran no gate) are declared families;
        # the gateway's collector exists only with --hf-gateway (scraped live in tests/hub/test_gateway_swarm.py).
        names |= declared_families(leech_url) | _gateway_sample_names()
        for expr in _dashboard_exprs():
            for metric in re.findall(r"\bautoglm_[a-z_]+", expr):
                assert metric in names, f"dashboard uses {metric}, which no scrape has"


def declared_families(url: str) -> set[str]:
    """Sample names every family of a scrape declares, whether or not it has samples yet."""
    status, body = _get(url)
    assert status == 200
    out = set()
    for fam in text_string_to_metric_families(body.decode()):
        out |= {fam.name, f"{fam.name}_total"} if fam.type == "counter" else {fam.name}
    return out


def _gateway_sample_names() -> set[str]:
    from types import SimpleNamespace

    from autoglm.node._metrics import _GatewayCollector

    stats = SimpleNamespace(served_by_via={"swarm": 1}, requests=1, flights=1, flights_failed=0, clients=0,
                            refused_clients=0)
    return {s.name for fam in _GatewayCollector(stats).collect() for s in fam.samples}


def _dashboard_exprs() -> list[str]:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    return exprs


def test_metrics_address_from_the_config_file_and_bad_address(tmp_path: Path, pub: dict[str, Path]) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('[network]\nmetrics = "127.0.0.1:0"\n')
    with processes() as procs:
        node = start_node(procs, tmp_path, "n", pub, seed=False, env={"AUTOGLM_NODE_CONFIG": str(conf)})
        url = _metrics_url(node)
        assert value(scrape(url), "autoglm_peers_connected") == 0
    bad = subprocess.run([*CLI, "--data-dir", str(tmp_path / "b"), "join", "--metrics", "127.0.0.1:http"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2, bad.stderr
    assert "--metrics" in bad.stderr
