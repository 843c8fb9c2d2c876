"""libtorrent side of bench/swarm_bench.py. Run ONLY with /usr/bin/python3 (Debian python3-libtorrent).

    /usr/bin/python3 bench/_lt_node.py make --file MODEL_FILE --out T.torrent
    /usr/bin/python3 bench/_lt_node.py run --torrent T.torrent --n 8 --web-seed URL \
        --web-seed-peers all|one --out-dir DIR --timeout 600

`make` writes a v2-only torrent (no trackers, no web seed inside). --web-seed must be a directory URL ending in "/": libtorrent
treats v2 torrents as multi-file and appends the file name. `run` starts N
sessions in this process, listening on --listen-ip (127.0.0.1), with DHT/LSD/UPnP/NAT-PMP and uTP
off, adds the web seed to every peer (all) or to peer 0 only (one), connects the
peers to each other directly with connect_peer, and prints one JSON object:
per-node finish times (all pieces hash-checked), the time until all finished, and
the CPU/RSS of this process.
"""

import argparse
import json
import os
import resource
import sys
import time

import libtorrent as lt


def make(args):
    fs = lt.file_storage()
    lt.add_files(fs, args.file)
    t = lt.create_torrent(fs, args.piece_size, flags=lt.create_torrent.v2_only)
    t.set_creator("autoglm bench")
    lt.set_piece_hashes(t, os.path.dirname(os.path.abspath(args.file)))
    with open(args.out, "wb") as f:
        f.write(lt.bencode(t.generate()))
    print(json.dumps({"torrent": args.out, "piece_size": t.piece_length(), "pieces": t.num_pieces()}))
    return 0


def settings(ip, port):
    return {
        "listen_interfaces": f"{ip}:{port}",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_tcp": True,
        "enable_outgoing_tcp": True,
        "allow_multiple_connections_per_ip": True,
        "ssrf_mitigation": False,
        "alert_mask": 0,
    }


def run(args):
    with open(args.torrent, "rb") as f:
        info = lt.torrent_info(lt.bdecode(f.read()))
    sessions = []
    for i in range(args.n):
        s = lt.session(settings(args.listen_ip, args.base_port + i if args.base_port else 0))
        sessions.append(s)
    ports = [s.listen_port() for s in sessions]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    handles = []
    for i, s in enumerate(sessions):
        p = lt.add_torrent_params()
        p.ti = info
        p.save_path = os.path.join(args.out_dir, f"node{i}")
        os.makedirs(p.save_path, exist_ok=True)
        h = s.add_torrent(p)
        if args.web_seed and (args.web_seed_peers == "all" or i == 0):
            h.add_url_seed(args.web_seed)
        handles.append(h)
    for i, h in enumerate(handles):
        for j in range(args.n):
            if j != i:
                h.connect_peer((args.listen_ip, ports[j]))
    done = [None] * args.n
    deadline = t0 + args.timeout
    while None in done and time.monotonic() < deadline:
        for i, h in enumerate(handles):
            if done[i] is None and h.status().is_seeding:
                done[i] = time.monotonic() - t0
        time.sleep(0.02)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stats = []
    for h in handles:
        st = h.status()
        stats.append({"payload_down": st.total_payload_download, "payload_up": st.total_payload_upload,
                      "progress": st.progress})
    result = {
        "n": args.n,
        "web_seed_peers": args.web_seed_peers,
        "ports": ports,
        "times": done,
        "all_done_s": max(done) if None not in done else None,
        "timed_out": None in done,
        "wall": wall,
        "cpu_user": ru1.ru_utime - ru0.ru_utime,
        "cpu_sys": ru1.ru_stime - ru0.ru_stime,
        "peak_rss": ru1.ru_maxrss * 1024,
        "nodes": stats,
        "libtorrent": lt.__version__,
        "piece_size": info.piece_length(),
    }
    for s in sessions:
        for h in s.get_torrents():
            s.remove_torrent(h)
    print(json.dumps(result))
    sys.stdout.flush()
    return 0 if not result["timed_out"] else 1


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--file", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--piece-size", type=int, default=0, help="0 = libtorrent's choice")
    r = sub.add_parser("run")
    r.add_argument("--torrent", required=True)
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--web-seed", default="")
    r.add_argument("--web-seed-peers", choices=["all", "one"], default="all")
    r.add_argument("--out-dir", required=True)
    r.add_argument("--timeout", type=float, default=600)
    r.add_argument("--base-port", type=int, default=0)
    r.add_argument("--listen-ip", default="127.0.0.1",
                   help="listen and peer address (libtorrent binds outgoing connections to it too)")
    args = ap.parse_args()
    return make(args) if args.cmd == "make" else run(args)


if __name__ == "__main__":
    sys.exit(main())
