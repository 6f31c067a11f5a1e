"""Memory on a real dask.distributed cluster: a scheduler and a worker on 127.0.0.1,
started outside this process tree (as a remote machine's would be), so the only way
to see their memory is through the scheduler."""
from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest

import nbflow
from nbflow.state import Status

from conftest import ROOT, subprocess_env
from labserver import free_port

pytestmark = pytest.mark.slow
MB = 1_000_000



def _detached(cmd: list[str], tmp_path, name: str) -> psutil.Process:
    """Start ``cmd`` as a grandchild whose parent exits at once: not our descendant."""
    pidfile = tmp_path / f"{name}.pid"
    log = tmp_path / f"{name}.log"
    launcher = ("import subprocess, sys; "
                "p = subprocess.Popen(sys.argv[3:], stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT,"
                " start_new_session=True); open(sys.argv[1], 'w').write(str(p.pid))")
    # the scheduler and the worker unpickle this module's functions: let them import it
    env = subprocess_env()
    env["PYTHONPATH"] = f"{ROOT / 'tests'}:{env['PYTHONPATH']}"
    subprocess.run([sys.executable, "-c", launcher, str(pidfile), str(log), *cmd], check=True,
                   env=env, timeout=60)
    return psutil.Process(int(pidfile.read_text()))


@pytest.fixture
def remote_cluster(tmp_path):
    port = free_port()
    procs = [_detached([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                        "--port", str(port), "--dashboard-address", ":0", "--no-show"], tmp_path, "scheduler")]
    address = f"tcp://127.0.0.1:{port}"
    procs.append(_detached([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                            "--nworkers", "1", "--memory-limit", "3GB", "--no-nanny",
                            "--host", "127.0.0.1", "--dashboard-address", ":0"], tmp_path, "worker"))
    from distributed import Client

    client = Client(address, timeout=60)
    try:
        client.wait_for_workers(1, timeout=60)
        yield client
    finally:
        client.close()
        for proc in reversed(procs):  # the worker first, while its scheduler still answers
            proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:  # a worker whose scheduler left first can hang in its goodbye
            proc.kill()
        psutil.wait_procs(alive, timeout=10)


def hold(df, mb: int = 300, seconds: float = 1.5):
    block = np.ones(mb * MB // 8)  # touched: resident on the worker
    time.sleep(seconds)
    return df.assign(block=float(block[0]))


def hold_long(df):
    return hold(df, seconds=3.0)


@pytest.fixture
def points(workdir):
    rows = 4_000
    pd.DataFrame({"id": np.arange(rows), "x": np.arange(rows) * 0.5}).to_csv(workdir / "points.csv",
                                                                              index=False)
    return workdir


def _workflow(max_memory: str) -> str:
    return f"""\
name: cluster
steps:
  - name: extract
    action: data.extract
    params: {{path: points.csv, chunk_size: 1000}}
  - name: hold
    action: hold
    needs: extract
    params: {{max_memory: {max_memory}}}
"""


def test_workers_outside_this_process_are_sampled_through_the_scheduler(remote_cluster, points):
    from nbflow.engine.backends import DistributedBackend

    backend = DistributedBackend(client=remote_cluster)
    (address,) = backend.remote_memory()  # the worker is not ours: it is counted
    run = nbflow.run(_workflow("2GB"), namespace={"hold": hold}, backend=remote_cluster,
                     log=False)
    assert run.status == "completed", run.summary()
    samples = run.run_dir.read_memory()
    assert samples and max(s.remote for s in samples) > 300 * MB
    local = [s.rss - s.remote for s in samples]
    assert max(local) - min(local) < 200 * MB  # the 300 MB blocks were never here
    mem = run.records["hold"].info["memory"]
    assert mem["peak_above_baseline"] > 250 * MB  # seen on the worker, attributed to the step
    from nbflow.ui.plots import memory_figure

    fig = memory_figure(run.state, samples)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "memory (RSS, process + children + cluster workers)" in labels


def test_a_budget_on_the_cluster_stops_the_steps_chunks(remote_cluster, points):
    # 5 chunks of 300 MB, held 3 s each on one worker thread: 15 s if nothing stops it
    run = nbflow.run(_workflow("150MB"), namespace={"hold": hold_long},
                     backend=remote_cluster, log=False)
    rec = run.records["hold"]
    assert run.status == "failed" and rec.status is Status.FAILED
    assert rec.error["error_type"] == "MemoryBudgetExceeded", rec.error
    assert rec.chunks_done < rec.chunks_total  # it stopped before the last chunk
    deadline = time.time() + 30
    while remote_cluster.processing() and any(remote_cluster.processing().values()):
        assert time.time() < deadline, "the step's chunks were not cancelled on the cluster"
        time.sleep(0.2)
    # the run failed cleanly and goes on: with a bigger budget it passes, extract reused
    run.rerun(nbflow.parse(_workflow("2GB"), namespace={"hold": hold}))
    assert run.status == "completed", run.summary()
    assert run.records["extract"].status is Status.REUSED


def test_local_cluster_children_are_not_counted_twice(workdir):
    from distributed import Client, LocalCluster

    from nbflow.engine.backends import DistributedBackend

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        backend = DistributedBackend(client=client)
        # the worker is our child: the local sampler's process-tree walk counts it already
        assert backend.remote_memory() == {}
