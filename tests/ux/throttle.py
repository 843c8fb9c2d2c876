"""A TCP relay on 127.0.0.1 that passes the bytes toward the client at a fixed total rate.

``python throttle.py UPSTREAM_PORT BYTES_PER_SECOND`` prints ``http://127.0.0.1:PORT/``
when it listens. Put in front of a real ``serve-mirror``, it makes a slow mirror
(every connection shares one token bucket, like a link), so a fetch lasts long
enough to watch its progress.
"""

from __future__ import annotations

import sys

import trio

from autoglm.node._ratelimit import RateLimiter

CHUNK = 16 << 10


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, limit: RateLimiter | None) -> None:
    try:
        while data := await src.receive_some(CHUNK):
            if limit is not None:
                await limit.acquire(len(data))
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await dst.aclose()


async def serve_relay(upstream: int, rate: float, port: int = 0, *,
                      task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Relay 127.0.0.1:``port`` to ``upstream`` until cancelled; reports the port it listens on."""
    limit = RateLimiter(rate, burst=64 << 10)

    async def relay(client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream("127.0.0.1", upstream)
        except OSError:
            await client.aclose()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, server, None)
            nursery.start_soon(_pipe, server, client, limit)

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay, listeners)


async def main(upstream: int, rate: float) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_relay, upstream, rate)
        print(f"http://127.0.0.1:{port}/", flush=True)


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), float(sys.argv[2]))
