"""serve-mirror: a static HTTP mirror of a model directory (Range, ETag)."""

from __future__ import annotations

import argparse
import functools
import json
import signal
from pathlib import Path

from autoglm.node.errors import ConfigError

from ._common import err_console

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve-mirror", help="serve a directory over HTTP as a mirror (Range, ETag)")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="default 127.0.0.1 and a free port; use 0.0.0.0:PORT to serve a LAN")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a whole request head (default 10)")
    p.add_argument("--idle-timeout", type=float, default=15.0, metavar="S",
                   help="seconds a kept-alive connection may sit idle (default 15)")
    p.add_argument("--send-timeout", type=float, default=30.0, metavar="S",
                   help="seconds each 256 KiB of a response may take to send (default 30)")
    p.add_argument("--max-connections", type=int, default=256, metavar="N",
                   help="clients served at once; more get 503 (default 256)")
    p.set_defaults(func=cmd_serve_mirror)


def cmd_serve_mirror(args: argparse.Namespace) -> int:
    import trio

    from autoglm.node._mirror_server import (  # only this command needs it
        MirrorLimits,
        MirrorStats,
        serve_mirror,
    )

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen {args.listen!r} is not HOST:PORT")
    if not args.dir.is_dir():
        raise ConfigError(f"{args.dir} is not a directory")
    if min(args.header_timeout, args.idle_timeout, args.send_timeout) <= 0 or args.max_connections < 1:
        raise ConfigError("serve-mirror timeouts must be > 0 and --max-connections >= 1")
    limits = MirrorLimits(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                          send_timeout=args.send_timeout, max_connections=args.max_connections)
    stats = MirrorStats()

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                h, p = await nursery.start(
                    functools.partial(serve_mirror, args.dir, host, int(port), stats, limits=limits))
                # The URL line is the readiness signal scripts wait for.
                print(f"http://{h}:{p}/", flush=True)
                err_console.print(f"serving {args.dir} (Ctrl-C to stop)", style="dim")
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    # Last line on stdout: what this mirror served (origin egress for demos and benchmarks).
    print(json.dumps({"event": "mirror-stats", "requests": stats.requests, "body_bytes": stats.body_bytes}), flush=True)
    return 0
