"""GGUF --fit: write the fitted file (the optimiser is quantspace/fit.py), predict its size, describe it on the card.

The user's own per-tensor types (output, embedding, REGEX=TYPE) are kept: they come before the ladder's pattern,
so a tensor they name has one type in every candidate file and is a fixed cost to the optimiser.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..converter.tensor_types import ModelFacts, Overrides, Tensors, choose_types, file_bytes, tensor_bytes
from ..errors import QuantizeError
from ..fit import LADDER, budget_label, choose, file_budget, ladders, measure_candidate, too_small

if TYPE_CHECKING:
    from ..imatrix import Imatrix
    from ..report import Report


def with_ladder(user: Overrides, qtype: Any) -> Overrides:
    """The user's overrides first, then every other weight at `qtype` (where its rows allow)."""
    return Overrides(output=user.output, embedding=user.embedding, patterns=(*user.patterns, (".", qtype)))


def fit_bounds(tensors: Tensors, facts: ModelFacts, imatrix: bool, user: Overrides, kv: int) -> tuple[int, int]:
    """The smallest and the largest file the optimiser can choose: every weight at its cheapest, or its dearest,
    ladder type (as llama.cpp would write each, fallbacks included)."""
    per_type = [choose_types(tensors, ftype, facts, imatrix, with_ladder(user, qtype)) for qtype, ftype in LADDER]

    def pick(best: Any) -> dict[str, Any]:
        return {name: best((t[name] for t in per_type), key=lambda q: tensor_bytes(shape, q))
                for name, (shape, _) in tensors.items()}

    return file_bytes(tensors, pick(min), kv), file_bytes(tensors, pick(max), kv)


def fit_size(fit: str, config: dict[str, Any], tensors: Tensors, facts: ModelFacts, imatrix: bool,
             user: Overrides, kv: int) -> int:
    """The fitted file's expected size, before any download; BadOptionError when even the smallest does not fit."""
    budget, _ = file_budget(fit, config)
    smallest, largest = fit_bounds(tensors, facts, imatrix, user, kv)
    if smallest > budget:
        raise too_small(fit, smallest, budget)
    return min(budget, largest)


def fit_file(f16: Path, path: Path, fit: str, config: dict[str, Any], imatrix: "Imatrix | None",
             user: Overrides, work: Path, stage: Any) -> dict[str, Any]:
    """Quantize the F16 file once per ladder type, measure each weight's error in each, choose the types, write
    `path` with them; returns the report's details (the recipe). BadOptionError when the budget is too small."""
    from .gguf import llama_quantize

    budget, how = file_budget(fit, config)
    label = budget_label(fit)
    measured = []
    tick = stage(f"{label}: quantize and measure candidates")
    for i, (qtype, ftype) in enumerate(LADDER):
        tick(i, len(LADDER))
        candidate = work / f".{path.stem}-candidate-{qtype.name}.gguf"
        try:   # one candidate file on disk at a time
            llama_quantize(f16, candidate, ftype, imatrix=imatrix, overrides=with_ladder(user, qtype))
            measured.append(measure_candidate(f16, candidate, imatrix))
        finally:
            candidate.unlink(missing_ok=True)
    tick(len(LADDER), len(LADDER))
    options, fixed = ladders(f16, measured)
    plan = choose(options, fixed, budget, fit.strip())
    counts: dict[Any, int] = {}
    for t in plan.types.values():
        counts[t] = counts.get(t, 0) + 1
    common = max(counts, key=lambda t: counts[t]) if counts else LADDER[-1][0]
    ftype = next((f for q, f in LADDER if q == common), LADDER[-1][1])
    tick = stage(f"quantize {label}")
    tick(0, 1)
    final = Overrides(output=user.output, embedding=user.embedding, patterns=(*user.patterns, *plan.overrides()))
    llama_quantize(f16, path, ftype, imatrix=imatrix, overrides=final)
    tick(1, 1)
    size = path.stat().st_size
    if size > budget:   # the plan keeps a padding margin, so this means llama.cpp chose otherwise than measured
        path.unlink()
        raise QuantizeError(f"The {label} file came out at {size} bytes, over its budget of {budget}: llama.cpp "
                            "did not write the measured types. Nothing was kept.")
    return {"fit_budget_bytes": budget, "fit_budget": how, "fit_expected_bytes": plan.expected_bytes,
            "fit_smallest_bytes": plan.smallest_bytes, "fit_weighted_error": plan.error, "recipe": plan.recipe()}


def fit_note(report: "Report") -> str:
    """Card lines: what the FIT file is and how it compares with the stock variants."""
    from ..report import format_number, format_size

    lines = []
    stock = [f for f in report.files if not (f.details or {}).get("fit_budget_bytes")]
    for f in report.files:
        d = f.details or {}
        if not d.get("fit_budget_bytes"):
            continue
        kld = (f.metrics or {}).get("kld_mean")
        mix = ", ".join(f"{n} × {t}" for t, n in (d.get("tensor_type_counts") or {}).items() if t != "F32")
        budget = d.get("fit_budget") or f"a budget of {format_size(d['fit_budget_bytes'])}"
        if not budget.startswith("a budget"):   # a device: what is left for the file, and why
            budget = f"{format_size(d['fit_budget_bytes'])} ({budget})"
        line = (f"`{f.filename}` is the file fitted to {budget}: each weight's type (Q2_K to Q8_0) was chosen to "
                "minimise its importance-weighted quantization error, measured on the calibration text, within "
                f"that ({mix}; the full recipe is in `quantspace.json`). It is {format_size(f.size_bytes)}")
        if kld is not None:
            line += f" with a KLD of {format_number(kld, '.5f')}"
            near = [s for s in stock if (s.metrics or {}).get("kld_mean") is not None]
            smaller = max((s for s in near if s.size_bytes <= f.size_bytes), key=lambda s: s.size_bytes, default=None)
            larger = min((s for s in near if s.size_bytes > f.size_bytes), key=lambda s: s.size_bytes, default=None)
            cmp = [f"{s.variant} ({format_size(s.size_bytes)}, KLD {format_number(s.metrics['kld_mean'], '.5f')})"
                   for s in (smaller, larger) if s is not None]
            if cmp:
                line += "; the stock files beside it: " + ", ".join(cmp)
        lines.append(line + ".")
    return "\n\n".join(lines)
