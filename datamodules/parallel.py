"""Run a per-file function over many files in worker processes, with a progress bar.

Used by the one-off dataset passes (SBD conversion, the class-presence scan): each is tens of
thousands of small independent PNG/.mat decodes, which parallelise perfectly across processes
and not at all across threads (PIL and scipy hold the GIL for much of the work).
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_WORKERS = 4
# Below this many items a pool costs more (process start, imports) than it saves.
SERIAL_BELOW = 500


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers and job schedulers set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(num_items: int, serial_below: int = SERIAL_BELOW) -> int:
    """min(4, CPUs) worker processes, or 1 (serial) for small inputs."""
    return 1 if num_items < serial_below else max(1, min(MAX_WORKERS, available_cpus()))


def _chunks(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def map_chunks(function: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item], *,
               workers: int | None = None, chunk_size: int = 64, description: str = "working",
               progress: bool = True) -> list[Result]:
    """[function(chunk) for each chunk of `items`], concatenated, in the order of `items`.

    `function` takes a chunk (a slice of `items`) and returns one result per item; it must be a
    module-level function (or a functools.partial of one) so that worker processes can unpickle
    it. Chunks keep the inter-process traffic to one message per `chunk_size` items.
    `workers`: None = default_workers(len(items)); 1 = in this process.
    """
    items = list(items)
    workers = default_workers(len(items)) if workers is None else workers
    # A daemonic process (e.g. a DataLoader worker) may not have children: stay serial there.
    if multiprocessing.current_process().daemon:
        workers = 1
    chunks = _chunks(items, max(1, chunk_size))
    results: list[Result] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=len(items))
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                results.extend(_checked(function(chunk), chunk))
                bar.advance(task, len(chunk))
        else:
            # The platform's default start method (fork on Linux), as torch's DataLoader uses:
            # workers start at once, without re-importing the caller's modules.
            with multiprocessing.get_context().Pool(min(workers, len(chunks))) as pool:
                for chunk, chunk_results in zip(chunks, pool.imap(function, chunks)):
                    results.extend(_checked(chunk_results, chunk))
                    bar.advance(task, len(chunk))
    return results


def _checked(chunk_results: list, chunk: Sequence) -> list:
    if len(chunk_results) != len(chunk):
        raise RuntimeError(f"a chunk function returned {len(chunk_results)} results for {len(chunk)} items")
    return list(chunk_results)
