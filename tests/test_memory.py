"""The memory monitor and the per-step budget, on real allocations and real Dask threads."""
from __future__ import annotations

import pickle
import threading
import time
import traceback

import dask
import numpy as np
import pandas as pd
import psutil
import pytest

from nbflow.engine.allocator import release_memory
from nbflow.engine.limits import auto_chunk_size, default_budget, describe_default_budget, memory_limit
from nbflow.engine.memory import MemoryMonitor
from nbflow.errors import MemoryBudgetExceeded

MB = 1_000_000


def rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.fixture(autouse=True)
def no_leaked_sampler():
    yield
    left = [t for t in threading.enumerate() if t.name == "nbflow-memory-monitor"]
    assert not left, f"sampler threads left running: {left}"


@pytest.fixture
def monitor():
    mon = MemoryMonitor(interval=0.02)
    mon.start()
    try:
        yield mon
    finally:
        mon.stop()


def compute_chunks(fn, guard, n=4):
    """Run fn(i) for n chunks through a real threaded Dask compute, like the executor."""
    tasks = [dask.delayed(guard.wrap(fn, chunk=i))(i) for i in range(n)]
    return dask.compute(*tasks, scheduler="threads", num_workers=2)


def settle(guard):
    """What the executor does after a failure: let the chunks unwind, then trim."""
    assert guard.wait_idle(10)
    return release_memory()


# -- the sampler ---------------------------------------------------------------

def test_first_sample_is_taken_before_start_returns_and_stop_joins():
    mon = MemoryMonitor(interval=30)
    mon.start()
    try:
        assert len(mon.samples) == 1
        assert mon.samples[0].rss > 0 and mon.samples[0].steps == ()
    finally:
        began = time.monotonic()
        mon.stop()
    assert time.monotonic() - began < 1  # stop wakes the thread, it doesn't wait out the interval


def test_held_allocation_shows_in_peak_and_samples_name_step_and_chunk(monitor):
    guard = monitor.guard("load-data")
    seen = threading.Event()

    def on_sample(sample):
        if ("load-data", 0) in sample.chunks:
            seen.set()

    monitor.on_sample = on_sample

    def chunk(i):
        held = np.ones(200 * MB // 8)  # np.ones touches every page; np.zeros would not count
        seen.wait(5)
        time.sleep(0.1)  # a few more samples while it is held
        return held.size

    assert compute_chunks(chunk, guard, n=1) == (200 * MB // 8,)
    stats = monitor.release(guard)
    assert stats.peak_above_baseline == pytest.approx(200 * MB, abs=40 * MB)
    assert not stats.tripped and stats.at_failure is None and stats.samples >= 3
    attributed = [s for s in monitor.samples if s.chunks == (("load-data", 0),)]
    assert attributed and all(s.steps == ("load-data",) for s in attributed)
    assert max(s.rss for s in attributed) - stats.baseline > 150 * MB
    # once released, the step is no longer named
    time.sleep(0.05)
    assert monitor.samples[-1].steps == ()


def test_a_failing_callback_is_logged_once_and_sampling_goes_on(caplog):
    def broken(sample):
        raise ValueError("view is broken")

    with MemoryMonitor(interval=0.01, on_sample=broken) as mon:
        time.sleep(0.15)
        assert mon._thread.is_alive()
    assert len(mon.samples) >= 5
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "on_sample" in errors[0].getMessage()


# -- the budget ----------------------------------------------------------------

def test_loop_of_copies_trips_in_dask_and_memory_comes_back(monitor):
    budget = 150 * MB
    guard = monitor.guard("transform-data", budget)
    guard.add_records(20_000)
    frame = pd.DataFrame({"x": np.arange(500_000, dtype="float64")})  # 4 MB
    finished = []

    def wasteful(i):
        copies = [frame.copy() for _ in range(4 * budget // (4 * MB))]  # 4x the budget
        finished.append(i)
        return len(copies)

    with pytest.raises(MemoryBudgetExceeded) as info:
        compute_chunks(wasteful, guard)
    trip = info.value
    assert (trip.step, trip.budget, trip.records_done) == ("transform-data", budget, 20_000)
    assert trip.peak > budget and trip.at_failure > budget and trip.chunk in range(4)
    assert "transform-data" in str(trip) and "150 MB" in str(trip)
    assert finished == []  # every chunk was stopped, none ran to the end
    stats = monitor.release(guard)
    assert stats.tripped and stats.peak_above_baseline > budget
    assert stats.at_failure - stats.baseline == trip.at_failure
    # a tripped step starts no further chunk
    ran = []
    with pytest.raises(MemoryBudgetExceeded):
        guard.wrap(ran.append, chunk=9)(1)
    assert ran == []
    # the traceback points at the user's line, not only at ours
    assert "wasteful" in "".join(traceback.format_tb(trip.__traceback__))

    del info, trip
    released = settle(guard)
    assert released.after - stats.baseline < 100 * MB
    # the pool threads that were interrupted still work, with no exception left pending
    assert dask.compute(*[dask.delayed(sum)([i, 1]) for i in range(8)],
                        scheduler="threads", num_workers=2) == tuple(range(1, 9))


def test_near_its_budget_a_step_is_checked_between_samples():
    # one sample a second; the loop passes its 200 MB budget ~0.3 s in and would reach
    # 800 MB before the next sample
    mon = MemoryMonitor(interval=1.0)
    mon.start()
    try:
        budget = 200 * MB
        guard = mon.guard("hog", budget)
        frame = pd.DataFrame({"x": np.arange(500_000, dtype="float64")})  # 4 MB

        def slow_hog(i):
            keep = []
            while len(keep) < 4 * budget // (4 * MB):
                keep.append(frame.copy())
                time.sleep(0.005)
            return len(keep)

        with pytest.raises(MemoryBudgetExceeded):
            compute_chunks(slow_hog, guard, n=1)
        stats = mon.release(guard)
        assert budget < stats.peak_above_baseline < budget + 60 * MB  # ~10 ms of the loop past it
        assert stats.samples <= 1  # the glances in between are not recorded as samples
    finally:
        mon.stop()
    settle(guard)


def test_growing_concat_trips(monitor):
    budget = 120 * MB
    guard = monitor.guard("combine", budget)
    part = pd.DataFrame({"x": np.arange(250_000, dtype="float64")})  # 2 MB

    def combine(i):
        out = part
        for _ in range(200):  # would reach 400 MB, with copies on the way
            out = pd.concat([out, part])
        return len(out)

    with pytest.raises(MemoryBudgetExceeded) as info:
        compute_chunks(combine, guard, n=2)
    assert info.value.peak > budget
    stats = monitor.release(guard)
    assert stats.tripped and stats.peak_above_baseline > budget
    settle(guard)


def test_one_giant_c_call_cannot_be_interrupted_but_the_step_still_fails(monitor):
    # Documented limit: the exception lands between bytecodes, so np.ones
    # allocates all 300 MB first; it lands as the call returns, and the step fails.
    budget = 100 * MB
    guard = monitor.guard("explode", budget)
    reached = []

    def giant(i):
        block = np.ones(300 * MB // 8)
        reached.append("after the call")
        for k in range(200):  # the rest of the chunk's work
            time.sleep(0.01)
            block[k] += 1
        reached.append("end")
        return float(block[0])

    with pytest.raises(MemoryBudgetExceeded) as info:
        compute_chunks(giant, guard, n=1)
    stats = monitor.release(guard)
    assert stats.tripped and "end" not in reached
    # the whole allocation happened: the guard reads RSS where the interrupt lands
    assert info.value.peak == stats.peak_above_baseline > 250 * MB
    settle(guard)


def test_entry_check_refuses_a_chunk_when_already_over_budget(monitor):
    guard = monitor.guard("late", 50 * MB)
    ballast = np.ones(120 * MB // 8)  # grown before the chunk, e.g. by the previous chunk's output
    ran = []
    with pytest.raises(MemoryBudgetExceeded) as info:
        guard.wrap(ran.append, chunk=0)(1)
    assert ran == [] and info.value.at_failure > 50 * MB
    del ballast
    monitor.release(guard)


def grow_until_stopped():
    held = []
    while True:
        held.append(bytearray(2 * MB))
        time.sleep(0.001)


def test_a_chunk_that_swallows_the_interrupt_still_fails(monitor):
    guard = monitor.guard("stubborn", 30 * MB)

    def swallow(i):
        held = []
        try:
            while True:
                held.append(bytearray(2 * MB))
                time.sleep(0.001)
        except BaseException:  # noqa: BLE001 - the user code we are guarding against
            return "pretends to be fine"

    with pytest.raises(MemoryBudgetExceeded):
        guard.wrap(swallow, chunk=0)(0)
    monitor.release(guard)


def test_real_memory_error_propagates_and_is_recorded(monitor):
    guard = monitor.guard("huge-alloc", 10_000 * MB)

    def impossible(i):
        return np.empty(2**62, dtype=np.uint8)  # the allocator refuses

    with pytest.raises(MemoryError) as info:
        compute_chunks(impossible, guard, n=1)
    assert not isinstance(info.value, MemoryBudgetExceeded)
    stats = monitor.release(guard)
    assert stats.at_failure is not None and not stats.tripped


def test_budget_error_survives_pickle(monitor):
    guard = monitor.guard("p", 20 * MB)
    guard.add_records(5_000)
    with pytest.raises(MemoryBudgetExceeded) as info:
        guard.wrap(grow_until_stopped, chunk=7)()
    monitor.release(guard)
    trip = info.value
    assert (trip.chunk, trip.records_done) == (7, 5_000)
    back = pickle.loads(pickle.dumps(trip))
    fields = ("step", "budget", "peak", "at_failure", "records_done", "chunk")
    assert [getattr(back, f) for f in fields] == [getattr(trip, f) for f in fields]
    assert str(back) == str(trip)


def test_guarded_calls_tokenize_per_chunk_and_refuse_to_pickle(monitor):
    guard = monitor.guard("t")
    first, second = guard.wrap(len, chunk=0), guard.wrap(len, chunk=1)
    assert dask.base.tokenize(first) != dask.base.tokenize(second)
    assert first.__name__ == "len"
    with pytest.raises(TypeError, match="memory_limit"):
        pickle.dumps(first)
    monitor.release(guard)


# -- default budget and chunk size ---------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_wins_over_host_ram(tmp_path):
    write(tmp_path / "memory.max", "2000000000\n")
    write(tmp_path / "memory.current", "600000000\n")
    write(tmp_path / "memory.stat", "anon 400000000\ninactive_file 200000000\n")
    assert memory_limit(tmp_path) == (2_000_000_000, "cgroup v2")
    assert default_budget(0.5, tmp_path) == 800_000_000  # half of 2.0 GB - 0.4 GB in use
    assert describe_default_budget(0.5, tmp_path) == (
        "memory budget: 800 MB per step (50% of 1.6 GB available of the 2 GB cgroup v2 limit)")


def test_cgroup_v2_max_means_host(tmp_path):
    write(tmp_path / "memory.max", "max\n")
    assert memory_limit(tmp_path) == (psutil.virtual_memory().total, "host RAM")
    host = psutil.virtual_memory().available // 2
    assert default_budget(0.5, tmp_path) == pytest.approx(host, rel=0.05)


def test_cgroup_v1_limit_and_unlimited(tmp_path):
    write(tmp_path / "memory/memory.limit_in_bytes", "1000000000\n")
    write(tmp_path / "memory/memory.usage_in_bytes", "200000000\n")
    assert memory_limit(tmp_path) == (1_000_000_000, "cgroup v1")
    assert default_budget(0.5, tmp_path) == 400_000_000
    write(tmp_path / "memory/memory.limit_in_bytes", "9223372036854771712\n")
    assert memory_limit(tmp_path)[1] == "host RAM"


def test_auto_chunk_size_model():
    # 2 chunks x 470 B x 3 (overhead) x chunk <= 0.6 x 512 MB
    assert auto_chunk_size(512 * MB, 470) == 108_936
    assert auto_chunk_size(512 * MB, 470, parallel=4) == 54_468
    assert auto_chunk_size(10 * MB, 10_000) == 1_000  # clamped up
    assert auto_chunk_size(100_000 * MB, 8) == 1_000_000  # clamped down
    with pytest.raises(ValueError):
        auto_chunk_size(0, 100)


RETAINED = r"""
import os, sys
import numpy as np, psutil
from nbflow.engine.allocator import tune_allocator
print(tune_allocator(), file=sys.stderr)
MB = 1 << 20
proc = psutil.Process()
a = np.ones(30 * MB // 8); del a        # glibc: the next blocks up to 30 MB go to the heap
base = proc.memory_info().rss
b = np.ones(20 * MB // 8); del b        # freed, but is it handed back?
print((proc.memory_info().rss - base) // MB)
"""


@pytest.mark.parametrize("tune", ["1", "0"])
def test_allocator_tuning_hands_freed_arrays_back(tune):
    # Without the trim threshold, glibc keeps a freed 20 MB array mapped after it has
    # seen a bigger one freed: RSS ratchets and a chunked step can trip its budget
    # on memory it no longer holds (seen in CI on the quadratic-allocation test).
    import os
    import subprocess
    import sys

    if not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/usr/lib/libc.so.6"):
        pytest.skip("not glibc")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["NBFLOW_TUNE_MALLOC"] = tune
    out = subprocess.run([sys.executable, "-c", RETAINED], env=env, capture_output=True,
                         text=True, check=True)
    retained = int(out.stdout)
    assert out.stderr.strip() == ("True" if tune == "1" else "False")
    if tune == "1":
        assert retained < 5
    else:
        assert retained >= 15


def test_the_allocator_is_tuned_once_a_step_nears_its_budget(monkeypatch):
    # tuning makes every array over 128 kB an mmap: paid only once a budget is near
    import nbflow.engine.memory as memory

    tuned = []
    monkeypatch.setattr(memory, "tune_allocator", lambda: tuned.append(1))
    monitor = MemoryMonitor(interval=0.02)  # not started: we feed the readings
    monitor._sample()
    assert tuned == []  # no step with a budget
    guard = monitor.guard("step", 100 * MB)
    level = monitor._watch_level(memory.TUNE_AT)
    assert level == guard.baseline + 80 * MB
    # past half the budget the guards look (the glances): not yet a reason to tune
    monkeypatch.setattr(monitor, "local_rss", lambda: guard.baseline + 60 * MB)
    monitor._check(monitor._watch_level())
    monitor._sample()
    assert tuned == []
    monkeypatch.setattr(monitor, "local_rss", lambda: level - MB)
    monitor._check(level)
    monitor._sample()
    assert tuned == []
    monkeypatch.setattr(monitor, "local_rss", lambda: level + MB)
    monitor._check(level)
    monitor._sample()
    assert tuned == [1, 1] and guard.tripped is None
    monitor.release(guard)


def test_free_but_mapped_memory_does_not_trip_the_guard(monkeypatch):
    # RSS over the budget that a trim gives back is not the step's memory
    import nbflow.engine.guard as guard_module

    monitor = MemoryMonitor(interval=0.02)  # not started: we feed the samples
    guard = monitor.guard("fragmented", 50 * MB)
    readings = iter([guard.baseline + 10 * MB])  # what RSS reads after the trim
    trims = []
    monkeypatch.setattr(guard_module, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(monitor, "rss", lambda: next(readings))
    guard._observe(guard.baseline + 80 * MB, confirm=True, count=True)
    assert guard.tripped is None and trims == [1]
    # within a second of that trim, a crossing is believed at once
    guard._observe(guard.baseline + 80 * MB, confirm=True, count=True)
    assert guard.tripped is not None and trims == [1]
    monitor.release(guard)
