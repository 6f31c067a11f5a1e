"""Memory figures of the chunked demo: flat peak, the monitor's cost, how fast a budget stops a step.

    python benchmarks/bench_memory.py                 # 1M, 5M, 10M rows; 5 repetitions of the cost
    python benchmarks/bench_memory.py --quick         # small sizes, one repetition: a smoke test
    python benchmarks/bench_memory.py --only latency  # one part: flat, cost, latency

flat     peak RSS of the demo PIPELINE (chunks of 100,000, 512 MB per step) at each
         size, each run a fresh process watched every 20 ms from outside; flat
         means the largest peak <= 1.2x the smallest and every step under its budget.
cost     the demo with the memory monitor effectively off (one sample an hour),
         at 10 Hz and at 100 Hz, interleaved; wall time to the run's end, and the
         sampler's own CPU time measured inside it.
latency  a StepGuard with a budget over a function that allocates in a loop and
         records its RSS: time from the first record over the budget to the
         MemoryBudgetExceeded, and how far RSS went past the budget.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

try:
    from benchmarks import _harness as h
except ImportError:  # run as a script: python benchmarks/bench_memory.py
    import _harness as h

PARTS = ("flat", "cost", "latency")
OFF = 3600.0  # memory_interval that takes the first sample and no other
TARGET_FLAT = 1.20
TARGET_COST = 2.0  # percent of wall time at 10 Hz
TARGET_LATENCY = 0.5  # seconds
RESULTS = Path(__file__).resolve().parent / "results"


def _budget_bytes() -> int:
    from nbflow.units import parse_size

    return int(parse_size("512MB"))


# -- children ----------------------------------------------------------------------------------

def child_run(csv: Path, work: Path, interval: float) -> None:
    """The demo PIPELINE with the monitor sampling every ``interval`` seconds."""
    import dask.dataframe  # noqa: F401  (imports before the clock)

    import nbflow.engine.executor  # noqa: F401
    from nbflow.actions.registry import check
    from nbflow.demo import PIPELINE
    from nbflow.engine.memory import MemoryMonitor
    from nbflow.handle import Run
    from nbflow.spec import parse
    from nbflow.state import RunState
    from nbflow.store import RunStore

    sampler = {"cpu": 0.0, "n": 0}
    sample = MemoryMonitor._sample

    def timed_sample(self) -> None:  # the sampler's own CPU: no noise from other processes
        started = time.thread_time()
        sample(self)
        sampler["cpu"] += time.thread_time() - started
        sampler["n"] += 1

    MemoryMonitor._sample = timed_sample
    parameters = {"input_path": str(csv), "output_path": str(work / "out")}
    spec = parse(PIPELINE, overrides=parameters, action_check=check)
    run_dir = RunStore(work / ".nbflow").new_run(spec.name)
    finished = []

    def on_event(event) -> None:
        if type(event).__name__ == "RunFinished":
            finished.append(time.perf_counter())

    handle = Run(spec, run_dir, RunState(run_dir.run_id, spec.name, spec.step_names),
                 overrides=parameters, workdir=work, observers=[on_event])
    handle.memory_interval = interval
    started = time.perf_counter()
    handle.execute()
    wall = time.perf_counter() - started
    samples = handle.run_dir.read_memory()
    recs = handle.records
    h.report(wall=wall, to_finished=finished[0] - started, status=handle.status,
             rows_out=recs["load-data"].records_out, sampler_cpu=sampler["cpu"], samples=sampler["n"],
             run_baseline=samples[0].rss if samples else None,
             monitor_peak=max((m.rss for m in samples), default=None),
             steps={n: {"duration": r.duration, **{k: (r.info.get("memory") or {}).get(k)
                                                   for k in ("baseline", "peak", "peak_above_baseline",
                                                             "budget")}}
                    for n, r in recs.items()})
    if handle.status != "completed":
        sys.exit(1)


def child_latency(interval: float, trials: int, budget: int, block: int, kind: str) -> None:
    """Trials of one allocating function under a StepGuard; reports each trial's figures."""
    import numpy as np
    import psutil

    from nbflow.engine.allocator import release_memory
    from nbflow.engine.memory import MemoryMonitor
    from nbflow.errors import MemoryBudgetExceeded

    proc = psutil.Process()
    frame = None
    if kind == "pandas":  # a demo-like chunk; each pass keeps a copy with a rebuilt text column
        from nbflow.demo import _block, _note_pool

        rng = np.random.default_rng(0)
        users = np.array([f"user_{i:05d}" for i in range(50_000)], dtype=object)
        frame = _block(rng, 0, block, block, users, _note_pool(rng)).to_pandas()

    def allocate(trace: list) -> None:
        kept = []
        for _ in range(100_000):
            if frame is None:
                kept.append(np.ones(block // 8))  # ones, not empty: the pages are touched
            else:
                copy = frame.copy()
                copy["note"] = copy["note"] + " "
                kept.append(copy)
            trace.append((time.perf_counter(), proc.memory_info().rss))
        raise RuntimeError("the budget never stopped the loop")

    results = []
    with MemoryMonitor(interval=interval) as monitor:
        for _ in range(trials):
            release_memory()
            guard = monitor.guard("allocate", budget)
            trace: list = []
            outcome: dict = {}

            def worker(guard=guard, trace=trace, outcome=outcome) -> None:
                try:
                    guard.wrap(allocate, chunk=0)(trace)
                except MemoryBudgetExceeded:
                    outcome["stopped"] = time.perf_counter()
                except BaseException as err:  # noqa: BLE001 — reported, not raised, in the child
                    outcome["error"] = repr(err)

            thread = threading.Thread(target=worker, name="bench-allocate")
            thread.start()
            thread.join()
            stats = monitor.release(guard)
            # the budget was crossed after the last record under it (and, if the loop
            # recorded one, by the first record over it): latency is at most the first
            # figure, at least the second
            under = [t for t, rss in trace if rss - guard.baseline <= budget]
            over = [t for t, rss in trace if rss - guard.baseline > budget]
            stopped = outcome.get("stopped")
            peak = max([rss for _, rss in trace] + [stats.peak])
            results.append({
                "latency": stopped - under[-1] if stopped and under else None,
                "latency_min": stopped - over[0] if stopped and over else 0.0 if stopped else None,
                "overshoot": peak - guard.baseline - budget,
                "iterations": len(trace), "error": outcome.get("error"),
                "step_seconds": (trace[-1][0] - trace[0][0]) / max(1, len(trace) - 1) if trace else None,
            })
            del trace
    release_memory()
    h.report(interval=interval, kind=kind, budget=budget, block=block, trials=results)


# -- the parent --------------------------------------------------------------------------------

def _run_demo(csv: Path, folder: Path, interval: float) -> h.Measured:
    work = Path(tempfile.mkdtemp(prefix="memory-", dir=folder))
    try:
        return h.run_child([__file__, "--child", "run", "--csv", str(csv), "--work", str(work),
                            "--interval", repr(interval)])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check(m: h.Measured, label: str) -> None:
    if m.returncode != 0:
        print(f"{label} FAILED (exit {m.returncode}):\n{m.output[-3000:]}", file=sys.stderr)


def flat(sizes: list[int], repeat: int, folder: Path) -> dict:
    from nbflow.demo import ensure_records

    print(f"\n== flat: peak RSS of the chunked demo at {', '.join(f'{n:,}' for n in sizes)} rows", flush=True)
    budget = _budget_bytes()
    rows = []
    for n in sizes:
        csv = ensure_records(folder / f"rows-{n}", n)
        for rep in range(repeat):
            m = _run_demo(csv, folder, 0.1)
            _check(m, f"{n:,} rows")
            steps = m.result.get("steps", {})
            above = {s: v.get("peak_above_baseline") or 0 for s, v in steps.items()}
            base = m.result.get("run_baseline") or 0
            rows.append({"rows": n, "rep": rep + 1, "wall": m.wall, "peak_rss": m.peak_rss, "maxrss": m.maxrss,
                         "monitor_peak": m.result.get("monitor_peak"),
                         "run_baseline": base, "peak_above_run_start": max(m.peak_rss, m.maxrss) - base,
                         "step_peak_above_baseline": above, "ok": m.returncode == 0})
            worst = max(above, key=above.get) if above else "-"
            print(f"  {n:>11,} rows  wall {m.wall:6.1f} s  peak RSS {h.mb(m.peak_rss):>8} (maxrss "
                  f"{h.mb(m.maxrss)}; {h.mb(m.result.get('monitor_peak') or 0)} while steps ran), "
                  f"run start {h.mb(base)}, largest step {worst} "
                  f"+{h.mb(above.get(worst, 0))} of {h.mb(budget)}", flush=True)
    peaks = {n: h.median([max(r["peak_rss"], r["maxrss"]) for r in rows if r["rows"] == n and r["ok"]])
             for n in sizes}
    ratio = peaks[max(sizes)] / peaks[min(sizes)]
    worst_step = max((v for r in rows for v in r["step_peak_above_baseline"].values()), default=0)
    print(f"flat: peak RSS {max(sizes):,} / {min(sizes):,} rows = {ratio:.2f}x (target <= {TARGET_FLAT:.2f}x: "
          f"{'met' if ratio <= TARGET_FLAT else 'MISSED'}); largest step peak above its baseline "
          f"{h.mb(worst_step)} of the {h.mb(budget)} budget ({'under' if worst_step < budget else 'OVER'})")
    return {"runs": rows, "median_peak": peaks, "ratio": ratio, "largest_step_peak": worst_step,
            "budget": budget}


def cost(rows: int, repeat: int, folder: Path) -> dict:
    from nbflow.demo import ensure_records

    intervals = {"off": OFF, "10 Hz": 0.1, "100 Hz": 0.01}
    print(f"\n== cost: the monitor on the demo at {rows:,} rows, {repeat} repetition(s) interleaved", flush=True)
    csv = ensure_records(folder / f"rows-{rows}", rows)
    runs: dict[str, list[h.Measured]] = {k: [] for k in intervals}
    for rep, order in enumerate(h.rotations(list(intervals), repeat), 1):
        for name in order:
            m = _run_demo(csv, folder, intervals[name])
            _check(m, name)
            runs[name].append(m)
            r = m.result
            print(f"  [{rep}/{repeat}] {name:<6} {r.get('to_finished', float('nan')):6.2f} s to the end, "
                  f"{r.get('samples', 0):5d} samples, sampler CPU {1000 * r.get('sampler_cpu', 0):6.1f} ms",
                  flush=True)

    def fin(m: h.Measured) -> float:
        return float(m.result.get("to_finished", "nan")) if m.returncode == 0 else float("nan")

    base = h.median([fin(m) for m in runs["off"]])
    out = {}
    for name, ms in runs.items():
        wall = h.median([fin(m) for m in ms])
        paired = h.median([(fin(m) - fin(o)) / fin(o) * 100 for m, o in zip(ms, runs["off"], strict=True)])
        sampler = h.median([m.result.get("sampler_cpu", 0) / fin(m) * 100 for m in ms if m.returncode == 0])
        rate = h.median([m.result.get("samples", 0) / fin(m) for m in ms if m.returncode == 0])
        per = h.median([m.result.get("sampler_cpu", 0) / max(1, m.result.get("samples", 0)) for m in ms
                        if m.returncode == 0])
        out[name] = {"interval": intervals[name], "median_wall": wall, "walls": [fin(m) for m in ms],
                     "cost_pct": (wall - base) / base * 100, "paired_cost_pct": paired,
                     "sampler_cpu_pct": sampler, "samples_per_s": rate, "cpu_per_sample_ms": per * 1000}
    print(f"{'monitor':<7} {'median s':>9} {'cost vs off':>12} {'paired':>8} {'sampler CPU':>12} "
          f"{'rate':>9} {'per sample':>11}")
    for name, v in out.items():
        print(f"{name:<7} {v['median_wall']:>9.2f} {v['cost_pct']:>+11.1f}% {v['paired_cost_pct']:>+7.1f}% "
              f"{v['sampler_cpu_pct']:>11.2f}% {v['samples_per_s']:>6.1f}/s {v['cpu_per_sample_ms']:>8.2f} ms")
    ten = out["10 Hz"]
    print(f"cost: monitor at 10 Hz {ten['cost_pct']:+.1f}% of wall (median), {ten['paired_cost_pct']:+.1f}% "
          f"(paired), its own CPU {ten['sampler_cpu_pct']:.2f}% (target <= {TARGET_COST:.0f}%)")
    return out


def latency(trials: int, block: int, budget: int) -> dict:
    print(f"\n== latency: budget {h.mb(budget)}, {trials} trial(s) per case", flush=True)
    cases = [("numpy", 0.1, block), ("numpy", 0.01, block), ("pandas", 0.1, 100_000)]
    out = []
    for kind, interval, size in cases:
        m = h.run_child([__file__, "--child", "latency", "--interval", repr(interval), "--trials", str(trials),
                         "--budget", str(budget), "--block", str(size), "--kind", kind])
        _check(m, f"latency {kind}")
        res = m.result.get("trials", [])
        lat = [t["latency"] for t in res if t["latency"] is not None]
        lat_min = [t["latency_min"] for t in res if t["latency_min"] is not None]
        over = [t["overshoot"] for t in res]
        step = h.median([t["step_seconds"] for t in res if t["step_seconds"]])
        what = f"{h.mb(size)} np.ones" if kind == "numpy" else f"copy of a {size:,}-row chunk"
        row = {"kind": kind, "interval": interval, "block": size, "latencies": lat, "overshoots": over,
               "median_latency": h.median(lat), "max_latency": max(lat, default=float("nan")),
               "median_latency_lower_bound": h.median(lat_min),
               "median_overshoot": h.median(over), "max_overshoot": max(over, default=0),
               "seconds_per_iteration": step, "missed": sum(t["latency"] is None for t in res),
               "errors": [t["error"] for t in res if t["error"]]}
        out.append(row)
        print(f"  {kind:<6} every {interval * 1000:>4.0f} ms ({what}, {1000 * step:.1f} ms each): latency "
              f"median {1000 * row['median_latency']:.0f} ms (>= {1000 * row['median_latency_lower_bound']:.0f}),"
              f" max {1000 * row['max_latency']:.0f} ms; "
              f"overshoot median {h.mb(row['median_overshoot'])}, max {h.mb(row['max_overshoot'])}"
              + (f"; {row['missed']} not stopped" if row["missed"] else ""), flush=True)
    default = [r for r in out if r["interval"] == 0.1]
    worst = max((r["max_latency"] for r in default), default=float("nan"))
    print(f"latency: stopped at most {1000 * worst:.0f} ms after crossing the budget at 10 Hz "
          f"(target < {TARGET_LATENCY * 1000:.0f} ms: {'met' if worst < TARGET_LATENCY else 'MISSED'})")
    return {"cases": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000,5000000,10000000", help="sizes for the flat part")
    parser.add_argument("--flat-repeat", type=int, default=1)
    parser.add_argument("--cost-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the cost part")
    parser.add_argument("--trials", type=int, default=10, help="trials per latency case")
    parser.add_argument("--block", type=int, default=8_000_000, help="bytes per numpy allocation")
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--quick", action="store_true",
                        help="100,000 and 200,000 rows, cost once at 100,000, 3 latency trials")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "nbflow-bench")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/memory.json")
    parser.add_argument("--child", choices=("run", "latency"), help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="numpy", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "run":
        child_run(args.csv, args.work, args.interval)
        return 0
    if args.child == "latency":
        child_latency(args.interval, args.trials, args.budget, args.block, args.kind)
        return 0
    sizes = sorted(int(n) for n in args.rows.split(","))
    if args.quick:
        sizes, args.flat_repeat, args.cost_rows, args.repeat, args.trials = [100_000, 200_000], 1, 100_000, 1, 3
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        parser.error(f"--only takes {', '.join(PARTS)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    data: dict = {"benchmark": "memory", "date": time.strftime("%Y-%m-%d %H:%M"), "machine": h.machine(),
                  "versions": h.versions("nbflow", "dask", "pandas", "pyarrow", "psutil")}
    if "flat" in parts:
        data["flat"] = flat(sizes, args.flat_repeat, args.dir)
    if "cost" in parts:
        data["cost"] = cost(args.cost_rows, args.repeat, args.dir)
    if "latency" in parts:
        data["latency"] = latency(args.trials, args.block, _budget_bytes())
    h.write_json(args.json or RESULTS / "memory.json", data)
    failed = data.get("flat", {}).get("runs", [])
    return 1 if any(not r["ok"] for r in failed) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
