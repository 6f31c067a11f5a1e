"""The demo: a synthetic sales log and the transforms the walkthrough runs on it.

``generate_records`` writes the CSV, ``clean_records`` is the chunk-wise cleaning a
user ends up with, and ``enrich_in_memory`` is the wasteful first version of the
same cleaning that only works while the data is small.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from nbflow.actions.registry import action

COUNTRIES = ("DE", "FR", "GB", "US", "ES", "IT", "NL", "PL", "SE", "BE",
             "AT", "CH", "DK", "IE", "PT", "CZ", "NO", "FI", "CA", "JP")
#: EUR per unit of the currency each category is sold in
RATES = {
    "books": 1.0, "music": 1.0, "games": 0.92, "toys": 0.92, "garden": 1.17,
    "kitchen": 1.17, "sports": 0.86, "beauty": 0.86, "electronics": 0.0062,
    "fashion": 1.04, "grocery": 0.11, "office": 0.25,
}
CATEGORIES = tuple(RATES)

#: the generated file's schema, for ``data.validate``
DEMO_SCHEMA = {
    "id": {"dtype": "int64", "nullable": False},
    "timestamp": {"dtype": "string", "nullable": False},
    "user": {"dtype": "string", "nullable": False},
    "country": {"dtype": "string", "nullable": True},
    "amount": {"dtype": "float64", "nullable": True},
    "category": {"dtype": "string", "nullable": False},
    "note": {"dtype": "string", "nullable": True},
}

#: what ``clean_records`` (and ``enrich_in_memory``) return, in order
CLEAN_COLUMNS = ("id", "timestamp", "user", "country", "amount", "category", "note",
                 "refund", "amount_eur")

_START = np.datetime64("2025-01-01T00:00:00", "s")
_YEAR_SECONDS = 365 * 24 * 3600
_USERS = 50_000
_WORDS = ("order", "late", "delivery", "gift", "wrap", "please", "refund", "box", "damaged",
          "thanks", "express", "call", "before", "leave", "at", "door", "invoice", "needed",
          "coupon", "applied", "second", "attempt", "fragile", "handle", "with", "care")


def _note_pool(rng: np.random.Generator, size: int = 4096) -> np.ndarray:
    """Free-text notes as people type them: odd case, doubled spaces, tabs, padding."""
    cases = (str.lower, str.upper, str.title, str.capitalize)
    gaps = (" ", " ", " ", "  ", "   ", "\t")
    notes = []
    for _ in range(size):
        words = rng.choice(_WORDS, size=rng.integers(5, 9))
        text = "".join(w + gaps[rng.integers(len(gaps))] for w in words).rstrip()
        text = cases[rng.integers(len(cases))](text)
        notes.append(" " * rng.integers(0, 3) + text + " " * rng.integers(0, 3))
    return np.array(notes, dtype=object)


def _block(rng: np.random.Generator, start: int, n: int, rows: int,
           users: np.ndarray, notes: np.ndarray):
    import pyarrow as pa

    ids = np.arange(start + 1, start + n + 1, dtype=np.int64)
    # time advances with id, with jitter, so the log reads in order like a real one
    step = _YEAR_SECONDS / rows
    seconds = ((ids - 1) * step + rng.random(n) * step).astype("int64")
    stamps = np.datetime_as_string(_START + seconds.astype("timedelta64[s]"))

    country = np.asarray(COUNTRIES, dtype=object)[rng.integers(0, len(COUNTRIES), n)]
    country_null = rng.random(n) < 0.03

    amount = np.round(rng.lognormal(3.5, 1.0, n), 2)
    amount[rng.random(n) < 0.05] *= -1  # refunds
    amount_null = rng.random(n) < 0.02

    return pa.table({
        "id": ids,
        "timestamp": pa.array(stamps, type=pa.string()),
        "user": pa.array(users[rng.integers(0, len(users), n)], type=pa.string()),
        "country": pa.array(country, type=pa.string(), mask=country_null),
        "amount": pa.array(amount, mask=amount_null),
        "category": pa.array(np.asarray(CATEGORIES, dtype=object)[rng.integers(0, len(CATEGORIES), n)],
                             type=pa.string()),
        "note": pa.array(notes[rng.integers(0, len(notes), n)], type=pa.string()),
    })


def generate_records(path: str | Path, rows: int = 1_000_000, seed: int = 0,
                     chunk: int = 200_000) -> Path:
    """Write the demo CSV: the same ``(rows, seed, chunk)`` always gives the same bytes.

    Built ``chunk`` rows at a time (memory stays bounded) into a temporary file
    that replaces ``path`` only when complete. Empty cells: ~3% of ``country``,
    ~2% of ``amount``; ~5% of amounts are negative (refunds).
    """
    import pyarrow.csv as pacsv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pool_rng = np.random.default_rng([seed, 0])
    users = np.array([f"user_{i:05d}" for i in range(_USERS)], dtype=object)
    notes = _note_pool(pool_rng)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    options = pacsv.WriteOptions(quoting_style="needed")
    try:
        writer = None
        with open(tmp, "wb") as out:
            for index, start in enumerate(range(0, rows, chunk)):
                rng = np.random.default_rng([seed, 1, index])
                table = _block(rng, start, min(chunk, rows - start), rows, users, notes)
                if writer is None:
                    writer = pacsv.CSVWriter(out, table.schema, write_options=options)
                writer.write_table(table)
            if writer is None:  # rows=0: a header alone
                writer = pacsv.CSVWriter(out, _block(np.random.default_rng(seed), 0, 0, 1, users,
                                                     notes).schema, write_options=options)
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@action("demo.clean_records", kind="chunk")
def clean_records(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy notes and countries, drop rows without an amount, flag refunds, add amount_eur."""
    df = df.loc[df["amount"].notna()]
    country = _text(df["country"]).str.strip().str.upper()
    # mapping the dozen categories rather than every row is ~10x cheaper
    rate = df["category"].astype("category").map(RATES).astype("float64")
    # a new frame of the columns (not assignments into the filtered one: on pandas 2 that is a
    # "copy of a slice")
    columns = {
        **{name: df[name] for name in ("id", "user", "amount", "category")},
        "timestamp": pd.to_datetime(df["timestamp"], format="ISO8601", errors="coerce"),
        "country": country.where(country.notna() & (country != ""), "??"),
        "note": _text(df["note"]).str.replace("\t", " ", regex=False).str.strip().str.lower(),
        "refund": df["amount"] < 0,
        "amount_eur": (df["amount"] * rate).round(2),
    }
    return pd.DataFrame({name: columns[name] for name in CLEAN_COLUMNS}, copy=False).reset_index(drop=True)


#: pandas' text dtype that keeps missing values missing: pandas 3's default ``str``; on pandas 2
#: ``astype(str)`` writes them as the text "nan"
_TEXT = "str" if int(pd.__version__.split(".")[0]) >= 3 else "string"


def _text(values: pd.Series) -> pd.Series:
    return values if isinstance(values.dtype, pd.StringDtype) else values.astype(_TEXT)


@action("demo.enrich_in_memory", kind="chunk")
def enrich_in_memory(df: pd.DataFrame, copies: int = 12) -> pd.DataFrame:
    """The first version everyone writes: every intermediate frame kept "just in case".

    Returns what ``clean_records`` returns. Each pass copies the frame, rebuilds the
    text columns as Python objects and adds a concatenated ``tag``; every pass
    stays alive in ``history``, so memory grows pass by pass (~2 KB per row at 12).
    """
    history = [df]
    for _ in range(copies):
        frame = history[-1].copy()
        # notes as Python objects, padded: a new ~100-byte string per row and pass
        frame["note"] = frame["note"].astype(object) + " "
        history.append(frame)
    return clean_records(history[-1])


# -- the demo workflows -------------------------------------------------------------------------

def _schema_yaml() -> str:
    cols = ", ".join(f"{name}: {{dtype: {spec['dtype']}, nullable: {str(spec['nullable']).lower()}}}"
                     for name, spec in DEMO_SCHEMA.items())
    return "{" + cols + "}"


PIPELINE = f"""\
name: data-pipeline
version: 1.1.0
parameters: {{input_path: records.csv, output_path: out/clean.parquet}}
defaults: {{chunk_size: 100000, max_memory: 512MB, retries: 0}}
steps:
  - name: extract-data
    action: data.extract
    params: {{path: "{{input_path}}", streaming: true}}
  - name: validate-schema
    action: data.validate
    needs: [extract-data]
    params:
      schema: {_schema_yaml()}
  - name: transform-data
    action: data.transform_streaming
    needs: [validate-schema]
    params: {{function: demo.clean_records}}
  - name: load-data
    action: data.load
    needs: [transform-data]
    params: {{path: "{{output_path}}"}}
"""

#: the seed's first attempt: the transform loads all data at once
OOM = PIPELINE.replace("""    action: data.transform_streaming
    needs: [validate-schema]
    params: {function: demo.clean_records}""", """    action: demo.enrich_in_memory      # keeps every intermediate copy
    needs: [validate-schema]
    params: {streaming: false, max_memory: 512MB}""").replace("version: 1.1.0", "version: 1.0.0")


def ensure_records(folder: Path, rows: int, seed: int = 0) -> Path:
    """The demo's input file, generated once per (rows, seed)."""
    path = folder / "records.csv"
    stamp = folder / ".records.csv.rows"
    if not (path.exists() and stamp.exists() and stamp.read_text() == f"{rows} {seed}"):
        print(f"generating {rows:,} records in {path} ...", flush=True)
        generate_records(path, rows=rows, seed=seed)
        stamp.write_text(f"{rows} {seed}")
    return path


def run_demo(rows: int = 1_000_000, folder: Path = Path("nbflow-demo"), scenario: str = "pipeline",
             store: str | os.PathLike | None = None) -> int:
    """``nbflow demo``: generate the data and run the pipeline (or the out-of-memory story)."""
    from nbflow.handle import run

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ensure_records(folder, rows)
    store = store or folder / ".nbflow"
    name = "workflow.yaml" if scenario == "pipeline" else "workflow-oom.yaml"
    (folder / name).write_text(PIPELINE if scenario == "pipeline" else OOM)
    handle = run(folder / name, workdir=folder, store=store)
    print()
    print(handle.summary())
    if scenario == "pipeline" or handle.status != "failed":
        return 0 if handle.status == "completed" else 1
    fixed = handle.apply_fix(0)  # the diagnosis' top fix, computed from what the failure measured
    (folder / "workflow-fixed.yaml").write_text(fixed.text)
    print(f"\nApplying fix 1 ({folder / 'workflow-fixed.yaml'}) and rerunning:\n")
    handle.rerun(fixed)
    print()
    print(handle.summary())
    return 0 if handle.status == "completed" else 1
