"""resolve/validate → fetch → quantize → evaluate → card → push. The CLI and the UI are shells over this."""

from __future__ import annotations

import datetime as _dt
import errno
import importlib.metadata
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import diskplan, scratch
from .card import build_card
from .chart import write_chart
from .formats import (Context, Format, GpuRunner, Output, TensorStats, check_options, get_format, resolve_device,
                      run_directly)
from .errors import BadOptionError, DiskFullError
from .hub import Token, check_target, push_folder, repo_url, resolve_token
from .report import EvalInfo, FileResult, Report, format_size
from .source import SourceInfo, card_license, fetch, resolve
from .weights import all_entries, safetensors_from_pickle

if TYPE_CHECKING:
    from .evaluate import EvalSettings, EvalText

# (stage, done, total): one call per step of a stage; a new stage name starts a new bar.
ProgressFn = Callable[[str, int, int], None]
LIBRARIES = ("gguf", "llama_cpp_python", "transformers", "torch", "huggingface_hub")


def versions() -> dict[str, str]:
    from . import __version__

    out = {"quantspace": __version__}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def parameter_count(model_dir: Path) -> int:
    return sum(e.n_elements for e in all_entries(model_dir))


def command_args(source: str, fmt: Format, variants: Sequence[str], options: dict[str, Any], push: str | None,
                 private: bool, eval_text: str | None, no_eval: bool) -> list[str]:
    """The arguments of `python -m quantspace quantize` for this job (checked `options`: those not at their
    default), for the card and for a Hugging Face Job."""
    parts = [source, "--method", fmt.name, "--variants", ",".join(variants)]
    for opt in fmt.options:
        value = options[opt.name]
        if value != opt.default:
            parts += [opt.flag, str(value).lower() if isinstance(value, bool) else str(value)]
    if push:
        parts += ["--push", push] + (["--private"] if private else [])
    if no_eval:
        parts.append("--no-eval")
    elif eval_text:
        parts += ["--eval-text", eval_text]
    return parts


def _command(source: str, fmt: Format, variants: list[str], options: dict[str, Any], push: str | None,
             private: bool, eval_text: str | None, no_eval: bool) -> str:
    return shlex.join(["python", "-m", "quantspace", "quantize",
                       *command_args(source, fmt, variants, options, push, private, eval_text, no_eval)])


class _Stages:
    """Times each stage and forwards ticks to the caller's progress function."""

    def __init__(self, progress: ProgressFn | None):
        self.progress = progress
        self.timings: dict[str, float] = {}
        self._current: str | None = None
        self._started = 0.0

    def __call__(self, name: str) -> Tick:
        self._close()
        self._current, self._started = name, time.perf_counter()

        def tick(done: int, total: int) -> None:
            if self.progress:
                self.progress(name, done, total)

        tick(0, 1)
        return tick

    def _close(self) -> None:
        if self._current is not None:
            self.timings[self._current] = round(time.perf_counter() - self._started, 3)
            self._current = None

    def finish(self) -> dict[str, float]:
        self._close()
        return self.timings


def quantize(
    source: str,
    method: str = "gguf",
    variants: Sequence[str] | str | None = None,
    out: str | Path | None = None,
    push: str | None = None,
    private: bool = False,
    eval_text: str | Path | None = None,
    no_eval: bool = False,
    token: Token = None,
    allow_pickle: bool = False,
    ctx: int = 512,
    max_chunks: int = 16,
    progress: ProgressFn | None = None,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    run_gpu: GpuRunner = run_directly,
    gpu_window_s: float | None = None,
    on_hf_jobs: str | None = None,
    job_timeout: str | int | None = None,
    namespace: str | None = None,
    job_image: str | None = None,
) -> Report:
    """Quantize `source` (Hub repo id[@revision] or local folder) and return the report.

    Every check that can fail cheaply (options, token, target namespace, architecture, tokenizer, weights)
    runs before the download. Files are written to `out`; with `push`, they go to the Hub in one commit.
    `options` are the method's own (see `get_format(method).options`); `device` is auto, cpu or cuda;
    `run_gpu` runs the GPU stages (the Space passes a ZeroGPU-decorated runner, and the length of one of its
    windows as `gpu_window_s`, so long stages can split their work).

    `on_hf_jobs` (a flavor, or "auto" for the cheapest that fits) runs the same job on Hugging Face Jobs, billed
    to `namespace` (default: the token's user), in `job_image` (quantspace.hf_jobs.default_image), stopped after
    `job_timeout`; it always pushes (to `push`, default NAMESPACE/<model>-<SUFFIX>) and returns the pushed report.
    """
    from .evaluate import EvalSettings, load_eval_text

    if on_hf_jobs:
        from .hf_jobs import submit

        if out is not None or eval_text is not None:
            raise BadOptionError("A Job cannot write to this machine's folders or read its files: leave out `out` "
                                 "and `eval_text` (the result is pushed).")
        job = submit(source, method, variants, token=resolve_token(token), flavor=on_hf_jobs, push=push,
                     private=private, no_eval=no_eval, ctx=ctx, max_chunks=max_chunks, allow_pickle=allow_pickle,
                     options=options, timeout=job_timeout, namespace=namespace, image=job_image)
        return job.follow(progress)

    fmt = get_format(method)
    names = variants.split(",") if isinstance(variants, str) else list(variants or fmt.default_variants)
    reason = fmt.unavailable()
    if reason:
        raise BadOptionError(f"{fmt.name} is not available here: {reason}")
    chosen = fmt.check_variants(names)
    opts = check_options(fmt, options, chosen)
    device = resolve_device(device, fmt)
    settings = EvalSettings(ctx=ctx, max_chunks=max_chunks)   # validates the options
    text = None if no_eval else load_eval_text(eval_text)
    token = resolve_token(token)
    if push:
        check_target(push, token)
    info = resolve(source, token=token, allow_pickle=allow_pickle)
    fmt.check_source(info.config, chosen)

    name = f"{info.name}-{fmt.suffix}"
    out_dir = Path(out) if out else Path("quantspace-out") / name
    out_dir = out_dir.absolute()
    _check_plan(fmt, info, chosen, opts, token, out_dir, settings if text is not None else None)
    # What a killed run of this (or any) job left behind is removed first; nothing of it is reused.
    scratch.sweep(out_dir.parent, _staging_prefix(out_dir))
    scratch.sweep(Path(tempfile.gettempdir()), WORK_PREFIX)
    stages = _Stages(progress)
    # Everything is written into a staging folder next to the output folder (same disk, so moving is
    # instant) and moved in only when the whole job, upload included, has succeeded.
    with _staging(out_dir) as staging, scratch.LockedDir(Path(tempfile.gettempdir()), WORK_PREFIX) as work_dir:
        stage_dir, work = staging.path, work_dir.path
        try:
            model_dir = _fetch(info, token, work, stages)
            job = Context(stage=stages, options=opts, device=device, run_gpu=run_gpu, workdir=work,
                          token=token, gpu_window_s=gpu_window_s)
            outputs = fmt.produce(model_dir, stage_dir, info.name, chosen, job)
            written = [p for o in outputs for p in o.files]
            n_params = parameter_count(model_dir)
            report = Report(
                source=info.display if info.repo_id else info.name, revision=info.revision, method=fmt.name,
                name=name, architecture=info.architecture, parameters=n_params,
                license=info.license or card_license(model_dir / "README.md"),
                options=opts, device=device,
                files=[_file_result(o, n_params) for o in outputs],
                versions=versions(),
                command=_command(info.spec, fmt, chosen, opts, push, private,
                                 str(eval_text) if eval_text else None, no_eval),
                created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            )
            if text is not None:
                _evaluate(fmt, model_dir, outputs, report, text, settings, job)
            stages("card")
            if push:
                report.repo_id, report.repo_url = push, repo_url(push)
            report.timings = stages.finish()
            written.append(report.save(stage_dir))
            chart = write_chart(report, stage_dir)   # the card shows it when it exists
            written += [chart] if chart else []
            card = stage_dir / "README.md"
            build_card(report, fmt).save(card)
            written.append(card)
            if push:
                assert token is not None
                tick = stages("upload")
                push_folder(stage_dir, [p.name for p in written], push, token, private,
                            f"Add {', '.join(chosen)} {fmt.title} of {report.source} (QuantSpace)")
                tick(1, 1)  # the upload's own time is not in the report: the pushed report is the local one
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise _disk_full(exc, fmt, info, chosen, out_dir, work, text is not None, settings, token) from None
            raise
        _publish(stage_dir, written, out_dir)
    return report


WORK_PREFIX = "quantspace-work-"
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _check_plan(fmt: Format, info: SourceInfo, chosen: list[str], opts: dict[str, Any], token: str | None,
                out_dir: Path, settings: "EvalSettings | None") -> None:
    """Sizes from the weights' headers, before the download: refuses what no file can meet (a --fit budget below
    the smallest file) and a job the disks cannot hold. What cannot be sized is left to the steps after."""
    from .estimate import tensor_shapes

    try:
        stats = TensorStats(tensor_shapes(info, token), info.config, info.files, opts)
        sizes = fmt.estimate(stats, chosen)
        disk = diskplan.plan(info, sizes, fmt.work_bytes(stats, chosen, sizes), _scratch(info, settings))
        short = diskplan.shortfall(disk, out_dir, diskplan.hub_cache())
    except BadOptionError:
        raise
    except Exception:  # an estimate is advice; a model it cannot size is still made
        return
    if short:
        raise DiskFullError(short)


def _scratch(info: SourceInfo, settings: "EvalSettings | None") -> int:
    from .preflight import eval_scratch_bytes

    return eval_scratch_bytes(info.config, settings.ctx, settings.max_chunks) if settings is not None else 0


def _staging_prefix(out_dir: Path) -> str:
    return f".quantspace-partial-{out_dir.name}-"


def _staging(out_dir: Path) -> scratch.LockedDir:
    """The staging folder beside `out_dir`; inside it when only the output folder itself is writable."""
    try:
        return scratch.LockedDir(out_dir.parent, _staging_prefix(out_dir))
    except PermissionError:
        scratch.sweep(out_dir, _staging_prefix(out_dir))
        return scratch.LockedDir(out_dir, _staging_prefix(out_dir))


def _publish(stage_dir: Path, written: list[Path], out_dir: Path) -> None:
    """Move the finished files into the output folder; the report and card go last, so a folder that has
    quantspace.json has every file it lists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    last = ("quantspace.json", "README.md")
    for path in sorted(written, key=lambda p: p.name in last):
        target = out_dir / path.relative_to(stage_dir)
        if target.is_dir() and not path.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def _disk_full(exc: OSError, fmt: Format, info: SourceInfo, chosen: list[str], out_dir: Path, work: Path,
               evaluating: bool, settings: "EvalSettings", token: Token) -> DiskFullError:
    """One line naming the disk that filled up and what the job needs there."""
    where = Path(exc.filename).parent if exc.filename else out_dir.parent
    in_work = work in where.parents or where == work
    needed = _disk_needed(fmt, info, chosen, in_work, evaluating, settings, token)
    in_out = where == out_dir.parent or out_dir.parent in where.parents
    place = work.parent if in_work else out_dir.parent if in_out else where   # else: e.g. the Hub cache's disk
    if not (in_work or in_out):
        needed = None
    try:
        free = f"{format_size(shutil.disk_usage(place).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"; this job needs about {format_size(needed)} there" if needed else ""
    if exc.errno == errno.EFBIG:
        return DiskFullError(f"A file in {place} hit this process's file-size limit (ulimit -f){need}: raise the "
                             "limit and run again. Nothing was kept.")
    hint = "set TMPDIR to a bigger disk" if in_work else "pass --out on a bigger disk"
    return DiskFullError(f"Out of disk space in {place} ({free}){need}: free some space or {hint}. "
                         "Nothing was kept.")


def _disk_needed(fmt: Format, info: SourceInfo, chosen: list[str], in_work: bool, evaluating: bool,
                 settings: "EvalSettings", token: Token) -> int | None:
    """Bytes the job writes on the disk that filled: outputs and intermediates next to the output; the evaluation
    scratch in the temp folder."""
    try:
        if in_work:
            return _scratch(info, settings) if evaluating else None
        from .estimate import tensor_shapes

        stats = TensorStats(tensor_shapes(info, token), info.config, info.files)
        sizes = fmt.estimate(stats, chosen)
        return sum(sizes.values()) + fmt.work_bytes(stats, chosen, sizes)
    except Exception:  # the estimate is a courtesy in an error message; never hide the disk error behind it
        return None


def _file_result(output: Output, n_params: int) -> FileResult:
    size = output.size_bytes
    return FileResult(output.path.name, output.variant, size, round(8.0 * size / max(1, n_params), 3),
                      files=[p.name for p in output.weights] if len(output.weights) > 1 else None,
                      details=dict(output.details) or None)


def _fetch(info: SourceInfo, token: str | None, work: Path, stages: _Stages) -> Path:
    tick = stages("download")
    model_dir = fetch(info, token=token)
    tick(1, 1)
    if info.pickled:
        tick = stages("unpickle")
        model_dir = safetensors_from_pickle(model_dir, work / "unpickled")
        tick(1, 1)
    return model_dir


def _evaluate(fmt: Format, model_dir: Path, outputs: list[Output], report: Report, text: "EvalText",
              settings: "EvalSettings", job: Context) -> None:
    from .archs import load_config
    from .evaluate import evaluate_source, method_line, tokenize_for_eval
    from .reference import streamable

    stages = job.stage
    assert job.workdir is not None
    chunks = tokenize_for_eval(model_dir, text, settings)
    device, windows, where = job.layer_walk()
    ref = evaluate_source(model_dir, chunks, settings, job.workdir, text.source, progress=stages("evaluate source"),
                          device=device, windows=windows)
    # The whole model (no layer table, or multimodal) is loaded on the CPU.
    walk = f"layer by layer, {where}" if streamable(load_config(model_dir)) else "whole model, CPU"
    source = f"transformers fp32, {walk}"
    runtime = fmt.runtime(job)
    try:
        report.source_metrics = ref.metrics.to_dict()
        for output, result in zip(outputs, report.files):
            metrics = fmt.evaluate(output, ref, job, stages(f"evaluate {output.variant}"))
            result.metrics = metrics.to_dict()
            result.details = dict(output.details) or None   # evaluate may add facts (e.g. a baseline's metrics)
        report.evaluation = EvalInfo(
            text_source=text.source, n_tokens=ref.metrics.n_tokens, ctx=settings.ctx, chunks=len(chunks),
            method=method_line(settings, runtime, source),
        )
    finally:
        ref.close()

