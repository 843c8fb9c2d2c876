"""Hub benchmark (issue #10): `fetch hf://` against huggingface_hub and aria2c, on a Hub-shaped nginx.

A 1 GiB repository (two safetensors shards and small files) is laid out for
nginx so that it answers what huggingface_hub calls: the revision and tree API
(static JSON), ``/{repo}/resolve/{commit}/{path}`` (small files directly with
``X-Repo-Commit`` and ``X-Linked-Etag``; shards as 302 to a CDN path on
``localhost``, another host name, with ``X-Linked-Etag``/``X-Linked-Size``).
All rows in one run, tools alternating, median of --reps:

  (a) throughput: `autoglm-node fetch hf://` (HF cache), `snapshot_download`
      (huggingface_hub, default settings), aria2c given the file URLs
      (-x16 -s16 -j5, as hfd.sh does with more connections);
      hf_transfer: huggingface_hub 2.x ignores it (reported, not run);
  (b) SIGKILL once nginx has served 50 % of the repository, then the same
      command again: bytes nginx served in both runs minus the repository size;
  (c) nginx answers 20 % of requests 429 (Retry-After: 1) or 502: does the
      tool complete, in how long, are the bytes right;
  (d) the gateway (`join --hf-gateway`): 1 and 4 `snapshot_download` clients
      through one gateway (cold: fresh node, fresh cache) against 4 clients
      straight at nginx: wall time of the last client, origin egress (bytes
      nginx served);
  (e) the gateway served from the swarm (root: network namespaces and tc): the
      upstream nginx in its own namespace, its egress capped (htb, --cap,
      default 50 MiB/s); 4 `hf download` clients, each at its own node of a
      4-node swarm (`join --hf-gateway --hf-manifest`, the manifest made by
      `publish hf://`), against 1 and 4 clients straight at the capped
      upstream: wall of the last client, origin egress (and what the upstream
      sent twice, from its access log; each node's CPU); --e-rows picks rows,
      --e-compare CHECKOUT runs another checkout's nodes in the swarm row too,
      alternating with ours (before/after under the same load);
      AUTOGLM_BENCH_PYSPY=DIR samples every node with py-spy (speedscope files;
      py-spy is a profiling tool to pip-install by hand, not a dependency);
  (f) the gateway's serving cost: a gateway that already holds the repository
      serves its shards to 4 curl clients at once: the node's CPU seconds per
      GiB served.

    .venv/bin/python bench/hub_bench.py [--reps 3] [--size 1GiB] [--parts abcdef] [--cap 50MiB] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DEFAULT_WORKDIR,
    PROCS,
    Nginx,
    Result,
    _parse_size,
    autoglm_cmd,
    check_tools,
    fmt_bytes,
    fmt_num,
    guarded,
    log,
    measure,
    measure_many,
    median,
    netns_prefix,
    on_cleanup,
    print_table,
    start_mirror,
)
from _harness import CappedNet as _CappedNet

ORG_REPO = "bench/hub-1g"
TIMEOUT = 900.0
SMALL = {
    "config.json": json.dumps({"model_type": "bench", "hidden_size": 4096}, indent=1).encode(),
    "tokenizer.json": json.dumps({"vocab": {f"tok{i}": i for i in range(20000)}}).encode(),
    "generation_config.json": b'{"do_sample": false}\n',
    "README.md": b"# hub benchmark repository\n",
}

HUB_CONF = """\
daemon off;
master_process on;
worker_processes 2;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format agbench '$status $bytes_sent $body_bytes_sent "$request" "$http_range" $connection $remote_port $request_time';
    access_log {dir}/access.log agbench;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    keepalive_timeout 60s;
    split_clients "${{request_id}}" $hubfault {{
        {fault_split}
        * ok;
    }}
    server {{
        listen {listen}:{port} reuseport backlog=4096;
        server_name _;
        root {root};
{locations}
    }}
}}
"""

FAULT = """            if ($hubfault = 429) { add_header Retry-After 1 always; return 429; }
            if ($hubfault = 502) { return 502; }
"""


class HubNginx(Nginx):
    """nginx with the Hub-shaped locations (and, with ``faults``, 20 % of answers 429/502)."""

    def __init__(self, root: Path, confdir: Path, locations: str, faults: bool, *, listen: str = "127.0.0.1",
                 netns: str | None = None) -> None:
        super().__init__(root, confdir, listen=listen, netns=netns)
        self.locations = locations
        self.faults = faults

    def start(self, timeout: float = 10) -> HubNginx:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "tmp").mkdir(exist_ok=True)
        self.access_log.touch()
        split = "10% 429; 10% 502;" if self.faults else ""
        locs = self.locations.replace("@FAULT@", FAULT if self.faults else "").replace("@PORT@", str(self.port))
        # the CDN on another host name than the API (localhost), or, in a namespace, the same address
        locs = locs.replace("@CDNHOST@", CDN_IP if self.netns else "localhost")
        conf = self.dir / "nginx.conf"
        listen = self.listen if not self.netns else f"{self.listen}:{self.port};\n        listen {CDN_IP}"
        conf.write_text(HUB_CONF.format(dir=self.dir, listen=listen, port=self.port, root=self.root,
                                        fault_split=split, locations=locs))
        self.proc = PROCS.start(netns_prefix(self.netns) + [exe, "-p", str(self.dir), "-e", str(self.dir / "error.log"),
                                                            "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        on_cleanup(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {err.strip()}")
            if self._listening():
                return self
            time.sleep(0.05)
        raise RuntimeError("nginx did not start")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_shard(path: Path, size: int, seed: bytes) -> str:
    """A valid safetensors file of ``size`` bytes (one U8 tensor), pseudo-random; returns its SHA-256."""
    header = b""
    for _ in range(3):  # the header length depends on the tensor length, which depends on the header length
        n = size - 8 - len(header)
        header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
        header += b" " * (-len(header) % 8)
    n = size - 8 - len(header)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        head = len(header).to_bytes(8, "little") + header
        f.write(head)
        h.update(head)
        block = hashlib.blake2b(seed, digest_size=64).digest() * (1 << 14)  # 1 MiB pattern
        rng = hashlib.sha256(seed)
        left = n
        while left:
            rng.update(b"x")
            # vary each MiB so no two pieces have the same bytes
            chunk = (rng.digest() + block[32:])[: min(left, len(block))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def make_repo(base: Path, total: int) -> dict[str, Any]:
    """The repository on disk for nginx, reused when already there. Returns its description."""
    stamp = base / f"repo-{total}.json"
    root = base / f"hubroot-{total}"
    if stamp.exists():
        return json.loads(stamp.read_text())
    shutil.rmtree(root, ignore_errors=True)
    objects = root / "objects"
    objects.mkdir(parents=True)
    files: dict[str, dict[str, Any]] = {}
    small_total = sum(len(v) for v in SMALL.values())
    shard = (total - small_total) // 2
    weight_map = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        tmp = objects / f"tmp-{i}"
        log(f"writing {name} ({fmt_bytes(shard)})")
        sha = _write_shard(tmp, shard, name.encode())
        tmp.rename(objects / sha)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {shard}\n".encode()
        files[name] = {"size": shard, "sha256": sha, "oid": git_blob_id(pointer)}
        weight_map[f"w{i}"] = name
    small = dict(SMALL)
    small["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": 2 * shard}, "weight_map": weight_map}).encode()
    for name, data in small.items():
        oid = git_blob_id(data)
        (objects / oid).write_bytes(data)
        files[name] = {"size": len(data), "sha256": None, "oid": oid}
    commit = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()
    api = root / "api" / "models" / ORG_REPO
    (api / "revision").mkdir(parents=True)
    (api / "tree").mkdir(parents=True)
    (api / "revision" / "main").write_text(json.dumps({
        "id": ORG_REPO, "modelId": ORG_REPO, "sha": commit, "private": False, "gated": False, "disabled": False,
        "downloads": 0, "likes": 0, "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)],
        "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z"}))
    tree = []
    for p, f in sorted(files.items()):
        e: dict[str, Any] = {"type": "file", "oid": f["oid"], "size": f["size"], "path": p}
        if f["sha256"]:
            e["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}
        tree.append(e)
    (api / "tree" / commit).write_text(json.dumps(tree))
    desc = {"root": str(root), "commit": commit, "files": files, "total": sum(f["size"] for f in files.values())}
    stamp.write_text(json.dumps(desc))
    return desc


def locations(desc: dict[str, Any]) -> str:
    root, commit = desc["root"], desc["commit"]
    out = [f"""        location /api/ {{
            default_type application/json;
@FAULT@        }}
        location /cdn/ {{
            alias {root}/objects/;
@FAULT@        }}"""]
    for p, f in desc["files"].items():
        loc = f"/{ORG_REPO}/resolve/{commit}/{p}"
        if f["sha256"]:
            out.append(f"""        location = {loc} {{
@FAULT@            add_header X-Repo-Commit {commit} always;
            add_header X-Linked-Etag '"{f['sha256']}"' always;
            add_header X-Linked-Size {f['size']} always;
            return 302 http://@CDNHOST@:@PORT@/cdn/{f['sha256']};
        }}""")
        else:
            out.append(f"""        location = {loc} {{
@FAULT@            add_header X-Repo-Commit {commit} always;
            add_header X-Linked-Etag '"{f['oid']}"' always;
            alias {root}/objects/{f['oid']};
        }}""")
    return "\n".join(out)


class Tools:
    def __init__(self, work: Path, desc: dict[str, Any]) -> None:
        self.work = work
        self.desc = desc
        self.n = 0

    def fresh(self, tool: str) -> Path:
        self.n += 1
        d = self.work / "runs" / f"{tool}-{self.n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def env(self, url: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=url.rstrip("/"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(self.work / "hf-home"))
        return env

    def argv(self, tool: str, d: Path, url: str) -> list[str]:
        if tool == "autoglm":
            return autoglm_cmd() + ["--data-dir", str(d / "data"), "fetch", f"hf://{ORG_REPO}", "--cache-dir", str(d / "cache"), "--json"]
        if tool == "snapshot_download":
            code = f"from huggingface_hub import snapshot_download; snapshot_download({ORG_REPO!r}, cache_dir={str(d / 'cache')!r})"
            return [sys.executable, "-c", code]
        # aria2c given the resolve URLs, as hfd.sh does (it lists them from the API first)
        lst = d / "urls.txt"
        if not lst.exists():
            lines = []
            for p in self.desc["files"]:
                lines += [f"{url.rstrip('/')}/{ORG_REPO}/resolve/{self.desc['commit']}/{p}", f"  out={p}"]
            lst.write_text("\n".join(lines) + "\n")
        return ["aria2c", "-x16", "-s16", "-j5", "-c", "--file-allocation=none", "--console-log-level=error",
                "--summary-interval=0", "--auto-file-renaming=false", "--max-tries=20", "--retry-wait=1", "-d", str(d / "out"), "-i", str(lst)]

    def correct(self, tool: str, d: Path) -> bool:
        """Every file's bytes match the repository (SHA-256 or git blob id)."""
        if tool == "aria2c":
            base = d / "out"
        else:
            base = d / "cache" / f"models--{ORG_REPO.replace('/', '--')}" / "snapshots" / self.desc["commit"]
        for p, f in self.desc["files"].items():
            path = base / p
            if not path.exists() or path.stat().st_size != f["size"]:
                return False
            if f["sha256"]:
                h = hashlib.sha256()
                with open(path, "rb") as fh:
                    while chunk := fh.read(8 << 20):
                        h.update(chunk)
                if h.hexdigest() != f["sha256"]:
                    return False
            elif git_blob_id(path.read_bytes()) != f["oid"]:
                return False
        return True


def run_once(tools: Tools, tool: str, ngx: HubNginx, *, kill_at: float | None = None, d: Path | None = None,
             conns: list[int] | None = None) -> tuple[Result, Path, int]:
    """One run; with ``kill_at``, SIGKILL once nginx served that fraction (``conns`` gets the open connections then)."""
    d = d or tools.fresh(tool)
    mark = ngx.mark()
    total = tools.desc["total"]

    def kill_when() -> bool:
        assert kill_at is not None
        if ngx.served_so_far(mark) < kill_at * total:
            return False
        if conns is not None:
            conns.append(ngx.open_connections())
        return True

    r = measure(tools.argv(tool, d, ngx.url()), timeout=TIMEOUT, env=tools.env(ngx.url()),
                kill_when=kill_when if kill_at is not None else None, poll=0.01)
    served = ngx.settle(mark)
    return r, d, served


class GatewayNode:
    """A cold `autoglm-node join --hf-gateway 127.0.0.1:0` in front of ``upstream``, with its own data dir and HF cache."""

    def __init__(self, work: Path, upstream: str, n: int, extra: list[str] | None = None, netns: str | None = None,
                 cmd: list[str] | None = None) -> None:
        self.dir = work / "runs" / f"gateway-{n}"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
        env.update(HF_ENDPOINT=upstream.rstrip("/"), HF_HOME=str(self.dir / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
        verbose = ["-v"] if netns else []  # (e) counts the swarm fetches in the log
        self.proc = PROCS.start(netns_prefix(netns) + (cmd or autoglm_cmd()) + [*verbose, "--data-dir", str(self.dir / "data"), "join", "--json",
                                                                      "--hf-gateway", "127.0.0.1:0", *(extra or [])],
                                stdout=subprocess.PIPE, stderr=open(self.dir / "stderr", "wb"), env=env)
        assert self.proc.stdout is not None
        self.url = ""
        self.addrs: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            if ev.get("event") == "ready":
                self.url = ev["hf_gateway"]
                self.addrs = ev.get("addrs", [])
                break
        if not self.url:
            raise RuntimeError(f"the gateway did not start: {(self.dir / 'stderr').read_text()[-2000:]}")

    def profile(self, out: Path) -> None:
        """Sample the node with py-spy (AUTOGLM_BENCH_PYSPY) until it exits: a speedscope profile at ``out``."""
        spy = Path(sys.executable).with_name("py-spy")
        self.spy = PROCS.start([str(spy), "record", "--pid", str(self.proc.pid), "--rate", "200", "--nonblocking",
                                "--format", "speedscope", "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cpu(self) -> float:
        """CPU seconds (user + system) the node process used so far (``ip netns exec`` execs, so the pid is the node's)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, keep: bool = False) -> None:
        self.cpu_at_stop = self.cpu()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        spy = getattr(self, "spy", None)
        if spy is not None:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            PROCS.forget(spy)
        self.stderr_text = (self.dir / "stderr").read_text(errors="replace")
        self.stderr_tail = self.stderr_text[-3000:]
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- (e) the gateway served from the swarm, upstream capped ---------------------------

UP_IP, NODE_IP, CDN_IP = "10.201.0.1", "10.201.0.2", "10.201.0.3"  # the CDN: another address, as the Hub's is another host


class CappedNet(_CappedNet):
    """Namespace gatewayu<tag> (the upstream nginx, egress capped by htb; the CDN's address too) and gatewayn<tag>
    (nodes, clients)."""

    def __init__(self, cap_bytes: int, tag: str) -> None:
        super().__init__(cap_bytes, f"gatewayu{tag}", f"gatewayn{tag}", mirror_ips=(UP_IP, CDN_IP), client_ip=NODE_IP,
                         prefix=29)
        self.up_ns, self.node_ns = self.mirror_ns, self.client_ns


def _hf_download(d: Path, url: str) -> list[str]:
    """`hf download ORG/REPO` (the CLI users type) into ``d/cache``, its HF_ENDPOINT ``url``."""
    return ["env", f"HF_ENDPOINT={url.rstrip('/')}", str(Path(sys.executable).with_name("hf")), "download", ORG_REPO,
            "--cache-dir", str(d / "cache")]


def _publish(tools: Tools, local: HubNginx, net: CappedNet, up_url: str) -> tuple[Path, Path]:
    """`publish hf://` naming the capped upstream, its bytes read from a cache filled from ``local`` (uncapped)."""
    d = tools.work / "runs" / "publish"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cli = autoglm_cmd() + ["--data-dir", str(d / "data")]
    for argv, netns, url in (
        (cli + ["keygen", "--out", str(d / "key")], None, local.url()),
        (cli + ["fetch", f"hf://{ORG_REPO}", "--cache-dir", str(d / "cache"), "--json"], None, local.url()),
        (cli + ["publish", f"hf://{ORG_REPO}@main", "--key", str(d / "key"), "--cache-dir", str(d / "cache"),
                "--out", str(d / "m.agm"), "--json"], net.node_ns, up_url),
    ):
        r = subprocess.run(netns_prefix(netns) + argv, env=tools.env(url), capture_output=True, text=True, timeout=TIMEOUT,
                           check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr[-2000:]}")
    return d / "m.agm", d / "key.pub"


def egress_overlap(rows: list[dict[str, Any]], desc: dict[str, Any]) -> dict[str, Any]:
    """What the upstream sent more than once, from its access log: per file, bytes sent minus the bytes covered.

    ``cut`` counts requests whose body ended before the range asked for (the
    client closed the connection: a request cancelled mid-way, its bytes in
    flight wasted); ``dup`` the file bytes sent twice or more, ``where`` the
    largest such ranges.
    """
    import re

    by_path: dict[str, list[tuple[int, int]]] = {}
    cut, cut_bytes, sent = 0, 0, 0
    for r in rows:
        m = re.match(r"GET (\S+) ", r["request"])
        if r["status"] not in (200, 206) or m is None or r["body"] <= 0:
            continue
        path = m.group(1).rsplit("/", 1)[-1]
        start, want = 0, None
        rm = re.match(r"bytes=(\d+)-(\d*)", r["range"] or "")
        if rm:
            start = int(rm.group(1))
            want = int(rm.group(2)) + 1 - start if rm.group(2) else None
        if want is not None and r["body"] < want:
            cut += 1
            cut_bytes += r["body"]
        by_path.setdefault(path, []).append((start, start + r["body"]))
        sent += r["body"]
    dup = 0
    where: list[tuple[int, str, int, int]] = []
    for path, spans in by_path.items():
        bounds = sorted({x for s in spans for x in s})
        for a, b in zip(bounds, bounds[1:], strict=False):
            k = sum(1 for s, e in spans if s <= a and b <= e)
            if k > 1:
                dup += (k - 1) * (b - a)
                where.append(((k - 1) * (b - a), path[:16], a, b))
    where.sort(reverse=True)
    return {"body_bytes": sent, "dup_bytes": dup, "cut_requests": cut, "cut_bytes": cut_bytes,
            "where": [f"{p}… {a}-{b} ({n} B again)" for n, p, a, b in where[:8]]}


def _wait_mesh(nodes: list[GatewayNode], netns: str, limit: float = 30.0) -> float:
    """Seconds until every node has a session with every other (bounded)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        ok = True
        for g in nodes:
            r = subprocess.run(netns_prefix(netns) + autoglm_cmd() + ["--data-dir", str(g.dir / "data"), "status", "--json"],
                               capture_output=True, text=True, timeout=20, check=False)
            try:
                ok = ok and len(json.loads(r.stdout)["peers"]) >= len(nodes) - 1
            except (ValueError, KeyError):
                ok = False
        if ok:
            return time.monotonic() - t0
        time.sleep(0.5)
    return float("nan")


SWARM_ROW = "4 clients, each at its own node of a 4-node swarm (gateway, publish hf:// manifest)"


class Timeline:
    """Samples a swarm row every ``every`` seconds in a thread: what each client has on disk, the bytes the
    nodes' namespace received from the upstream, and how busy the machine's CPUs were (/proc/stat).

    ``summary`` says where the wall went: when the upstream had sent the repository (the swarm's first copy
    done), when each client got its first shard byte and how much each still had to read then, and the CPU's
    busy share before and after that point (idle CPU while clients wait means waiting on the fetch's order;
    saturated CPU means the machine).
    """

    def __init__(self, dirs: list[Path], node_pid: int, total: int, every: float = 0.25) -> None:
        import threading

        self.dirs, self.pid, self.total, self.every = dirs, node_pid, total, every
        self.rows: list[tuple[float, list[int], int, float]] = []  # (t, client bytes, upstream bytes, busy share)
        self._stop = threading.Event()
        self._rx0 = self._rx()
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rx(self) -> int:
        try:
            lines = Path(f"/proc/{self.pid}/net/dev").read_text().splitlines()[2:]
        except OSError:
            return 0
        return sum(int(ln.split(":", 1)[1].split()[0]) for ln in lines if not ln.strip().startswith("lo:"))

    @staticmethod
    def _cpu() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]

    @staticmethod
    def _bytes(d: Path) -> int:
        n = 0
        for root, _, files in os.walk(d):
            for name in files:
                if name.endswith(".safetensors") or ".incomplete" in name or len(name) == 64:
                    try:
                        n += os.lstat(os.path.join(root, name)).st_size
                    except OSError:
                        pass
        return n

    def _run(self) -> None:
        last = self._cpu()
        while not self._stop.wait(self.every):
            now = self._cpu()
            busy = 1 - (now[1] - last[1]) / max(now[0] - last[0], 1)
            last = now
            self.rows.append((time.monotonic() - self.t0, [self._bytes(d) for d in self.dirs], self._rx() - self._rx0, busy))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def summary(self) -> str:
        if not self.rows:
            return "no samples"
        done = next((t for t, _, up, _ in self.rows if up >= self.total), self.rows[-1][0])
        first = [next((t for t, b, _, _ in self.rows if b[i] > (1 << 20)), float("nan")) for i in range(len(self.dirs))]
        at_done = next(b for t, b, _, _ in self.rows if t >= done)
        left = [max(self.total - x, 0) for x in at_done]
        before = [u for t, _, _, u in self.rows if t <= done]
        after = [u for t, _, _, u in self.rows if t > done]
        stalls = []
        for i in range(len(self.dirs)):  # the longest time a client's bytes stood still between its first MiB and the end
            longest, since = 0.0, None
            for t, b, _, _ in self.rows:
                if b[i] >= self.total:
                    break
                if b[i] <= (1 << 20):
                    continue
                if since is None or b[i] != since[1]:
                    since = (t, b[i])
                longest = max(longest, t - since[0])
            stalls.append(round(longest, 1))
        def avg(xs: list[float]) -> str:
            return f"{100 * sum(xs) / len(xs):.0f} %" if xs else "n/a"
        half = [next((round(t, 1) for t, b, _, _ in self.rows if b[i] >= self.total // 2), float("nan")) for i in range(len(self.dirs))]
        return (f"upstream sent the repository {done:.1f} s after the clients started; clients' first MiB at "
                f"{[round(x, 1) for x in first]} s, half at {half} s; left to read then: {[fmt_bytes(x) for x in left]}; "
                f"longest stall per client {stalls} s; CPU busy {avg(before)} until then, {avg(after)} after")


def swarm_gateway_rows(tools: Tools, local: HubNginx, reps: int, cap: int, *, rows: str = "1,4,swarm",
                       compare: Path | None = None) -> tuple[list[list[str]], dict[str, Any]]:
    """(e): 1 and 4 clients straight at the capped upstream; 4 clients each at its own node of a 4-node swarm.

    ``rows`` picks the rows (``1``, ``4``, ``swarm``; the first is always run: the others are compared with it);
    ``compare``: another checkout (with its .venv) whose nodes run the swarm row too, alternating with ours
    in every rep, so that a before/after pair shares the machine's load.
    """
    total = tools.desc["total"]
    net = CappedNet(cap, str(os.getpid() % 100000)).up()
    up = start_mirror(Path(tools.desc["root"]), tools.work / "nginx-capped", net.up_ns, UP_IP, nginx=HubNginx,
                      locations=locations(tools.desc), faults=False)
    manifest, key = _publish(tools, local, net, up.url())
    want = set(rows.split(","))
    ours: list[str] | None = None
    cases: list[tuple[str, int, bool, list[str] | None]] = [
        ("1 client straight at the upstream (one copy through the cap)", 1, False, None)]
    if "4" in want:
        cases.append(("4 clients straight at the upstream", 4, False, None))
    if "swarm" in want:
        if compare is not None:
            cases.append((f"{SWARM_ROW}, {compare.name}", 4, True, [str(compare / ".venv" / "bin" / "autoglm-node")]))
        cases.append((SWARM_ROW, 4, True, ours))
    pyspy = os.environ.get("AUTOGLM_BENCH_PYSPY")
    walls: dict[str, list[float]] = {c[0]: [] for c in cases}
    egress: dict[str, list[int]] = {c[0]: [] for c in cases}
    client_cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    node_cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    errors: dict[str, str] = {}
    holds: list[int] = []
    overlaps: list[dict[str, Any]] = []
    n = 100
    for rep in range(reps):
        for name, clients, via, cmd in cases:
            nodes: list[GatewayNode] = []
            timeline: Timeline | None = None
            extra = ["--hf-manifest", str(manifest), "--trust", str(key)]
            try:
                if via:
                    for _ in range(clients):
                        n += 1
                        boot = ["--bootstrap", nodes[0].addrs[0]] if nodes else []
                        nodes.append(GatewayNode(tools.work, up.url(), n, extra + boot, netns=net.node_ns, cmd=cmd))
                    log(f"(e) mesh of {len(nodes)} nodes in {_wait_mesh(nodes, net.node_ns):.1f}s")
                    if pyspy:
                        Path(pyspy).mkdir(parents=True, exist_ok=True)
                        for g in nodes:
                            g.profile(Path(pyspy) / f"{'base' if cmd else 'ours'}-{rep}-{g.dir.name}.json")
                urls = [g.url for g in nodes] if via else [up.url()] * clients
                dirs = [tools.fresh("hf-download") for _ in range(clients)]
                mark = up.mark()
                timeline = Timeline(dirs, nodes[0].proc.pid, total) if via else None
                results = measure_many([_hf_download(d, u) for d, u in zip(dirs, urls, strict=True)], timeout=TIMEOUT,
                                       env=tools.env(up.url()), netns=net.node_ns)
            finally:
                if via and timeline is not None:
                    timeline.stop()
                    log(f"(e) timeline: {timeline.summary()}")
                for g in nodes:
                    g.stop(keep=True)
            served = up.settle(mark)
            if via:
                ov = egress_overlap(up.requests_since(mark), tools.desc)
                log(f"(e) upstream bodies {fmt_bytes(ov['body_bytes'])}: sent twice {fmt_bytes(ov['dup_bytes'])}, "
                    f"{ov['cut_requests']} requests cut short ({fmt_bytes(ov['cut_bytes'])}); largest repeats: {ov['where']}")
                log(f"(e) node CPU seconds: {[round(g.cpu_at_stop, 1) for g in nodes]}")
                overlaps.append({**ov, "row": name, "node_cpu": [g.cpu_at_stop for g in nodes]})
                node_cpu[name] += [g.cpu_at_stop for g in nodes]
            if via:
                import re

                done = [m.group(1) for g in nodes for m in re.finditer(r"fetch done: \d+ bytes in ([\d.]+) s", g.stderr_text)]
                log(f"(e) swarm fetch done (s after its start) per node: {done}; client CPU seconds: "
                    f"{[round(r.cpu, 1) for r in results]}; client walls: {[round(r.wall, 1) for r in results]}")
                overlaps[-1].update(fetch_done=done, client_cpu=[r.cpu for r in results])
            for g in nodes:
                holds.append(g.stderr_text.count("file(s) from the swarm"))
                if os.environ.get("AUTOGLM_BENCH_LOGS"):
                    keep = tools.work / "logs" / f"{g.dir.name}.stderr"
                    keep.parent.mkdir(exist_ok=True)
                    keep.write_text(g.stderr_text)
                shutil.rmtree(g.dir, ignore_errors=True)
            if via:
                log(f"(e) swarm fetches per node: {holds[-len(nodes):]}")
            ok = all(r.ok for r in results) and all(tools.correct("snapshot_download", d) for d in dirs)
            wall = max(r.wall for r in results)
            log(f"(e) {name} rep {rep + 1}: {wall:.2f}s, origin egress {fmt_bytes(served)}, ok={ok}, "
                f"client CPU {[round(r.cpu, 1) for r in results]}, load {os.getloadavg()[0]:.1f}")
            if ok:
                walls[name].append(wall)
                egress[name].append(served)
                client_cpu[name] += [r.cpu for r in results]
            else:
                bad = next((r for r in results if not r.ok), None)
                errors[name] = bad.error() if bad is not None else "wrong bytes"
                for g in nodes:
                    log(f"(e) node stderr: {g.stderr_tail}")
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
    up.stop()
    net.down()
    one = median(walls[cases[0][0]])
    rows, out = [], {"cap": cap, "swarm_holds_per_node": holds, "overlaps": overlaps}
    for name, clients, _, _ in cases:
        m = median(walls[name])
        e = median([float(x) for x in egress[name]])
        out[name] = {"clients": clients, "walls": walls[name], "egress": egress[name], "median_wall": m,
                     "client_cpu": client_cpu[name], "node_cpu": node_cpu[name]}
        rows.append([name, fmt_num(m, ".2f", " s"), f"{m / one:.2f}x" if m and one else "n/a",
                     fmt_bytes(int(e)) if e else "n/a", f"{e / total:.2f}x" if e else "n/a",
                     ", ".join(f"{w:.1f}" for w in walls[name]), errors.get(name, "")])
    return rows, out


def serving_rows(tools: Tools, ngx: HubNginx, reps: int) -> tuple[list[list[str]], dict[str, Any]]:
    """(f): a gateway that holds the repository serves it to 4 curl clients at once: the node's CPU per GiB served."""
    desc = tools.desc
    shards = [p for p, f in desc["files"].items() if f["sha256"] is not None]
    gw = GatewayNode(tools.work, ngx.url(), 900)
    out: dict[str, Any] = {"walls": [], "cpu_per_gib": []}
    try:
        warm = tools.fresh("hf-download")
        r = measure(_hf_download(warm, gw.url), timeout=TIMEOUT, env=tools.env(gw.url))
        if not (r.ok and tools.correct("snapshot_download", warm)):
            raise RuntimeError(f"(f) warming the gateway failed: {r.error()}")
        shutil.rmtree(warm, ignore_errors=True)
        commit = desc["commit"]
        urls = [f"{gw.url}/{ORG_REPO}/resolve/{commit}/{p}" for p in shards]
        served = 4 * sum(desc["files"][p]["size"] for p in shards)
        for rep in range(reps):
            c0 = gw.cpu()
            curl = ["curl", "-sSf", *[x for u in urls for x in ("-o", "/dev/null", u)]]
            results = measure_many([curl] * 4, timeout=TIMEOUT)
            cpu = gw.cpu() - c0
            wall = max(x.wall for x in results)
            ok = all(x.ok for x in results)
            log(f"(f) rep {rep + 1}: 4 x {fmt_bytes(served // 4)} in {wall:.2f}s, gateway CPU {cpu:.2f}s, ok={ok}")
            if ok:
                out["walls"].append(wall)
                out["cpu_per_gib"].append(cpu / (served / (1 << 30)))
    finally:
        gw.stop()
    m, c = median(out["walls"]), median(out["cpu_per_gib"])
    rows = [["4 curl clients, each reading every shard, from a gateway that holds them", fmt_num(m, ".2f", " s"),
             f"{4 * sum(desc['files'][p]['size'] for p in shards) / m / 1e6:.0f} MB/s" if m else "n/a",
             fmt_num(c, ".2f", " s"), ", ".join(f"{x:.2f}" for x in out["cpu_per_gib"])]]
    return rows, out


def gateway_rows(tools: Tools, ngx: HubNginx, reps: int) -> tuple[list[list[str]], dict[str, Any]]:
    """(d): 4 clients direct, 1 and 4 clients through one cold gateway; median wall, origin egress."""
    total = tools.desc["total"]
    cases = [("4 clients straight at nginx", 4, False), ("1 client through one gateway", 1, True),
             ("4 clients through one gateway", 4, True)]
    walls: dict[str, list[float]] = {c[0]: [] for c in cases}
    egress: dict[str, list[int]] = {c[0]: [] for c in cases}
    client_cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    node_cpu: dict[str, list[float]] = {c[0]: [] for c in cases}
    errors: dict[str, str] = {}
    n = 0
    for rep in range(reps):
        for name, clients, via in cases:
            n += 1
            mark = ngx.mark()
            gw = GatewayNode(tools.work, ngx.url(), n) if via else None
            url = gw.url if gw is not None else ngx.url()
            dirs = [tools.fresh("snapshot_download") for _ in range(clients)]
            try:
                results = measure_many([tools.argv("snapshot_download", d, url) for d in dirs], timeout=TIMEOUT,
                                       env=tools.env(url))
            finally:
                if gw is not None:
                    gw.stop()
            served = ngx.settle(mark)
            ok = all(r.ok for r in results) and all(tools.correct("snapshot_download", d) for d in dirs)
            wall = max(r.wall for r in results)
            log(f"(d) {name} rep {rep + 1}: {wall:.2f}s, origin egress {fmt_bytes(served)}, ok={ok}")
            if ok:
                walls[name].append(wall)
                egress[name].append(served)
            else:
                bad = next((r for r in results if not r.ok), None)
                errors[name] = bad.error() if bad is not None else "wrong bytes"
                if gw is not None:
                    log(f"(d) gateway stderr: {gw.stderr_tail}")
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
    rows, out = [], {}
    for name, clients, _, _ in cases:
        m = median(walls[name])
        e = median([float(x) for x in egress[name]])
        out[name] = {"clients": clients, "walls": walls[name], "egress": egress[name], "median_wall": m,
                     "client_cpu": client_cpu[name], "node_cpu": node_cpu[name]}
        rows.append([name, fmt_num(m, ".2f", " s"), fmt_bytes(int(e)) if e else "n/a",
                     f"{e / total:.2f}x" if e else "n/a", ", ".join(f"{w:.1f}" for w in walls[name]), errors.get(name, "")])
    return rows, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "hub")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--parts", default="abcd", help="which parts to run (default abcd; e needs root)")
    ap.add_argument("--cap", default="50MiB", help="(e): the upstream's egress cap per second (default 50MiB)")
    ap.add_argument("--e-rows", default="1,4,swarm", help="(e): which rows (default 1,4,swarm; the 1-client row always runs)")
    ap.add_argument("--e-compare", type=Path, help="(e): another checkout (with .venv) whose nodes run the swarm row too, "
                                                    "alternating with this one (before/after under the same load)")
    args = ap.parse_args()
    have = check_tools(["nginx", "aria2c"])
    if not have["nginx"]:
        print("nginx is missing: AUTOGLM_BENCH_DEPS=1 scripts/setup (or apt-get install nginx-light aria2)")
        return 2
    tool_names = ["autoglm", "snapshot_download"] + (["aria2c"] if have["aria2c"] else [])
    with guarded():
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
        desc = make_repo(work, _parse_size(args.size))
        total = desc["total"]
        tools = Tools(work, desc)
        out: dict[str, Any] = {"total": total, "throughput": {}, "kill": {}, "faults": {}, "gateway": {}}

        ngx = HubNginx(Path(desc["root"]), work / "nginx", locations(desc), faults=False).start()
        if "d" in args.parts:
            rows, out["gateway"] = gateway_rows(tools, ngx, args.reps)
            print_table(f"(d) the gateway: {fmt_bytes(total)} repository, snapshot_download clients, median of {args.reps}",
                        ["clients", "wall (last client)", "origin egress", "x repository", "walls", "note"], rows,
                        note="cold gateway each time (fresh node and cache); nginx on 127.0.0.1, not rate-capped; "
                             "the 4-node swarm row needs publish hf://")
        if "f" in args.parts:
            rows, out["serving"] = serving_rows(tools, ngx, args.reps)
            print_table(f"(f) the gateway's serving cost: {fmt_bytes(total)} repository held by the node, median of {args.reps}",
                        ["clients", "wall (last client)", "together", "node CPU per GiB served", "each rep"], rows,
                        note="the node's CPU (user + system) while serving, from /proc; curl writes to /dev/null")
        if "e" in args.parts:
            cap = _parse_size(args.cap)
            rows, out["swarm_gateway"] = swarm_gateway_rows(tools, ngx, args.reps, cap, rows=args.e_rows,
                                                            compare=args.e_compare)
            print_table(f"(e) the gateway served from the swarm: {fmt_bytes(total)} repository, upstream capped at "
                        f"{fmt_bytes(cap)}/s, `hf download` clients, median of {args.reps}",
                        ["clients", "wall (last client)", "x one copy", "origin egress", "x repository", "walls", "note"],
                        rows, note="cold nodes each time (fresh data dirs and caches); nodes and clients in one namespace, "
                                   "nginx in another behind htb")
        walls: dict[str, list[float]] = {t: [] for t in tool_names}
        cpus: dict[str, list[float]] = {t: [] for t in tool_names}
        errors: dict[str, str] = {}
        for rep in range(args.reps if "a" in args.parts else 0):
            for t in tool_names:
                r, d, served = run_once(tools, t, ngx)
                log(f"(a) {t} rep {rep + 1}: rc={r.rc} {r.wall:.2f}s served {fmt_bytes(served)}")
                if r.ok and tools.correct(t, d):
                    walls[t].append(r.wall)
                    cpus[t].append(r.cpu)
                else:
                    errors[t] = r.error() if not r.ok else "wrong bytes"
                shutil.rmtree(d, ignore_errors=True)
        rows = []
        for t in tool_names:
            m = median(walls[t])
            out["throughput"][t] = {"walls": walls[t], "cpus": cpus[t], "median": m}
            rows.append([t, fmt_num(m, ".2f", " s"), f"{total / m / 1e6:.0f} MB/s" if m else "n/a",
                         fmt_num(median(cpus[t]), ".2f", " s"), ", ".join(f"{w:.1f}" for w in walls[t]), errors.get(t, "")])
        rows.append(["snapshot_download + hf_transfer", "n/a", "n/a", "n/a", "", "huggingface_hub 2.x no longer uses hf_transfer"])
        if "a" in args.parts:
            print_table(f"(a) {fmt_bytes(total)} repository, nginx on 127.0.0.1, median of {args.reps}",
                        ["tool", "wall", "throughput", "CPU", "walls", "note"], rows)

        rows = []
        for t in tool_names if "b" in args.parts else []:
            conns: list[int] = []
            r1, d, s1 = run_once(tools, t, ngx, kill_at=0.5, conns=conns)
            r2, _, s2 = run_once(tools, t, ngx, d=d)
            ok = r2.ok and tools.correct(t, d)
            refetched = s1 + s2 - total
            out["kill"][t] = {"killed": r1.killed, "served_first": s1, "served_second": s2, "refetched": refetched, "ok": ok,
                              "connections": conns[:1]}
            log(f"(b) {t}: killed={r1.killed} served {fmt_bytes(s1)} + {fmt_bytes(s2)}; ok={ok}")
            rows.append([t, "yes" if r1.killed else f"no (rc {r1.rc})", str(conns[0]) if conns else "?", fmt_bytes(s1), fmt_bytes(s2),
                         fmt_bytes(max(refetched, 0)), "yes" if ok else (r2.error() if not r2.ok else "wrong bytes")])
            shutil.rmtree(d, ignore_errors=True)
        if "b" in args.parts:
            print_table("(b) SIGKILL at 50 % served, then the same command again",
                        ["tool", "killed", "connections at the kill", "served 1st run", "served 2nd run", "fetched again",
                         "complete + correct"], rows,
                        note="fetched again = bytes nginx served in both runs - repository size (headers, and bytes still in "
                             "socket buffers when the process died, included)")
        ngx.stop()

        ngx = HubNginx(Path(desc["root"]), work / "nginx-faults", locations(desc), faults=True).start()
        rows = []
        for t in tool_names if "c" in args.parts else []:
            r, d, served = run_once(tools, t, ngx)
            ok = r.ok and tools.correct(t, d)
            out["faults"][t] = {"rc": r.rc, "wall": r.wall, "ok": ok}
            log(f"(c) {t}: rc={r.rc} {r.wall:.2f}s ok={ok}")
            rows.append([t, "yes" if ok else ("wrong bytes" if r.ok else r.error()), f"{r.wall:.1f} s", fmt_bytes(served)])
            shutil.rmtree(d, ignore_errors=True)
        faults = [q for q in ngx.requests_since(0) if q["status"] in (429, 502)]
        if "c" in args.parts:
            print_table("(c) 20 % of requests answered 429 (Retry-After: 1) or 502",
                        ["tool", "completes, bytes right", "wall", "served"], rows,
                        note=f"{len(faults)} fault answers in this part of the run")
        ngx.stop()
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
