"""Fleet roll-out benchmark (issue #14 §4): N nodes follow a name; v2 is published; then rolled back.

Network (created here, removed at the end, also on Ctrl-C/SIGTERM), as in
bench/swarm_bench.py but with this benchmark's own namespace names:

    netns versionsm<id>  nginx on 10.200.0.1:8080, egress capped (htb) at --cap-mib MiB/s aggregate
    netns versionsc<id>  the publisher's node P and N `join --follow NAME` nodes

The mirror serves the latest files at one URL (like a Hub branch): publishing
v2 replaces the mirror's files (hard link + rename) and then runs
`name-publish v2.agm` on P. Every follower joins through P, with the mirror
as its only HTTP source.

Measured, in one run:
  v1        N followers start; time until every `current` is v1; mirror bytes ÷ model size
  v2        `name-publish v2`: time until every `current` is v2;
            mirror bytes ÷ changed bytes (pieces of v2 whose hash v1 lacks; goal ≤ 1.05×)
  roll-back `name-publish v1` with a higher seq: time until every `current` is v1 again;
            mirror bytes (goal 0) and peer bytes (0: v1 is a kept version)

    sudo .venv/bin/python bench/rollout_bench.py [--n 8] [--size 256MiB] [--changed 6] [--max-piece 8MiB] [--preheat] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
    DEFAULT_WORKDIR,
    PROCS,
    CappedNet,
    MiB,
    _parse_size,
    autoglm_cmd,
    check_tools,
    fmt_bytes,
    guarded,
    log,
    netns_prefix,
    on_cleanup,
    print_table,
    start_mirror,
)
from swarm_bench import MIRROR_IP, JsonNode, _verbose_flag

NAME = "bench/rollout"
TENSOR = 4 * MiB


def make_versions(base: Path, size: int, changed: int) -> dict[str, Any]:
    """v1: size/4MiB float32 tensors in one safetensors file; v2: ``changed`` of them rewritten."""
    import numpy as np
    from safetensors.numpy import save_file

    n = max(2, size // TENSOR)
    rng = np.random.default_rng(14)
    t1 = {f"layer.{i:03d}.weight": rng.standard_normal((256, TENSOR // 1024), dtype=np.float32) for i in range(n)}
    pick = sorted(rng.choice(n, size=min(changed, n), replace=False).tolist())
    t2 = dict(t1)
    for i in pick:
        t2[f"layer.{i:03d}.weight"] = (t1[f"layer.{i:03d}.weight"] * np.float32(1.001)).astype(np.float32)
    out: dict[str, Any] = {"tensors": n, "changed_tensors": pick}
    for v, ts in (("1", t1), ("2", t2)):
        d = base / f"src-v{v}"
        d.mkdir(parents=True, exist_ok=True)
        save_file(ts, str(d / "model.safetensors"))
        os.chmod(d / "model.safetensors", 0o644)  # safetensors writes 0600; nginx's workers must read it
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "version": 1}))  # same in both
        out[f"src{v}"] = d
    return out


def cli_run(*args: str, netns: str | None = None, timeout: float = 600) -> str:
    r = subprocess.run(netns_prefix(netns) + autoglm_cmd() + list(args), capture_output=True, text=True,
                       timeout=timeout, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"autoglm-node {' '.join(args[:3])}: {r.stderr.strip()[-800:]}")
    return r.stdout


def changed_bytes(m_new: Path, m_old: Path) -> int:
    from autoglm.protocol import decode_signed_manifest

    new = decode_signed_manifest(m_new.read_bytes()).manifest
    old = decode_signed_manifest(m_old.read_bytes()).manifest
    have = {p.hash for f in old.files for p in f.pieces}
    return sum(p.length for f in new.files for p in f.pieces if p.hash not in have)


def serve_files(src: Path, mirror_dir: Path) -> None:
    """Make the mirror serve ``src``'s files: each one hard-linked under a temp name, then renamed over."""
    for f in src.iterdir():
        tmp = mirror_dir / f".{f.name}.tmp"
        tmp.unlink(missing_ok=True)
        os.link(f, tmp)
        os.replace(tmp, mirror_dir / f.name)


def current_of(data: Path) -> str | None:
    try:
        return os.readlink(data / "models" / NAME.replace("/", "_") / "current").rsplit("/", 1)[-1]
    except OSError:
        return None


def wait_all(datas: list[Path], want: str, t0: float, limit: float, nodes: list[JsonNode]) -> list[float | None]:
    """Seconds from ``t0`` until each follower's ``current`` names ``want`` (None: not within ``limit``)."""
    done: list[float | None] = [None] * len(datas)
    while time.perf_counter() - t0 < limit and None in done:
        for i, d in enumerate(datas):
            if done[i] is None and current_of(d) == want:
                done[i] = time.perf_counter() - t0
        for x in nodes:
            if x.proc.poll() is not None:
                raise RuntimeError(f"a node exited: {x.last_line()}")
        time.sleep(0.05)
    return done


def peer_bytes(datas: list[Path], netns: str, mid: str, per_follower: list[int] | None = None) -> dict[str, int]:
    """Bytes each kind of source delivered for manifest ``mid``, summed over the followers (control API status).

    ``per_follower`` (if given) gets each follower's mirror bytes, in order.
    """
    total: dict[str, int] = {}
    for d in datas:
        st = json.loads(cli_run("--data-dir", str(d), "status", "--json", netns=netns, timeout=60))
        mine = 0
        for k, v in (st.get("models", {}).get(mid, {}).get("bytes_by_source") or {}).items():
            kind = k.split(":", 1)[0]
            total[kind] = total.get(kind, 0) + int(v)
            mine += int(v) if kind == "mirror" else 0
        if per_follower is not None:
            per_follower.append(mine)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--n", type=int, default=8, help="followers (default 8)")
    ap.add_argument("--size", default="256MiB", help="model size (default 256MiB)")
    ap.add_argument("--changed", type=int, default=6, help="tensors (4 MiB each) that v2 changes (default 6)")
    ap.add_argument("--cap-mib", type=float, default=50.0, help="aggregate mirror egress cap, MiB/s (default 50)")
    ap.add_argument("--max-piece", default="8MiB", help="publish --max-piece (default 8MiB, the CLI's default)")
    ap.add_argument("--preheat", action="store_true",
                    help="`name-publish --preheat`: the publisher's node fetches each version from the mirror before "
                         "the name moves (Dragonfly's preheat); the followers then find every piece at a peer")
    ap.add_argument("--follow-interval", type=float, default=60.0, help="followers' longest poll wait (default 60)")
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("rollout_bench needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    tools = check_tools(["nginx", "ip", "tc", "ss"])
    if any(not v for v in tools.values()):
        print(f"missing: {', '.join(k for k, v in tools.items() if not v)}", file=sys.stderr)
        return 2
    run_dir = args.workdir / f"rollout-run-{os.getpid()}"
    cap = int(args.cap_mib * MiB)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv}
    with guarded():
        on_cleanup(lambda: shutil.rmtree(run_dir, ignore_errors=True))
        run_dir.mkdir(parents=True)
        models = make_versions(run_dir / "models", _parse_size(args.size), args.changed)
        key = run_dir / "pub.key"
        cli_run("--data-dir", str(run_dir / "pubhome"), "keygen", "--out", str(key))
        pub = Path(str(key) + ".pub")
        ms = {}
        for v in ("1", "2"):
            ms[v] = run_dir / f"v{v}.agm"
            cli_run("--data-dir", str(run_dir / "pubhome"), "publish", str(models[f"src{v}"]), "--key", str(key),
                    "--name", NAME, "--version", v, "--out", str(ms[v]), "--max-piece", args.max_piece)
        from autoglm.node._versions import version_dirname
        from autoglm.protocol import decode_signed_manifest

        ids = {v: decode_signed_manifest(ms[v].read_bytes()) for v in ms}
        dirs = {v: version_dirname(v, ids[v].id) for v in ms}
        size = sum(f.size for f in ids["1"].manifest.files)
        delta = changed_bytes(ms["2"], ms["1"])
        mirror_dir = run_dir / "mirror"
        mirror_dir.mkdir()
        serve_files(models["src1"], mirror_dir)

        tag = f"{os.getpid() % 100000}"
        net = CappedNet(cap, f"versionsm{tag}", f"versionsc{tag}").up()
        mirror = start_mirror(mirror_dir, run_dir / "nginx", net.mirror_ns, net.mirror_ip)
        mirror_url = f"http://{MIRROR_IP}:{mirror.port}/"
        cli = autoglm_cmd()
        log(f"model {fmt_bytes(size)} ({models['tensors']} tensors), v2 changes {len(models['changed_tensors'])} "
            f"tensors = {fmt_bytes(delta)} of pieces (max piece {args.max_piece}); cap {args.cap_mib:g} MiB/s; {args.n} followers")
        nodes: list[JsonNode] = []
        try:
            p = JsonNode(cli + _verbose_flag() + ["--data-dir", str(run_dir / "P"), "join", "--json"], net.client_ns)
            nodes.append(p)
            deadline = time.monotonic() + 90
            while p.addr() is None and time.monotonic() < deadline and p.proc.poll() is None:
                p.changed.wait(0.5)
                p.changed.clear()
            boot = p.addr()
            if boot is None:
                raise RuntimeError(f"the publisher's node printed no address: {p.last_line()}")
            pdata = str(run_dir / "P")

            def publish_name(v: str, seq: int) -> None:
                # --preheat: one command; P fetches the version (one copy from the origin) before the name moves
                extra = ["--preheat", str(run_dir / f"P-v{v}"), "--mirror", mirror_url] if args.preheat and seq < 3 else []
                cli_run("--data-dir", pdata, "name-publish", str(ms[v]), "--key", str(key), "--seq", str(seq), *extra,
                        netns=net.client_ns)

            datas = [run_dir / f"f{i}" for i in range(args.n)]
            mark = mirror.mark()
            t0 = time.perf_counter()
            publish_name("1", 1)
            for d in datas:
                nodes.append(JsonNode(cli + _verbose_flag() + ["--data-dir", str(d), "join", "--json", "--bootstrap", boot,
                                             "--mirror", mirror_url, "--trust", str(pub), "--follow", NAME,
                                             "--follow-interval", str(args.follow_interval)], net.client_ns))
            floor = size / cap
            t_v1 = wait_all(datas, dirs["1"], t0, floor * args.n * 3 + 180, nodes)
            served_v1 = mirror.settle(mark)
            log(f"v1 everywhere: {t_v1}; mirror sent {fmt_bytes(served_v1)}")
            rows: dict[str, dict[str, Any]] = {"v1": {"times": t_v1, "mirror": served_v1, "ratio": served_v1 / size}}

            # v2: the mirror's files become v2's, then the name points at v2
            serve_files(models["src2"], mirror_dir)
            mark = mirror.mark()
            t0 = time.perf_counter()
            publish_name("2", 2)
            t_pub = time.perf_counter() - t0
            t_v2 = wait_all(datas, dirs["2"], t0, delta / cap * args.n * 3 + 180, nodes)
            served_v2 = mirror.settle(mark)
            mirror_each: list[int] = []
            by_v2 = peer_bytes(datas, net.client_ns, ids["2"].id.hex(), mirror_each)
            rows["v2"] = {"times": t_v2, "mirror": served_v2, "ratio": served_v2 / delta, "publish_s": t_pub,
                          "by_source": by_v2, "mirror_by_follower": mirror_each}
            log(f"v2 everywhere: {t_v2}; mirror sent {fmt_bytes(served_v2)} = {served_v2 / delta:.3f}× changed; {by_v2}; "
                f"mirror bytes by follower {[fmt_bytes(b) for b in mirror_each]}")

            # roll-back: v1 again with a higher seq (the mirror still serves v2: it is not needed)
            mark = mirror.mark()
            t0 = time.perf_counter()
            publish_name("1", 3)
            t_back = wait_all(datas, dirs["1"], t0, 180, nodes)
            served_back = mirror.settle(mark)
            by_back = peer_bytes(datas, net.client_ns, ids["1"].id.hex())
            rows["rollback"] = {"times": t_back, "mirror": served_back, "by_source_v1_total": by_back}
            log(f"rolled back: {t_back}; mirror sent {served_back} bytes")
        finally:
            for x in nodes:
                PROCS.stop(x.proc, grace=10)
            logs = os.environ.get("AUTOGLM_BENCH_LOGS")
            if logs:
                Path(logs).mkdir(parents=True, exist_ok=True)
                for i, x in enumerate(nodes):
                    (Path(logs) / f"rollout-{'P' if i == 0 else f'f{i - 1}'}.log").write_text("".join(x.lines))
        report.update(size=size, changed_bytes=delta, cap=cap, n=args.n, rows=rows, tensors=models["tensors"],
                      changed_tensors=models["changed_tensors"])

        def last(ts: list[float | None]) -> str:
            return f"{max(t for t in ts if t is not None):.1f} s" if None not in ts else f"{ts.count(None)}/{len(ts)} never switched"

        table = [
            ["v1 (first copy)", last(rows["v1"]["times"]), fmt_bytes(size), fmt_bytes(rows["v1"]["mirror"]),
             f"{rows['v1']['ratio']:.3f}× model", ""],
            ["v2 (changed subset)", last(rows["v2"]["times"]), fmt_bytes(delta), fmt_bytes(rows["v2"]["mirror"]),
             f"{rows['v2']['ratio']:.3f}× changed",
             ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(rows["v2"]["by_source"].items()))],
            ["roll-back to v1", last(rows["rollback"]["times"]), "0 B", fmt_bytes(rows["rollback"]["mirror"]),
             "", "kept version: switch only"],
        ]
        print_table(f"Roll-out: {args.n} followers, {fmt_bytes(size)} model, max piece {args.max_piece}, "
                    f"{'preheat on the publisher node, ' if args.preheat else ''}mirror capped at {args.cap_mib:g} MiB/s",
                    ["step", "all switched", "needed", "mirror sent", "mirror ÷ needed", "v2 bytes by source (all followers)"],
                    table, note="time from `name-publish` (with --preheat it includes the publisher node's fetch; "
                    "v1: from the followers' start) until every follower's current names the version; "
                    "mirror sent = nginx bytes incl. headers")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
            log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
