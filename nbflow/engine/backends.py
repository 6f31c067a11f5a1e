"""Where a step's chunks are computed: Dask's threaded scheduler here, or a dask.distributed cluster.

The executor hands a backend Dask Delayed objects, one small result frame per
chunk (``compute_parts``); the backend computes them in one graph, reports each
chunk as it lands, and stops starting new chunks once ``cancel`` is set.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import dask
import dask.threaded
from dask.callbacks import Callback

from nbflow.errors import RunInterrupted

OnChunk = Callable[[int, Any], None]
#: the threaded scheduler as a function: named "threads", dask.compute imports
#: dask.distributed (~0.1 s) to look for a Client first
_THREADS = dask.threaded.get


class _ChunkCallbacks(Callback):
    """Progress per chunk and cancellation, for one compute call only (not global)."""

    def __init__(self, index: dict, on_chunk: OnChunk | None, cancel: threading.Event | None):
        super().__init__()
        self.index, self.on_chunk, self.cancel = index, on_chunk, cancel

    def _pretask(self, key, dsk, state):
        if self.cancel is not None and self.cancel.is_set():
            raise RunInterrupted()

    def _posttask(self, key, result, dsk, state, worker_id):
        if self.on_chunk is not None and key in self.index:
            self.on_chunk(self.index[key], result)


class LocalBackend:
    """Dask's threaded scheduler in this process: the Jupyter kernel's own threads."""

    name = "threads"
    #: memory outside this process tree to watch: none, every chunk runs here
    remote_memory = None

    def __init__(self, num_workers: int | None = None):
        self.num_workers = num_workers or os.cpu_count() or 2

    @property
    def parallelism(self) -> int:
        return self.num_workers

    def compute_parts(self, parts: list, on_chunk: OnChunk | None = None,
                      cancel: threading.Event | None = None) -> list:
        """Compute Dask Delayed objects in one graph, reporting each as it lands."""
        index = {part.key: i for i, part in enumerate(parts)}
        callbacks = _ChunkCallbacks(index, on_chunk, cancel)
        # a pool per call: concurrent steps never queue behind each other's chunks
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="nbflow-chunk") as pool:
            return list(dask.compute(*parts, scheduler=_THREADS, pool=pool,
                                     callbacks=[callbacks._callback]))

    def compute(self, obj, cancel: threading.Event | None = None):
        callbacks = _ChunkCallbacks({}, None, cancel)
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="nbflow-chunk") as pool:
            (result,) = dask.compute(obj, scheduler=_THREADS, pool=pool,
                                     callbacks=[callbacks._callback])
        return result

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"Dask threads ({self.num_workers} workers)"


class DistributedBackend:
    """A dask.distributed cluster: a Client you pass, a scheduler address, or a new LocalCluster."""

    name = "distributed"

    def __init__(self, client=None, address: str | None = None, **cluster_kwargs):
        from distributed import Client, LocalCluster

        self._own = client is None
        self._cluster = None
        if client is None:
            if address:
                client = Client(address)
            else:
                cluster_kwargs.setdefault("dashboard_address", None)
                self._cluster = LocalCluster(**cluster_kwargs)
                client = Client(self._cluster)
        self.client = client
        self._pids: dict[str, int] = {}  # worker address -> its pid, when asked last
        self._in_tree: set[str] = set()

    @property
    def parallelism(self) -> int:
        return max(1, sum(self.client.nthreads().values()))

    def remote_memory(self) -> dict[str, int]:
        """Resident bytes of each worker outside this process tree, from the scheduler.

        Each worker reports its process memory with its heartbeat (every ~0.5 s on
        a small cluster); the scheduler keeps the latest. Workers that are this
        process (``processes=False``) or its children (a LocalCluster's nannies)
        are left out: the local sampler counts them already.
        """
        workers = self.client.scheduler_info().get("workers", {})
        if set(workers) != set(self._pids):
            self._find_local_workers(workers)
        return {address: int(w.get("metrics", {}).get("memory") or 0)
                for address, w in workers.items() if address not in self._in_tree}

    def _find_local_workers(self, workers: dict) -> None:
        import psutil

        try:
            self._pids = dict(self.client.run(os.getpid))
        except Exception:  # noqa: BLE001 — a worker left meanwhile: ask again next time
            self._pids = {}
        local_hosts = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
        with contextlib.suppress(Exception):
            local_hosts |= {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
        me = psutil.Process()
        tree = {me.pid} | {p.pid for p in me.children(recursive=True)}
        self._in_tree = {address for address, pid in self._pids.items()
                         if pid in tree and workers.get(address, {}).get("host") in local_hosts}

    def compute_parts(self, parts: list, on_chunk: OnChunk | None = None,
                      cancel: threading.Event | None = None) -> list:
        from distributed import as_completed

        futures = self.client.compute(parts)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(futures)
        try:
            done = as_completed(futures, with_results=False)
            while not done.is_empty():
                # poll, so a cancel (or a tripped budget) is seen while a long chunk runs
                if cancel is not None and cancel.is_set():
                    raise RunInterrupted()
                batch = done.next_batch(block=False)
                if not batch:
                    time.sleep(0.05)
                for future in batch:
                    results[index[future.key]] = value = future.result()
                    if on_chunk is not None:
                        on_chunk(index[future.key], value)
        except BaseException:
            self.client.cancel(futures)
            raise
        return results

    def compute(self, obj, cancel: threading.Event | None = None):
        future = self.client.compute(obj)
        try:
            while not future.done():
                if cancel is not None and cancel.is_set():
                    raise RunInterrupted()
                threading.Event().wait(0.05)
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self._own:
            self.client.close()
            if self._cluster is not None:
                self._cluster.close()

    def describe(self) -> str:
        return f"dask.distributed at {self.client.scheduler.address} ({self.parallelism} threads)"


def make_backend(spec: Any = None):
    """A backend from ``None``/"threads", "distributed", a scheduler address, a Client, or a backend."""
    if spec is None or spec == "threads":
        return LocalBackend()
    if hasattr(spec, "compute_parts"):
        return spec
    if spec == "distributed":
        return DistributedBackend()
    if isinstance(spec, str):
        return DistributedBackend(address=spec)
    return DistributedBackend(client=spec)
