from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def records_csv(tmp_path) -> Path:
    """1,000 small records: id, country (a few missing), amount (a few negative)."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "id": np.arange(1, 1001, dtype="int64"),
        "country": rng.choice(["DE", "FR", "US", None], size=1000, p=[0.4, 0.3, 0.28, 0.02]),
        "amount": np.round(rng.normal(50, 30, size=1000), 2),
    })
    path = tmp_path / "records.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path, with the run store inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NBFLOW_HOME", str(tmp_path / ".nbflow"))
    return tmp_path


@pytest.fixture
def csv_in_workdir(workdir, records_csv) -> Path:
    """records.csv in the working directory (what the test workflows' input_path names)."""
    (workdir / "records.csv").write_bytes(records_csv.read_bytes())
    return workdir


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Every sampler, pool and step thread nbflow starts is stopped by the time a test ends."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate()
              if t.ident not in before and t.is_alive() and t.name.startswith("nbflow")]
    for t in leaked:
        t.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"


def nbflow_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nbflow.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("MPLBACKEND", "Agg")
    env.update(extra)
    return env
