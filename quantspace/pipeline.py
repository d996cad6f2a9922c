"""resolve/validate → fetch → quantize → evaluate → card → push. The CLI and the UI are shells over this."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import shlex
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .card import build_card
from .formats import Context, Format, GpuRunner, Output, check_options, get_format, resolve_device, run_directly
from .errors import BadOptionError
from .hub import check_target, push_folder, repo_url, resolve_token
from .report import EvalInfo, FileResult, Report
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


def _command(source: str, fmt: Format, variants: list[str], options: dict[str, Any], push: str | None,
             private: bool, eval_text: str | None, no_eval: bool) -> str:
    parts = ["python", "-m", "quantspace", "quantize", source, "--method", fmt.name, "--variants", ",".join(variants)]
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
    return shlex.join(parts)


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
    token: str | None = None,
    allow_pickle: bool = False,
    ctx: int = 512,
    max_chunks: int = 16,
    progress: ProgressFn | None = None,
    options: dict[str, Any] | None = None,
    device: str = "auto",
    run_gpu: GpuRunner = run_directly,
    gpu_window_s: float | None = None,
) -> Report:
    """Quantize `source` (Hub repo id[@revision] or local folder) and return the report.

    Every check that can fail cheaply (options, token, target namespace, architecture, tokenizer, weights)
    runs before the download. Files are written to `out`; with `push`, they go to the Hub in one commit.
    `options` are the method's own (see `get_format(method).options`); `device` is auto, cpu or cuda;
    `run_gpu` runs the GPU stages (the Space passes a ZeroGPU-decorated runner, and the length of one of its
    windows as `gpu_window_s`, so long stages can split their work).
    """
    from .evaluate import EvalSettings, load_eval_text

    fmt = get_format(method)
    names = variants.split(",") if isinstance(variants, str) else list(variants or fmt.default_variants)
    reason = fmt.unavailable()
    if reason:
        raise BadOptionError(f"{fmt.name} is not available here: {reason}")
    chosen = fmt.check_variants(names)
    opts = check_options(fmt, options)
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
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    before = set(out_dir.iterdir())
    stages = _Stages(progress)
    written: list[Path] = []
    try:
        with tempfile.TemporaryDirectory(prefix="quantspace-") as work:
            model_dir = _fetch(info, token, Path(work), stages)
            job = Context(stage=stages, options=opts, device=device, run_gpu=run_gpu, workdir=Path(work),
                          token=token, gpu_window_s=gpu_window_s)
            outputs = fmt.produce(model_dir, out_dir, info.name, chosen, job)
            written += [p for o in outputs for p in o.files]
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
        written.append(report.save(out_dir))
        card = out_dir / "README.md"
        build_card(report, fmt).save(card)
        written.append(card)
        if push:
            assert token is not None
            tick = stages("upload")
            push_folder(out_dir, [p.name for p in written], push, token, private,
                        f"Add {', '.join(chosen)} {fmt.title} of {report.source} (QuantSpace)")
            tick(1, 1)  # the upload's own time is not in the report: the pushed report is the local one
    except BaseException:
        # Nothing half-written: a failed run removes every file it added to the output folder.
        for path in set(out_dir.iterdir()) - before:
            if path.is_file():
                path.unlink()
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return report


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
    from .evaluate import evaluate_source, method_line, tokenize_for_eval

    stages = job.stage
    assert job.workdir is not None
    chunks = tokenize_for_eval(model_dir, text, settings)
    ref = evaluate_source(model_dir, chunks, settings, job.workdir, text.source, progress=stages("evaluate source"))
    try:
        report.source_metrics = ref.metrics.to_dict()
        for output, result in zip(outputs, report.files):
            metrics = fmt.evaluate(output, ref, job, stages(f"evaluate {output.variant}"))
            result.metrics = metrics.to_dict()
            result.details = dict(output.details) or None   # evaluate may add facts (e.g. a baseline's metrics)
        report.evaluation = EvalInfo(
            text_source=text.source, n_tokens=ref.metrics.n_tokens, ctx=settings.ctx, chunks=len(chunks),
            method=method_line(settings, fmt.eval_runtime),
        )
    finally:
        ref.close()

