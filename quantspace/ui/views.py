"""What the page shows, as plain functions of the pipeline's results (markdown, the log, the plot's rows)."""

from __future__ import annotations

import re
import time
from typing import Any

from ..preflight import PreflightResult
from ..report import format_number, format_size


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def preflight_markdown(pre: PreflightResult) -> str:
    """The preflight panel: what was found, the size of every variant, disk and hardware fit, problems."""
    lines: list[str] = []
    if pre.architecture:
        params = f" · {_count(pre.parameters)} parameters" if pre.parameters else ""
        lines.append(f"**{pre.source}** · {pre.architecture}{params}")
        lines.append("")
    lines += [f"- ✅ {c}" for c in pre.checks]
    if pre.sizes:
        lines += ["", f"| {pre.method.upper()} variant | Expected size |", "|---|---:|"]
        lines += [f"| {v} | {format_size(s)} |" for v, s in pre.sizes.items()]
    facts = []
    if pre.download_bytes:
        facts.append(f"download {format_size(pre.download_bytes)}")
    if pre.disk_needed is not None:
        facts.append(f"disk needed ≈ {format_size(pre.disk_needed)}")
    hw = pre.hardware.get("kind")
    if hw == "zerogpu" and pre.gpu_seconds is not None:
        facts.append(f"ZeroGPU window ≈ {pre.gpu_seconds} s per GPU stage")
    elif hw == "cuda":
        facts.append(f"GPU: {pre.hardware.get('gpu_name')}")
    elif hw == "cpu":
        facts.append("runs on the CPU")
    if facts:
        lines += ["", " · ".join(facts)]
    if pre.problems:
        lines += [""] + [f"- ❌ {p}" for p in pre.problems]
    elif pre.ok:
        lines += ["", "**Ready.** Nothing has been downloaded yet."]
    return "\n".join(lines)


def card_body(card: str) -> str:
    """The model card without its YAML front matter (the page renders the text, the Hub reads the metadata)."""
    return re.sub(r"\A---\n.*?\n---\n", "", card, count=1, flags=re.S).lstrip()


def plot_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per file: size against KL divergence from the source (lower is better)."""
    rows = []
    for f in report.get("files", []):
        metrics = f.get("metrics") or {}
        if metrics.get("kld_mean") is None:
            continue
        rows.append({
            "variant": f["variant"], "file": f["filename"], "size_mb": round(f["size_bytes"] / 1e6, 2),
            "kld": metrics["kld_mean"], "delta_ppl": metrics.get("delta_ppl"),
            "top1": metrics.get("top1_agreement"),
        })
    return rows


def result_markdown(report: dict[str, Any]) -> str:
    """The headline of a finished job: where the files went and one line per file."""
    if report.get("repo_url"):
        head = f"### ✅ Pushed to [{report['repo_id']}]({report['repo_url']})"
    else:
        head = "### ✅ Done (not pushed): download the files below"
    lines = [head, "", "| File | Size | Bits/w | ΔPPL | KLD | Top-1 |", "|---|---:|---:|---:|---:|---:|"]
    for f in report.get("files", []):
        m = f.get("metrics") or {}
        lines.append(f"| {f['filename']} | {format_size(f['size_bytes'])} | {f['bits_per_weight']:.2f} | "
                     f"{format_number(m.get('delta_ppl'), '+.4f')} | {format_number(m.get('kld_mean'), '.5f')} | "
                     f"{format_number(m.get('top1_agreement'), '.1%')} |")
    return "\n".join(lines)


class Log:
    """The live log: one line per stage, its progress updated in place, with the elapsed time."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.stage: str | None = None
        self.started = time.monotonic()

    def _stamp(self) -> str:
        s = int(time.monotonic() - self.started)
        return f"[{s // 60:02d}:{s % 60:02d}]"

    def update(self, stage: str, done: int, total: int) -> None:
        if total > 1 and done < total:
            step = f" {done}/{total}" if total <= 1000 else f" {100 * done // total}%"   # bytes: a percentage
        else:
            step = " done" if done >= total > 0 else ""
        line = f"{self._stamp()} {stage}{step}"
        if stage == self.stage and self.lines:
            self.lines[-1] = line
        else:
            self.lines.append(line)
            self.stage = stage

    def note(self, text: str) -> None:
        self.lines.append(f"{self._stamp()} {text}")
        self.stage = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def job_link(job_id: str, owner: str | None, retention_s: float) -> str:
    """The link to a job, shown once it starts: the way back to it after closing the tab or from elsewhere."""
    who = (f"signed in as **{owner}**" if owner else
           "with this link alone (you are not signed in, so anyone who has it can open it: keep it to yourself)")
    return (f"**Job** [`{job_id[:8]}…`](?job={job_id}) · it keeps running if you close this tab: open "
            f"[this link](?job={job_id}) again, here or on another device, {who}, to see its progress and "
            f"result. Results are kept for {retention_s / 3600:g} h after the job ends.")
