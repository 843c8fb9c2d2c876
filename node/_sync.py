"""Run the node's trio code from wherever the caller is: a plain script, a
notebook (an asyncio loop already runs in the main thread), inside trio, or
under asyncio.

Strategy: trio cannot start inside a thread that already runs an event loop
(``trio.run`` raises, and an asyncio loop would be blocked anyway). So the
synchronous entry points run ``trio.run`` in this thread when no loop runs
here, and in a fresh worker thread (joined before returning) when one does.
The async entry points ask which library is running them: under trio they
run the trio code in place; under asyncio they hand the synchronous entry
point to ``asyncio.to_thread``, so the caller's loop keeps serving its
other tasks.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import trio

__all__ = ["current_async_library", "run_blocking", "run_trio"]

T = TypeVar("T")


def _loop_running_here() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        return False


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(fn, *args)``, in a worker thread when this thread already runs an event loop."""
    if not _loop_running_here():
        return trio.run(fn, *args)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = trio.run(fn, *args)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=target, name="autoglm-node-trio", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def current_async_library() -> Literal["trio", "asyncio"]:
    """Which event loop runs the calling coroutine (trio or asyncio); RuntimeError for neither."""
    try:
        trio.lowlevel.current_trio_token()
        return "trio"
    except RuntimeError:
        pass
    try:
        asyncio.current_task()
        return "asyncio"
    except RuntimeError:
        raise RuntimeError("autoglm.node's async functions run under trio or asyncio") from None


async def run_blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``fn`` in a worker thread of whichever loop (trio or asyncio) is running."""
    call = functools.partial(fn, *args, **kwargs)
    if current_async_library() == "trio":
        return await trio.to_thread.run_sync(call)
    return await asyncio.to_thread(call)
