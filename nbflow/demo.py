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
            if writer is not None:
                writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@action("demo.clean_records", kind="chunk")
def clean_records(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy notes and countries, drop rows without an amount, flag refunds, add amount_eur."""
    out = df.loc[df["amount"].notna()].copy()
    out["note"] = (out["note"].astype("str").str.strip().str.lower()
                   .str.replace(r"\s+", " ", regex=True))
    out["country"] = out["country"].astype("str").str.strip().str.upper().fillna("??")
    out["country"] = out["country"].where(out["country"] != "", "??")
    out["refund"] = out["amount"] < 0
    out["timestamp"] = pd.to_datetime(out["timestamp"], format="ISO8601")
    # mapping the categories (a dozen) rather than every row is ~10x cheaper
    rate = out["category"].astype("category").map(RATES).astype("float64")
    out["amount_eur"] = (out["amount"] * rate).round(2)
    return out.loc[:, list(CLEAN_COLUMNS)].reset_index(drop=True)


@action("demo.enrich_in_memory", kind="chunk")
def enrich_in_memory(df: pd.DataFrame, copies: int = 12) -> pd.DataFrame:
    """The first version everyone writes: every intermediate frame kept "just in case".

    Same result as ``clean_records``; memory grows with every copy because each
    is kept alive in ``history`` and carries Python-object string columns.
    """
    history = [df]
    current = df
    for i in range(copies):
        current = current.copy()
        current["note"] = current["note"].astype(object)
        current["user"] = current["user"].astype(object)
        current[f"label_{i}"] = current["user"] + " / " + current["note"].fillna("") + f" #{i}"
        current[f"key_{i}"] = current["id"].astype(str).astype(object) + ":" + current["category"].astype(object)
        history.append(current)
    result = clean_records(history[0])
    del history, current
    return result
