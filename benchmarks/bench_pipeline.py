"""The demo pipeline three ways on one generated file: nbflow, hand-written Dask, pandas in memory.

    python benchmarks/bench_pipeline.py                  # 1,000,000 rows, 3 repetitions
    python benchmarks/bench_pipeline.py --rows 10000000  # the 10M-row figures
    python benchmarks/bench_pipeline.py --quick          # 100,000 rows, once: a smoke test

Each run is a fresh process (so its peak RSS is its own) that imports what it
needs, then times read CSV -> check the schema -> ``demo.clean_records`` ->
Parquet. Repetitions are interleaved so machine noise hits every variant alike.
nbflow checkpoints every step (that is what lets a rerun skip the extract);
the others write only the result.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    from benchmarks import _harness as h
except ImportError:  # run as a script: python benchmarks/bench_pipeline.py
    import _harness as h

VARIANTS = ("nbflow", "dask", "pandas")
TARGET_WALL = 1.10  # nbflow / hand-written Dask (the core issue, section 8)
TARGET_RSS = 1.20
RESULTS = Path(__file__).resolve().parent / "results"


# -- the children: each imports what it needs, then times the work --------------------------

def _schema_problems(dtypes, schema) -> list[str]:
    """The dtype half of data.validate, as a hand-written pipeline would check it."""
    from pandas.api import types as pdt

    fits = {"int64": pdt.is_integer_dtype, "float64": pdt.is_float_dtype,
            "string": lambda d: pdt.is_string_dtype(d) or pdt.is_object_dtype(d)}
    problems = [f"{col}: missing" for col in schema if col not in dtypes]
    problems += [f"{col}: expected {spec['dtype']}, found {dtypes[col]}"
                 for col, spec in schema.items() if col in dtypes and not fits[spec["dtype"]](dtypes[col])]
    return problems


def _null_problems(df, schema) -> list[str]:
    return [f"{col}: {n} empty values" for col, spec in schema.items()
            if not spec["nullable"] and (n := int(df[col].isna().sum()))]


def child_nbflow(csv: Path, work: Path, blocksize: str) -> None:
    import dask.dataframe  # noqa: F401  (imported before the clock, as in the other variants)

    import nbflow
    import nbflow.engine.executor  # noqa: F401
    from nbflow.demo import PIPELINE

    finished = []

    def on_event(event) -> None:
        if type(event).__name__ == "RunFinished":
            finished.append(time.perf_counter())

    started, cpu = time.perf_counter(), time.process_time()
    run = nbflow.run(PIPELINE, parameters={"input_path": str(csv), "output_path": str(work / "out")},
                     store=work / ".nbflow", workdir=work, log=False, observers=[on_event])
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    recs = run.records
    # what nbflow.run does after the last step (e.g. saving the memory figure) counts in
    # wall; to_finished is the pipeline alone
    h.report(wall=wall, work_cpu=cpu, to_finished=finished[0] - started if finished else None, status=run.status,
             rows_out=recs["load-data"].records_out,
             steps={name: rec.duration for name, rec in recs.items()},
             step_peak_above_baseline={name: (rec.info.get("memory") or {}).get("peak_above_baseline")
                                       for name, rec in recs.items()})
    if run.status != "completed":
        sys.exit(1)


def child_dask(csv: Path, work: Path, blocksize: str) -> None:
    # compute(scheduler="threads") imports dask.distributed (~0.1 s) to look for a Client:
    # a one-time import, not the pipeline, so it comes before the clock (nbflow needs none)
    import dask.dataframe as dd
    import distributed  # noqa: F401
    import pyarrow.parquet as pq

    from nbflow.demo import DEMO_SCHEMA, clean_records

    def check_then_clean(df):
        problems = _null_problems(df, DEMO_SCHEMA)
        if problems:
            raise ValueError("; ".join(problems))
        return clean_records(df)

    started, cpu = time.perf_counter(), time.process_time()
    ddf = dd.read_csv(str(csv), blocksize=blocksize)
    problems = _schema_problems(ddf.dtypes, DEMO_SCHEMA)
    if problems:
        raise ValueError("; ".join(problems))
    # meta from the empty frame: Dask's guess runs the check on made-up rows
    ddf.map_partitions(check_then_clean, meta=clean_records(ddf._meta)).to_parquet(
        work / "out", write_index=False, compression="snappy", compute_kwargs={"scheduler": "threads"})
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (work / "out").glob("*.parquet"))
    h.report(wall=wall, work_cpu=cpu, status="completed", rows_out=rows, partitions=ddf.npartitions)


def child_pandas(csv: Path, work: Path, blocksize: str) -> None:
    import pandas as pd

    from nbflow.demo import DEMO_SCHEMA, clean_records

    started, cpu = time.perf_counter(), time.process_time()
    df = pd.read_csv(csv)
    problems = _schema_problems(df.dtypes, DEMO_SCHEMA) + _null_problems(df, DEMO_SCHEMA)
    if problems:
        raise ValueError("; ".join(problems))
    out = clean_records(df)
    out.to_parquet(work / "out.parquet", index=False, compression="snappy")
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    h.report(wall=wall, work_cpu=cpu, status="completed", rows_out=len(out))


CHILDREN = {"nbflow": child_nbflow, "dask": child_dask, "pandas": child_pandas}


# -- the parent --------------------------------------------------------------------------------

def measure(rows: int, repeat: int, folder: Path, variants: list[str], blocksize: str) -> dict:
    from nbflow.demo import ensure_records

    csv = ensure_records(folder / f"rows-{rows}", rows)
    with open(csv, "rb") as f:  # into the page cache once, so no variant pays the first read
        while f.read(1 << 24):
            pass
    runs: dict[str, list[h.Measured]] = {v: [] for v in variants}
    loads = []  # other work on the machine: the 1-minute load average as each run starts
    for rep, order in enumerate(h.rotations(variants, repeat), 1):
        for variant in order:
            loads.append(os.getloadavg()[0])
            work = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=csv.parent))
            try:
                m = h.run_child([__file__, "--child", variant, "--csv", str(csv), "--work", str(work),
                                 "--dask-blocksize", blocksize])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            runs[variant].append(m)
            state = "ok" if m.returncode == 0 else f"FAILED (exit {m.returncode})"
            print(f"  [{rep}/{repeat}] {variant:<7} {m.wall:6.2f} s  peak {h.mb(m.peak_rss):>8}  {state}",
                  flush=True)
            if m.returncode != 0:
                print(m.output[-3000:], file=sys.stderr)
    return {"csv": str(csv), "csv_bytes": csv.stat().st_size, "runs": runs, "loads": loads}


def summarise(rows: int, repeat: int, blocksize: str, measured: dict) -> dict:
    runs: dict[str, list[h.Measured]] = measured["runs"]
    summary = {}
    for variant, ms in runs.items():
        ok = [m for m in ms if m.returncode == 0]
        summary[variant] = {
            "median_wall": h.median([m.wall for m in ok]),
            "walls": [m.wall for m in ms],
            "median_peak_rss": h.median([m.peak_rss for m in ok]),
            "median_cpu": h.median([m.cpu for m in ok]),
            # CPU seconds inside the timed work (imports and interpreter start left out)
            "median_work_cpu": h.median([m.result.get("work_cpu", float("nan")) for m in ok]),
            "cpu": [m.cpu for m in ms],
            "work_cpu": [m.result.get("work_cpu") for m in ms],
            "peak_rss": [m.peak_rss for m in ms],
            "maxrss": [m.maxrss for m in ms],
            "process_wall": [m.process_wall for m in ms],
            "failed": sum(m.returncode != 0 for m in ms),
            "rows_out": sorted({m.result.get("rows_out") for m in ok} - {None}),
        }
        if variant == "nbflow":
            summary[variant]["median_to_finished"] = h.median(
                [m.result["to_finished"] for m in ok if m.result.get("to_finished") is not None])
            steps = [m.result.get("steps", {}) for m in ok]
            summary[variant]["median_steps"] = {s: h.median([d[s] for d in steps if d.get(s) is not None])
                                                for s in (steps[0] if steps else {})}
            peaks = [m.result.get("step_peak_above_baseline", {}) for m in ok]
            summary[variant]["max_step_peak_above_baseline"] = {
                s: max((p[s] or 0) for p in peaks) for s in (peaks[0] if peaks else {})}
    ratios = {}
    for other in ("dask", "pandas"):
        if "nbflow" in summary and other in summary:
            n, o = summary["nbflow"], summary[other]
            # each repetition runs both back to back: their ratio sees the same machine, where the
            # ratio of medians also carries its drift from one minute to the next
            paired = [a / b for a, b, x, y in zip(n["walls"], o["walls"], runs["nbflow"], runs[other],
                                                   strict=True) if x.returncode == 0 and y.returncode == 0]
            ratios[f"nbflow/{other}"] = {
                "wall": n["median_wall"] / o["median_wall"],
                "wall_paired": h.median(paired) if paired else None,
                "wall_to_finished": n["median_to_finished"] / o["median_wall"],
                "peak_rss": n["median_peak_rss"] / o["median_peak_rss"],
                "cpu": n["median_cpu"] / o["median_cpu"],
                "work_cpu": n["median_work_cpu"] / o["median_work_cpu"]}
    return {"benchmark": "pipeline", "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows,
            "repeat": repeat, "csv_bytes": measured["csv_bytes"], "dask_blocksize": blocksize,
            "load_during_runs": h.median(measured["loads"]),
            "machine": h.machine(), "versions": h.versions("nbflow", "dask", "pandas", "pyarrow"),
            "summary": summary, "ratios": ratios,
            "targets": {"nbflow/dask wall": TARGET_WALL, "nbflow/dask peak_rss": TARGET_RSS},
            "children_maxrss": h.children_maxrss()}


def print_table(data: dict) -> None:
    s = data["summary"]
    print(f"\npipeline: {data['rows']:,} rows ({h.mb(data['csv_bytes'])} CSV), {data['repeat']} "
          f"repetition(s) interleaved, {data['machine']['cpus']} CPUs, load average {data['load_during_runs']:.1f} "
          "(median as the runs started)")
    print(f"{'variant':<8} {'median wall':>11}  {'runs (s)':<20} {'CPU s':>6} {'work CPU':>8} {'peak RSS':>9} "
          f"{'maxrss':>9}  rows out")
    for variant, v in s.items():
        walls = " ".join(f"{w:.2f}" for w in v["walls"])
        rows_out = ", ".join(f"{r:,}" for r in v["rows_out"]) or "-"
        print(f"{variant:<8} {v['median_wall']:>9.2f} s  {walls:<20} {v['median_cpu']:>6.1f} "
              f"{v['median_work_cpu']:>8.2f} {h.mb(v['median_peak_rss']):>9} {h.mb(max(v['maxrss'] or [0])):>9}  {rows_out}")
    for name, r in data["ratios"].items():
        verdict = ""
        if name == "nbflow/dask":
            verdict = (f"   targets: wall <= {TARGET_WALL:.2f}x {'met' if r['wall'] <= TARGET_WALL else 'MISSED'}, "
                       f"peak RSS <= {TARGET_RSS:.2f}x {'met' if r['peak_rss'] <= TARGET_RSS else 'MISSED'}")
        print(f"ratio {name:<14} wall {r['wall']:.2f}x  peak RSS {r['peak_rss']:.2f}x  CPU {r['cpu']:.2f}x "
              f"(work {r['work_cpu']:.2f}x){verdict}")
        if r.get("wall_paired") is not None:
            print(f"      {name:<14} wall, median of the repetitions' own ratios: {r['wall_paired']:.2f}x")
    n = s.get("nbflow", {})
    if "median_steps" in n:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in n["median_steps"].items())
        after = n["median_wall"] - n["median_to_finished"]
        print(f"nbflow steps (median s): {steps}; run finished at {n['median_to_finished']:.2f} s "
              f"({after:.2f} s more before nbflow.run returned)")
        if "dask" in s:
            print(f"ratio nbflow/dask to the run's end (without what follows it): "
                  f"{data['ratios']['nbflow/dask']['wall_to_finished']:.2f}x")
    outs = {tuple(v["rows_out"]) for v in s.values()}
    if len(outs) > 1:
        print(f"WARNING: the variants wrote different row counts: {outs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, one repetition")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dask-blocksize", default="16MB",
                        help="hand-written Dask's read_csv blocksize (16MB: best here at 1M and 10M rows)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "nbflow-bench",
                        help="where the CSV is generated (kept for the next invocation) and runs write")
    parser.add_argument("--json", type=Path, help="default: benchmarks/results/pipeline-<rows>.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](args.csv, args.work, args.dask_blocksize)
        return 0
    if args.quick:
        args.rows, args.repeat = 100_000, 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    print(f"pipeline benchmark: {args.rows:,} rows, {args.repeat} repetition(s) of {', '.join(variants)}",
          flush=True)
    measured = measure(args.rows, args.repeat, args.dir, variants, args.dask_blocksize)
    data = summarise(args.rows, args.repeat, args.dask_blocksize, measured)
    print_table(data)
    h.write_json(args.json or RESULTS / f"pipeline-{args.rows}.json", data)
    failed = sum(v["failed"] for v in data["summary"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
