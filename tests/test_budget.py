"""Per-step memory budgets through the engine: the step fails cleanly, the process lives on."""
from __future__ import annotations

import numpy as np
import pandas as pd
import psutil
import pytest

import nbflow
from nbflow.engine.allocator import release_memory
from nbflow.state import Status

BUDGET = 120_000_000


def hoard(df):
    """Python-level work that allocates about 4x the budget in a loop."""
    keep = []
    for _ in range(60):
        keep.append(np.ones(1_000_000, dtype="float64") * len(keep))  # 8 MB each
    return df


def concat_all(df):
    """The seed's naive transform: every chunk of the input concatenated into one frame, repeatedly."""
    frames = [df]
    for _ in range(40):
        frames.append(pd.concat([frames[-1], df], ignore_index=True))
    return frames[-1].head(len(df))


def _wf(function: str, extra: str = "", budget: str = BUDGET) -> str:
    return f"""\
name: budget
steps:
  - name: extract
    action: data.extract
    params: {{path: records.csv, chunk_size: 5000}}
  - name: hog
    action: {function}
    needs: extract
    max_memory: {budget}
{extra}"""


@pytest.fixture
def big_csv(workdir):
    n = 50_000
    rng = np.random.default_rng(1)
    pd.DataFrame({"id": np.arange(n), "amount": rng.normal(size=n),
                  "text": rng.choice(["alpha", "beta", "gamma"], n)}).to_csv(workdir / "records.csv",
                                                                               index=False)
    return workdir


@pytest.mark.parametrize("function,extra", [
    ("hoard", ""),
    ("concat_all", "    streaming: false\n"),
])
def test_budget_trips_and_the_process_lives_on(big_csv, function, extra):
    baseline = psutil.Process().memory_info().rss
    run = nbflow.run(_wf(function, extra), namespace={"hoard": hoard, "concat_all": concat_all},
                     log=False)
    assert run.status == "failed"
    rec = run.records["hog"]
    assert rec.status is Status.FAILED
    assert rec.error["error_type"] == "MemoryBudgetExceeded"
    details = rec.error["details"]
    assert details["budget"] == BUDGET
    assert details["peak"] > BUDGET  # it crossed, and was stopped soon after
    assert details["peak"] < 4 * BUDGET  # ... well before the 4x it was going for
    assert details["memory"]["tripped"] is True
    assert rec.error["location"] and "records" not in rec.error["location"]
    assert run.records["extract"].status is Status.COMPLETED
    release_memory()
    assert psutil.Process().memory_info().rss - baseline < 150_000_000  # memory came back
    # the same process runs on: a fixed function passes, reusing the extract
    run.namespace = {"hoard": lambda df: df, "concat_all": lambda df: df}
    run.rerun()
    assert run.status == "completed"
    assert run.records["extract"].status is Status.REUSED


def test_a_real_memory_error_is_recorded(big_csv):
    def explode(df):
        raise MemoryError("Cannot allocate 512MB")

    run = nbflow.run(_wf("explode"), namespace={"explode": explode}, log=False)
    rec = run.records["hog"]
    assert rec.error["error_type"] == "MemoryError"
    assert rec.error["message"] == "Cannot allocate 512MB"
    assert rec.error["details"]["memory"]["at_failure"] is not None


def test_chunk_size_auto_sizes_chunks_from_the_budget(workdir):
    # wide records (~1 kB of text each) so a modest budget asks for chunks smaller than the input
    n = 40_000
    rng = np.random.default_rng(2)
    pd.DataFrame({"id": np.arange(n),
                  "text": [("x" * 990) + f"{i:010d}" for i in rng.integers(0, 10**9, n)]}
                 ).to_csv(workdir / "wide.csv", index=False)
    sizes = []

    def measure(df):
        sizes.append(len(df))
        return df

    wf = """\
name: auto
steps:
  - name: extract
    action: data.extract
    params: {path: wide.csv, chunk_size: 20000}
  - name: measure
    action: measure
    needs: extract
    chunk_size: auto
    max_memory: 150MB
"""
    run = nbflow.run(wf, namespace={"measure": measure}, log=False)
    assert run.status == "completed", run.summary()
    chosen = run.records["measure"].chunk_size
    # ~1 kB a record: 2 chunks in flight x 3x overhead within 60% of 150 MB is ~15,000 records
    assert chosen is not None and 8_000 <= chosen <= 20_000
    assert max(sizes) <= chosen and sum(sizes) == n and len(sizes) >= 3


@pytest.mark.slow
def test_one_giant_allocation_is_bounded_by_a_worker_process_memory_limit(big_csv):
    """A single C-level allocation can't be interrupted in-process; a worker with a memory limit can."""
    import dask
    from distributed import Client, LocalCluster

    def giant(df):
        return df.assign(block=np.ones(120_000_000).sum())  # one 960 MB allocation

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="400MB",
                         dashboard_address=None) as cluster, Client(cluster) as client:
        # a step budget above the worker's limit: the nanny, not nbflow's guard, must stop it
        run = nbflow.run(_wf("giant", budget="4GB"), namespace={"giant": giant}, backend=client, log=False)
    assert run.status == "failed"
    assert run.records["extract"].status is Status.COMPLETED
    assert run.records["hog"].error["error_type"] == "KilledWorker"
    assert psutil.Process().is_running()


def test_tracing_still_works_after_a_trip(big_csv):
    """A withdrawn interrupt must not leave the interpreter's async-exception signal set:
    on Python 3.11 a trace function (pdb, coverage) would then loop forever."""
    import subprocess
    import sys
    import textwrap

    from conftest import subprocess_env

    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import nbflow
        def hoard(df):
            keep = []
            for _ in range(60):
                keep.append(np.ones(1_000_000) * len(keep))
            return df
        run = nbflow.run({_wf("hoard")!r}, namespace={{"hoard": hoard}}, log=False)
        assert run.records["hog"].error["error_type"] == "MemoryBudgetExceeded"
        calls = []
        sys.settrace(lambda *args: calls.append(args[1]))
        (lambda: 1)()
        sys.settrace(None)
        print("traced", len(calls))
        """)
    res = subprocess.run([sys.executable, "-c", code], cwd=big_csv, capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    assert res.returncode == 0, res.stderr[-2000:]
    assert "traced" in res.stdout
