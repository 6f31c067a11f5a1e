"""The benchmark scripts run end to end (--quick) and print their figures.

They check that the scripts work, never the figures: wall-clock targets belong
to a quiet machine, not to CI.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

BENCHMARKS = ROOT / "benchmarks"


def bench(script: str, tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--dir", str(tmp_path / "data"),
                          "--json", str(out), *args], capture_output=True, text=True, timeout=600,
                         env=subprocess_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_pipeline_quick(tmp_path):
    res, data = bench("bench_pipeline.py", tmp_path)
    assert "ratio nbflow/dask" in res.stdout and "ratio nbflow/pandas" in res.stdout
    assert "peak RSS" in res.stdout
    assert set(data["summary"]) == {"nbflow", "dask", "pandas"}
    # the three write the same rows: the comparison is of one pipeline
    assert len({tuple(v["rows_out"]) for v in data["summary"].values()}) == 1
    assert all(v["median_peak_rss"] > 0 for v in data["summary"].values())


@pytest.mark.slow
def test_bench_memory_quick(tmp_path):
    res, data = bench("bench_memory.py", tmp_path)
    for line in ("flat: peak RSS", "cost: monitor at 10 Hz", "latency: stopped at most"):
        assert line in res.stdout
    assert all(run["ok"] for run in data["flat"]["runs"])
    assert data["cost"]["10 Hz"]["samples_per_s"] > 0
    assert all(case["missed"] == 0 and not case["errors"] for case in data["latency"]["cases"])


def test_benchmarks_import_without_running():
    for name in ("bench_pipeline", "bench_memory"):
        res = subprocess.run([sys.executable, "-c", f"import benchmarks.{name}"], capture_output=True,
                             text=True, timeout=60, env=subprocess_env(), cwd=ROOT)
        assert res.returncode == 0 and res.stdout == "", res.stderr
