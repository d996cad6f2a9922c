"""The model card (README.md) of a quantized repo, built from the report alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from .chart import CHART_NAME, has_chart
from .report import Report, format_number, format_size

if TYPE_CHECKING:
    from .formats import Format

QUANTIZED_BY = "QuantSpace"


def metrics_table(report: Report) -> str:
    rows = ["| File | Type | Size | Bits/weight | PPL | ΔPPL | KLD | Top-1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    src = report.source_metrics
    if src:
        ppl = format_number(src.get("perplexity"), ".4f")
        rows.append(f"| source ({report.source}) | original | – | – | {ppl} | – | – | – |")
    for f in report.files:
        m = f.metrics or {}
        top1 = m.get("top1_agreement")
        more = len(f.files) - 1 if f.files else 0
        parts = f" (+{more} more file{'s' if more > 1 else ''})" if more else ""
        rows.append(
            f"| `{f.filename}`{parts} | {f.variant} | {format_size(f.size_bytes)} | {f.bits_per_weight:.2f} "
            f"| {format_number(m.get('perplexity'), '.4f')} | {format_number(m.get('delta_ppl'), '+.4f')} "
            f"| {format_number(m.get('kld_mean'), '.5f')} | {'–' if top1 is None else f'{100 * top1:.2f}%'} |"
        )
    return "\n".join(rows)


def split_files(report: Report) -> str:
    """The files of each variant written in several (split GGUF shards, safetensors shards), first first."""
    split = [f for f in report.files if f.files and len(f.files) > 1]
    if not split:
        return ""
    lines = ["", "Written in several files (the size above is all of them together; see Usage for loading):", ""]
    for f in split:
        lines.append(f"- {f.variant} ({format_size(f.size_bytes)}): " + ", ".join(f"`{n}`" for n in f.files))
    return "\n".join(lines) + "\n"


def _chart(report: Report) -> str:
    """The size-vs-KLD picture, written beside the card when two files or more were measured."""
    return f"\n![Size vs KL divergence]({CHART_NAME})\n" if has_chart(report) else ""


def _method(report: Report) -> str:
    ev = report.evaluation
    if ev is None:
        return "Accuracy was not measured for this upload (`--no-eval`)."
    return (
        f"Measured by QuantSpace on **{ev.text_source}**: {ev.chunks} chunks of {ev.ctx} tokens, "
        f"{ev.n_tokens} scored tokens per model. {ev.method}\n\n"
        "- **PPL**: perplexity on that text (lower is better).\n"
        "- **ΔPPL**: PPL of the file minus PPL of the source model.\n"
        "- **KLD**: mean Kullback–Leibler divergence of the file's next-token distribution from the "
        "source's (nats; 0 = identical).\n"
        "- **Top-1**: how often the file's most likely next token equals the source's."
    )


def _notes(fmt: "Format", report: Report) -> str:
    notes = fmt.card_notes(report).strip()
    return f"\n{notes}\n" if notes else ""


def build_card(report: Report, fmt: "Format") -> ModelCard:
    data = ModelCardData(
        base_model=report.source if "/" in report.source else None,
        license=report.license,
        library_name=fmt.library_name,
        tags=fmt.tags([f.variant for f in report.files]),
        base_model_relation="quantized",
        quantized_by=QUANTIZED_BY,
        pipeline_tag="text-generation",
    )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(report.versions.items()))
    source_line = f"[{report.source}](https://huggingface.co/{report.source})" if "/" in report.source \
        else f"`{report.source}`"
    revision = f" at revision `{report.revision}`" if report.revision else ""
    body = f"""
# {report.name}

{fmt.title} quantization{"s" if len(report.files) > 1 else ""} of {source_line}{revision} ({report.architecture}, \
{report.parameters / 1e6:.1f}M parameters), with the accuracy each file keeps, measured.

## Files and accuracy

{metrics_table(report)}
{split_files(report)}{_chart(report)}
## How the numbers were measured

{_method(report)}

## Usage

{fmt.usage(report.repo_id, report)}
{_notes(fmt, report)}
## Reproduce

Made with QuantSpace ({versions}).

```sh
{report.command}
```

The machine-readable report, with timings, is in [`quantspace.json`](quantspace.json).
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
