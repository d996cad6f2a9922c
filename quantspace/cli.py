"""`python -m quantspace quantize|estimate|architectures`: a thin shell over the pipeline with progress bars."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .errors import QuantSpaceError
from .report import format_number, format_size


class _Bars:
    """One tqdm bar per pipeline stage, closed when the next stage starts."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = None
        self._stage: str | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = self._tqdm(total=total, desc=f"{stage:<18}", unit="", leave=True, file=sys.stderr,
                                   bar_format="{desc} {percentage:3.0f}%|{bar:30}| {elapsed}")
        assert self._bar is not None
        if total != self._bar.total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Lines:
    """Progress as plain log lines (in a Hugging Face Job, whose log the caller parses): one per stage start and
    per tenth of it, at most one every two seconds within a stage."""

    def __init__(self) -> None:
        self._last: tuple[str, int, float] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        import time

        now, tenth = time.monotonic(), (10 * done) // max(1, total)
        if self._last and self._last[0] == stage and (self._last[1] == tenth or now - self._last[2] < 2) \
                and done < total:
            return
        self._last = (stage, tenth, now)
        print(f"[quantspace] stage={stage} done={done} total={total}", flush=True)

    def close(self) -> None:
        pass


def _table(report) -> str:
    w = max([len("source")] + [len(f.filename) for f in report.files])
    head = f"{'file':<{w}} {'size':>10} {'bpw':>6} {'PPL':>9} {'ΔPPL':>9} {'KLD':>8} {'top-1':>7}"
    lines = [head, "-" * len(head)]
    if report.source_metrics:
        lines.append(f"{'source':<{w}} {'':>10} {'':>6} {report.source_metrics['perplexity']:>9.4f}")
    for f in report.files:
        m = f.metrics or {}
        fmt = lambda key, spec: format_number(m.get(key), spec)  # noqa: E731
        top1 = f"{100 * m['top1_agreement']:.2f}%" if m.get("top1_agreement") is not None else "–"
        lines.append(f"{f.filename:<{w}} {format_size(f.size_bytes, 1):>10} {f.bits_per_weight:>6.2f} "
                     f"{fmt('perplexity', '.4f'):>9} {fmt('delta_ppl', '+.4f'):>9} {fmt('kld_mean', '.5f'):>8} "
                     f"{top1:>7}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from .formats import REGISTRY

    p = argparse.ArgumentParser(prog="python -m quantspace", description="Quantize Hugging Face models, measured.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="make quantized files, measure them, optionally push to the Hub")
    q.add_argument("source", help="Hub repo id (owner/name[@revision]) or a local model folder")
    q.add_argument("--method", default="gguf", help=f"output format: {', '.join(REGISTRY)} (default: gguf)")
    q.add_argument("--variants", default=None, help="comma-separated, e.g. Q4_K_M,Q8_0 for gguf, W4G64 for awq, "
                   "FP4 for nf4 (default: the method's usual choice)")
    q.add_argument("--out", default=None, help="output folder (default: ./quantspace-out/<name>-<SUFFIX>/)")
    q.add_argument("--push", default=None, metavar="OWNER/NAME", help="push the result to this Hub repo")
    q.add_argument("--private", action="store_true", help="create the pushed repo as private")
    q.add_argument("--eval-text", default=None, metavar="FILE", help="evaluation text (default: shipped text)")
    q.add_argument("--no-eval", action="store_true", help="skip the accuracy measurement")
    q.add_argument("--ctx", type=int, default=512, help="evaluation context length (default 512)")
    q.add_argument("--chunks", type=int, default=16, help="evaluation chunks, at most (default 16)")
    q.add_argument("--allow-pickle", action="store_true", help="accept pickled .bin weights (loaded weights-only)")
    q.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where GPU-capable methods compute (default: cuda when present, else cpu)")
    jobs = q.add_argument_group("Hugging Face Jobs (the same job on a machine billed to your account)")
    jobs.add_argument("--on-hf-jobs", nargs="?", const="auto", default=None, metavar="FLAVOR",
                      help="run on Hugging Face Jobs: a flavor (cpu-upgrade, l4x1, a100-large...) or, without one, "
                      "the cheapest that fits the job")
    jobs.add_argument("--job-timeout", default=None, metavar="DURATION",
                      help="stop the Job after this long (90m, 3h; default: three times the estimate, 30m at least)")
    jobs.add_argument("--namespace", default=None, help="user or organisation the Job runs in and is billed to "
                      "(default: you)")
    jobs.add_argument("--job-image", default=None, metavar="IMAGE", help="image with this version of QuantSpace "
                      "(default: the Space's own on a Space, else $QUANTSPACE_JOB_IMAGE)")
    jobs.add_argument("--detach", action="store_true", help="print the Job's id and link and return")
    jobs.add_argument("--yes", action="store_true", help="start without asking (needed when not on a terminal)")
    _format_flags(q)
    e = sub.add_parser("estimate", help="parameter count and output sizes, without downloading weights")
    e.add_argument("source")
    e.add_argument("--method", default="gguf", help=f"output format: {', '.join(REGISTRY)} (default: gguf)")
    e.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("architectures", help="the model architectures each method supports")
    sub.add_parser("jobs-hardware", help="Hugging Face Jobs flavors and their prices, as the Hub lists them")
    return p


def _format_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per format-specific option, from each format's option table."""
    from .formats import REGISTRY, get_format

    seen: set[str] = set()
    for method in REGISTRY:
        fmt = get_format(method)
        if not fmt.options:
            continue
        group = parser.add_argument_group(f"{method} options")
        for opt in fmt.options:
            if opt.name in seen:
                continue
            seen.add(opt.name)
            choices = f" ({'/'.join(map(str, opt.choices))})" if opt.choices else ""
            group.add_argument(opt.flag, dest=f"opt_{opt.name}", default=None, metavar=opt.name.upper(),
                               help=f"{opt.help}{choices}; default {opt.default}")


def _chosen_options(args: argparse.Namespace) -> dict[str, object]:
    """The option flags given on the command line; the pipeline checks they belong to the method."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.getLogger("gguf").setLevel(logging.ERROR)
    try:
        if args.command == "estimate":
            return _estimate(args)
        if args.command == "architectures":
            return _architectures()
        if args.command == "jobs-hardware":
            from .hf_jobs import flavors
            from .hub import resolve_token

            for f in flavors(resolve_token(None) or None):
                print(f"{f.label}  = ${f.usd_per_minute:.5f}/min")
            return 0
        return _quantize(args)
    except QuantSpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; partial files were removed", file=sys.stderr)
        return 130


def _estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate

    est = estimate(args.source, method=args.method)
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
        return 0
    print(f"{est.source}: {est.architecture}, {est.parameters / 1e6:.1f}M parameters, "
          f"{format_size(est.source_bytes, 1)} of weights")
    for variant, size in est.sizes.items():
        print(f"  {variant:<8} {format_size(size, 1):>10}  ({8 * size / max(1, est.parameters):.2f} bits/weight)")
    return 0


def _architectures() -> int:
    from .archs import supported
    from .converter import llama_cpp

    ours = supported("gguf")
    others = sorted(llama_cpp.architectures() - set(ours))
    print(f"gguf, QuantSpace's streaming converter ({len(ours)}): {', '.join(ours)}")
    print(f"gguf, llama.cpp's convert_hf_to_gguf.py of llama-cpp-python {llama_cpp.llama_cpp_version()} "
          f"({len(others)}): {', '.join(others)}")
    print(f"awq ({len(supported('awq'))}): {', '.join(supported('awq'))}")
    print("nf4: any causal LM transformers loads without remote code (multimodal: the language model)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    import os

    from .pipeline import quantize

    if args.on_hf_jobs:
        from .cli_jobs import run_on_jobs

        return run_on_jobs(args, _chosen_options(args), _table)
    bars = _Lines() if os.environ.get("QUANTSPACE_PROGRESS") == "lines" else _Bars()
    try:
        report = quantize(args.source, method=args.method, variants=args.variants, out=args.out, push=args.push,
                          private=args.private, eval_text=args.eval_text, no_eval=args.no_eval, ctx=args.ctx,
                          max_chunks=args.chunks, allow_pickle=args.allow_pickle, progress=bars,
                          options=_chosen_options(args), device=args.device)
    finally:
        bars.close()
    print(_table(report))
    if report.repo_url:
        print(f"\npushed: {report.repo_url}")
    return 0
