"""A step's memory as a function of the records it holds, fitted to what a failure measured.

Fixes are computed from it, not guessed: the chunk_size whose estimated peak stays
within 60% of the budget, the max_memory the step needs to run as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nbflow.diagnose import TARGET, nice_down, records
from nbflow.units import format_size

if TYPE_CHECKING:
    from nbflow.causes import Context

#: copies of a chunk's data the engine holds beside the function's own memory: the part as
#: read (Arrow table, then pandas), the output pieces and their concatenation, the Parquet
#: write. Measured on the seed transform: counting one copy, real peaks were 1.3× the estimate
#: (60,000 and 30,000 records per chunk); counting three, 0.9× (50,000 and 8,000), and 0.85×
#: for the whole 1,000,000 records in memory.
DATA_COPIES = 3


@dataclass
class MemoryModel:
    """Bytes a step needs: its function holds ``c × n**k`` for ``n`` records, plus its data.

    In memory: all ``records`` of input concatenated, the function on all of them,
    and the output. Chunked: ``in_flight`` input chunks of up to ``part`` records
    (a chunk-wise step works on its input's chunks; ``chunk_size`` cuts each into
    pieces the function sees), each with its output and the function's memory for
    one piece. The data is counted ``DATA_COPIES`` times.
    """

    budget: int | None
    records: int | None
    part: int | None
    parts: int
    b_in: float
    b_out: float
    in_flight: int
    c: float = 0.0
    k: float = 1.0
    source: str = ""
    lower_bound: bool = True
    n_failed: int | None = None  # records the function held (per chunk) when it failed

    def cost(self, n: float) -> float:
        return self.c * max(n, 0) ** self.k

    def per_record(self, n: float | None = None) -> float:
        n = n or self.n_failed or 1
        return self.cost(n) / n

    def chunked(self, n: int) -> float:
        piece = min(n, self.part) if self.part else n
        held = (self.part or piece) * (self.b_in + self.b_out) * DATA_COPIES
        return self.in_flight * (held + self.cost(piece))

    def in_memory(self) -> float:
        n = self.records or 0
        return n * (self.b_in + self.b_out) * DATA_COPIES + self.cost(n)

    def chunk_for(self, share: float = TARGET) -> int | None:
        """The largest round chunk_size whose estimated peak is at most ``share`` of the budget."""
        if not self.budget or self.c <= 0:
            return None
        room = share * self.budget / self.in_flight - (self.part or 0) * (self.b_in + self.b_out) * DATA_COPIES
        if room <= 0:
            return None
        n = (room / self.c) ** (1 / self.k)
        size = nice_down(min(n, self.part) if self.part else n)
        return size or None


def memory_model(ctx: Context) -> MemoryModel | None:
    if not ctx.is_memory:
        return None
    facts = list(ctx.inputs.values())
    total = ctx.rec.records_in or (sum(f["records"] for f in facts) if facts else None)
    part = max((f["chunk_records"]["max"] for f in facts), default=None)
    parts = sum(f["chunks"] for f in facts) or 1
    b_in = float(facts[0].get("bytes_per_record") or 0) if facts else 0.0
    b_out = float((ctx.probe or {}).get("output_bytes_per_record") or b_in)
    chunk = ctx.rec.chunk_size
    if ctx.mode == "in-memory":
        n_mem, flight_now = total, 1
    else:
        n_mem = min(x for x in (chunk, part) if x) if (chunk or part) else None
        flight_now = min(ctx.parallel, parts)
    model = MemoryModel(budget=ctx.budget, records=total, part=part, parts=parts, b_in=b_in, b_out=b_out,
                        in_flight=min(ctx.parallel, parts), n_failed=n_mem)
    growth = ctx.details.get("peak") or ctx.memory.get("peak_above_baseline")
    alloc = ctx.evid.get("allocation")
    if alloc and n_mem and (k := sum(1 for d in alloc["shape"] if d == n_mem)):
        model.c, model.k = alloc["bytes"] / n_mem ** k, float(k)
        dims = " × ".join(f"{d:,}" for d in alloc["shape"])
        model.source = f"the allocation that failed ({dims} {alloc['dtype']})"
        model.lower_bound = False
    elif ctx.probe:
        n2, p2 = ctx.probe["rows"][1], ctx.probe["peaks"][1]
        exponent = ctx.probe["exponent"]
        model.k = 1.0 if exponent < 1.4 else round(exponent * 2) / 2
        model.c = p2 / n2 ** model.k
        model.source = f"a probe of {ctx.function} on {n2:,} records"
        model.lower_bound = False
    if growth and n_mem:
        # what it held when stopped: the function's share, after the data it was given
        held = n_mem * b_in if ctx.mode == "in-memory" else flight_now * (part or n_mem) * b_in
        floor_c = max(growth - held, growth / 2) / (flight_now * n_mem)
        if model.c <= 0:
            model.c, model.k = floor_c, 1.0
            model.source = (f"the {format_size(growth)} it reached for {records(n_mem)} records before "
                            "it was stopped (a lower bound)")
        elif ctx.error_class == "MemoryBudgetExceeded" and model.cost(n_mem) < floor_c * n_mem:
            model.c *= floor_c * n_mem / model.cost(n_mem)
            model.source += f", scaled up to the {format_size(growth)} it reached before it was stopped"
    return model if model.c > 0 else None
