"""Process-level plumbing shared by every entry point: the event loop (uvloop when installed) and a
clean stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    raise_file_limit()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


async def until_stopped(stop: asyncio.Event) -> None:
    """A started service waits here for its stop. What it made to start (modules, protobuf descriptors,
    the libraries' tables: most of the heap) lives as long as the process, so it is moved out of the
    cyclic collector's reach first (gc.freeze), and the youngest generation is collected every 20,000
    net allocations instead of 700: serving allocates in bursts (a part completes and a thousand waiting
    requests are answered at once) that die as soon as they are written, and at 700 every burst ran the
    collector. Measured with 1000 LL-HLS clients (castmesh bench llhls): the collector took 18% of the
    process's CPU before, 5.5% frozen, under 1% with both."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    await stop.wait()


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def cancel_all(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel background tasks and wait until each has stopped."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def raise_file_limit() -> None:
    """Every viewer is a socket: lift the soft descriptor limit to the hard one, as servers do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
