"""Run the node's trio code from wherever the caller is: a plain script, a
notebook (an asyncio loop already runs in the main thread), inside trio, or
under asyncio.

Strategy: trio cannot start inside a thread that already runs an event loop
(``trio.run`` raises, and an asyncio loop would be blocked anyway). So the
synchronous entry points run ``trio.run`` in this thread when no loop runs
here, and in a fresh worker thread (joined before returning) when one does.
The async entry points ask which library is running them: under trio they
run the trio code in place; under asyncio it runs in a worker thread, so
the caller's loop keeps serving its other tasks. A worker's trio run can be
cancelled from the waiting side (Ctrl-C, a cancelled asyncio task), so a
fetch never goes on in the background after its caller gave up.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import trio

__all__ = ["current_async_library", "run_blocking", "run_trio", "run_trio_from_asyncio"]

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


class _TrioThread:
    """One ``trio.run`` in a worker thread that another thread can cancel.

    Cancelling (Ctrl-C in a notebook cell, a cancelled asyncio task) cancels
    the trio run, so its fetch stops the way Ctrl-C stops the CLI, instead
    of going on in the background.
    """

    def __init__(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        self._fn, self._args = fn, args
        self._scope: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = threading.Event()
        self.cancelled = False

    async def _main(self) -> Any:
        with trio.CancelScope() as scope:
            self._scope, self._token = scope, trio.lowlevel.current_trio_token()
            self._started.set()
            return await self._fn(*self._args)
        self.cancelled = True  # only reached when cancel() stopped the run
        return None

    def run(self) -> Any:
        try:
            return trio.run(self._main)
        finally:
            self._started.set()

    def cancel(self) -> None:
        self._started.wait()
        if self._scope is not None and self._token is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run(fn, *args)``, in a worker thread when this thread already runs an event loop.

    KeyboardInterrupt while waiting cancels the worker's run, waits for it to
    wind down, then propagates.
    """
    if not _loop_running_here():
        return trio.run(fn, *args)
    worker = _TrioThread(fn, args)
    box: dict[str, Any] = {}
    # An Event, not Thread.join: a join interrupted by Ctrl-C marks the
    # thread stopped (CPython bpo-45274), so a second join returns at once.
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = worker.run()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="autoglm-node-trio", daemon=True).start()
    try:
        done.wait()
    except BaseException:
        worker.cancel()
        done.wait()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def run_trio_from_asyncio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await ``fn(*args)`` run by trio in a worker thread; cancelling the awaiting task cancels it."""
    worker = _TrioThread(fn, args)
    future = asyncio.get_running_loop().run_in_executor(None, worker.run)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        worker.cancel()
        await asyncio.wait([future])  # the fetch winds down (staging kept) before the task ends
        raise


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
