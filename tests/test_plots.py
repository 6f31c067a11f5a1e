"""The memory figure, drawn from real runs: spans, budgets, chunk ticks, failures, the saved PNG."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

import nbflow
from nbflow import events as ev
from nbflow.state import RunState
from nbflow.ui.plots import PNG_SIGNATURE, figure_png, memory_figure, save_memory_plot
from nbflow.units import format_size

from conftest import nbflow_cmd, subprocess_env

EXTRACT = """  - name: extract
    action: data.extract
    params: {path: "{input_path}", chunk_size: 250}"""


def _wf(*steps: str) -> str:
    return "name: plots\nparameters: {input_path: records.csv}\nsteps:\n" + "\n".join(steps)


def one(fig_or_ax, gid: str):
    found = fig_or_ax.findobj(lambda a: a.get_gid() == gid)
    assert len(found) == 1, f"{len(found)} artists with gid {gid!r}"
    return found[0]


def gids(fig_or_ax) -> set[str]:
    return {a.get_gid() for a in fig_or_ax.findobj(lambda a: a.get_gid() is not None)}


def figure_of(handle, **options):
    events = list(handle.run_dir.read_events())
    return memory_figure(handle.state, handle.run_dir.read_memory(), events, **options), events


def attempt_start(events, attempt: int) -> float:
    return next(e.time for e in events if isinstance(e, ev.RunStarted) and e.attempt == attempt)


def test_spans_budgets_and_chunk_ticks_follow_the_records(csv_in_workdir):
    def slow(df):
        time.sleep(0.05)
        return df

    handle = nbflow.run(_wf(EXTRACT, """  - name: slow
    action: slow
    needs: extract
    max_memory: 300MB"""), namespace={"slow": slow}, log=False)
    assert handle.status == "completed"
    fig, events = figure_of(handle)
    t0 = attempt_start(events, 1)
    (ax,) = fig.axes
    for name in ("extract", "slow"):
        rec = handle.records[name]
        span = one(ax, f"span:{name}")
        assert span.get_x() == pytest.approx(rec.started - t0)
        assert span.get_width() == pytest.approx(rec.ended - rec.started)
        budget = one(ax, f"budget:{name}")
        baseline = rec.info["memory"]["baseline"]
        assert list(budget.get_ydata()) == [baseline + rec.max_memory] * 2
        assert list(budget.get_xdata()) == pytest.approx([rec.started - t0, rec.ended - t0])
        assert rec.chunks_done >= 1
        assert len(one(ax, f"chunks:{name}").get_xdata()) == rec.chunks_done
        assert name in one(ax, f"label:{name}").get_text()
    chunk_events = [e for e in events if isinstance(e, ev.ChunkDone) and e.step == "extract"]
    assert handle.records["extract"].chunks_done == len(chunk_events) >= 4  # 1,000 rows, ~250 a chunk
    assert handle.records["slow"].max_memory == 300_000_000
    memory = one(ax, "memory")
    assert len(memory.get_xdata()) == len(handle.run_dir.read_memory()) > 0
    assert not any(g.startswith("failure") for g in gids(fig))
    assert "plots · run " in one(fig, "title").get_text()


def test_a_tripped_budget_is_marked_at_the_failure_with_its_figure(csv_in_workdir):
    def hog(df):
        held = []
        for _ in range(20):  # up to 400 MB, held: the 40 MB budget trips on the way
            held.append(np.ones(2_500_000))
            time.sleep(0.05)
        return df

    handle = nbflow.run(_wf(EXTRACT.replace("250", "5000"), """  - name: hog
    action: hog
    needs: extract
    max_memory: 40MB
  - name: after
    action: hog
    needs: hog"""), namespace={"hog": hog}, log=False)
    rec = handle.records["hog"]
    assert handle.status == "failed" and rec.error["error_type"] == "MemoryBudgetExceeded"
    fig, events = figure_of(handle)
    t0 = attempt_start(events, 1)
    marker = one(fig, "failure:hog")
    assert list(marker.get_xdata()) == pytest.approx([rec.ended - t0])
    assert list(marker.get_ydata()) == [rec.error["details"]["memory"]["at_failure"]]
    note = one(fig, "failure-label:hog").get_text()
    above = rec.error["details"]["at_failure"]
    assert note.startswith("MemoryBudgetExceeded")
    assert above > 40_000_000
    assert f"{format_size(above)} above baseline (budget 40 MB)" in note
    budget = one(fig, "budget:hog")
    assert budget.get_ydata()[0] == rec.error["details"]["memory"]["baseline"] + 40_000_000
    assert "span:after" not in gids(fig)  # skipped: never ran
    assert "skipped after" in fig.axes[0].get_title(loc="right")
    assert figure_png(fig).startswith(PNG_SIGNATURE)


def test_a_memory_error_in_user_code_is_marked_too(csv_in_workdir):
    def greedy(df):
        raise MemoryError("Unable to allocate 80.0 GiB for an array")

    handle = nbflow.run(_wf(EXTRACT, """  - name: greedy
    action: greedy
    needs: extract"""), namespace={"greedy": greedy}, log=False)
    assert handle.status == "failed"
    fig, _ = figure_of(handle)
    marker = one(fig, "failure:greedy")
    assert marker.get_ydata()[0] == handle.records["greedy"].error["details"]["memory"]["at_failure"]
    note = one(fig, "failure-label:greedy").get_text()
    assert note.splitlines() == ["MemoryError", "Unable to allocate 80.0 GiB for an array"]


def test_after_a_rerun_the_failed_attempt_is_drawn_above_the_fix(csv_in_workdir):
    calls = []

    def flaky(df):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first time unlucky")
        return df

    handle = nbflow.run(_wf(EXTRACT, """  - name: flaky
    action: flaky
    needs: extract"""), namespace={"flaky": flaky}, log=False)
    assert handle.status == "failed"
    handle.rerun()
    assert handle.status == "completed" and handle.state.reused == ("extract",)

    fig, events = figure_of(handle)
    first, latest = fig.axes
    assert first.get_title(loc="left").startswith("attempt 1: failed")
    assert latest.get_title(loc="left").startswith("attempt 2: completed")
    assert {"span:extract", "span:flaky", "failure:flaky"} <= gids(first)
    assert "span:flaky" in gids(latest)
    assert "span:extract" not in gids(latest)  # reused, not run again
    assert "reused extract (from attempt 1)" in latest.get_title(loc="right")
    # each panel counts from its own attempt's start
    rec = handle.records["flaky"]
    assert one(latest, "span:flaky").get_x() == pytest.approx(rec.started - attempt_start(events, 2))
    assert first.get_ylim() == latest.get_ylim()  # one memory scale to compare them on

    only_latest, _ = figure_of(handle, attempt="latest")
    assert len(only_latest.axes) == 1 and "failure:flaky" not in gids(only_latest)
    assert len(figure_of(handle, attempt=1)[0].axes) == 1
    with pytest.raises(ValueError, match="no attempt 3"):
        figure_of(handle, attempt=3)


def _synthetic(samples_every: float | None):
    """A run caught mid-way: 'a' completed without a budget, 'b' still running."""
    t, rid = 1_000.0, "r-synthetic"
    events = [
        ev.RunStarted(run_id=rid, time=t, workflow="wf", steps=("a", "b"), to_run=("a", "b")),
        ev.StepStarted(run_id=rid, time=t + 0.1, step="a", max_memory=None),
        ev.ChunkDone(run_id=rid, time=t + 0.5, step="a", chunk=0, chunks_done=1, chunks_total=1,
                     records=10, records_done=10),
        ev.StepCompleted(run_id=rid, time=t + 1.0, step="a", duration=0.9, chunks=1,
                         info={"memory": {"baseline": 200_000_000, "peak": 260_000_000}}),
        ev.StepStarted(run_id=rid, time=t + 1.1, step="b", max_memory=100_000_000),
    ]
    state = RunState(rid, "wf", ["a", "b"])
    for event in events:
        state.apply(event)
    samples = [] if samples_every is None else [
        ev.MemorySampled(run_id=rid, time=t + i * samples_every, rss=250_000_000 + i * 1_000_000)
        for i in range(int(2.0 / samples_every))]
    return state, samples, events


def test_a_running_step_spans_to_the_last_sample_and_a_step_without_budget_has_no_line():
    state, samples, events = _synthetic(samples_every=0.25)
    fig = memory_figure(state, samples, events)
    span = one(fig, "span:b")
    assert span.get_x() + span.get_width() == pytest.approx(samples[-1].time - 1_000.0)
    assert "running" in one(fig, "label:b").get_text()
    assert "budget:a" not in gids(fig) and "baseline:a" in gids(fig)
    # b has no baseline of its own yet: the last sample before it started stands in
    assert one(fig, "budget:b").get_ydata()[0] == samples[4].rss + 100_000_000
    assert samples[4].time < 1_001.1 < samples[5].time
    assert figure_png(fig).startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("samples_every", [None, 5.0], ids=["no-samples", "one-sample"])
def test_few_or_no_samples_still_draw(samples_every):
    state, samples, events = _synthetic(samples_every)
    fig = memory_figure(state, samples, events)
    assert {"span:a", "span:b", "chunks:a"} <= gids(fig)
    if samples:
        assert len(one(fig, "memory").get_xdata()) == 1
    else:
        assert "memory" not in gids(fig) and "no-samples" in gids(fig)
    assert figure_png(fig).startswith(PNG_SIGNATURE)
    # without events.jsonl (an old run): the records alone still give the spans
    assert {"span:a", "span:b"} <= gids(memory_figure(state, samples))


def test_every_run_saves_its_png_and_the_cli_writes_one_with_agg(csv_in_workdir):
    handle = nbflow.run(_wf(EXTRACT), log=False)
    saved = handle.memory_plot()  # drawn in the background as the run returned
    assert saved == handle.run_dir.path / "memory.png"
    assert saved.read_bytes().startswith(PNG_SIGNATURE)

    path = save_memory_plot(handle.run_dir, csv_in_workdir / "plots" / "again.png", dpi=60)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == ["again.png"]  # no temporary file left

    out = csv_in_workdir / "cli.png"
    proc = subprocess.run(nbflow_cmd("show", "latest", "--plot", str(out)), capture_output=True,
                          text=True, timeout=60, env=subprocess_env(MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert "memory plot written" in proc.stdout


def test_a_cli_run_leaves_its_png_when_the_process_exits(csv_in_workdir):
    (csv_in_workdir / "wf.yaml").write_text(_wf(EXTRACT))
    proc = subprocess.run(nbflow_cmd("run", "wf.yaml"), capture_output=True, text=True, timeout=120,
                          env=subprocess_env(MPLBACKEND="Agg"), cwd=csv_in_workdir)
    assert proc.returncode == 0, proc.stderr
    (png,) = (csv_in_workdir / ".nbflow" / "runs").glob("*/memory.png")
    assert png.read_bytes().startswith(PNG_SIGNATURE)
