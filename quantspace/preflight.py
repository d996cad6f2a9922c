"""Preflight: everything a user should know before a run starts, computed without downloading weights.

Pure functions over the pipeline's own checks (source.resolve, estimate, the format's variants): the page, the
API and tests call `preflight()` and get a JSON-able result whose `problems` say, in one sentence each, what
would make the run fail.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import QuantSpaceError
from .formats import check_options, get_format
from .report import format_size
from .source import SourceInfo, on_space  # noqa: F401  (the UI asks here for on_space)

# The longest GPU window the Space asks ZeroGPU for in one call. Longer jobs belong on a dedicated GPU.
ZEROGPU_MAX_SECONDS = 300
# What one GPU stage costs, roughly: start-up (moving weights onto the GPU) plus time per billion parameters.
GPU_BASE_SECONDS = 20
GPU_SECONDS_PER_BILLION = 120
# Source weights are evaluated in fp32; GPU formats load them in 16 bits, with some room for activations.
FP32_BYTES, FP16_BYTES, GPU_HEADROOM = 4, 2, 1.2


@dataclass
class Hardware:
    """Where the run would compute, and how much room there is."""
    kind: str                         # "zerogpu", "cuda" or "cpu"
    gpu_name: str | None = None
    gpu_memory: int | None = None     # bytes
    ram: int | None = None            # bytes
    disk_free: int | None = None      # bytes, in the temp folder jobs use


@dataclass
class PreflightResult:
    source: str
    method: str
    variants: list[str]
    ok: bool = False
    architecture: str | None = None
    parameters: int | None = None
    download_bytes: int | None = None          # what the Hub cache lacks (0 for a local folder)
    sizes: dict[str, int] = field(default_factory=dict)    # variant → expected bytes
    disk_needed: int | None = None             # the job's peak: see quantspace.diskplan
    gpu_memory_needed: int | None = None       # for formats that compute on a GPU
    gpu_seconds: int | None = None             # the ZeroGPU window asked for per GPU stage
    hardware: dict[str, Any] = field(default_factory=dict)
    repo_name: str | None = None               # default output repo name, e.g. "SmolLM2-135M-Instruct-GGUF"
    checks: list[str] = field(default_factory=list)   # what was checked and passed, one line each
    problems: list[str] = field(default_factory=list)  # what would make the run fail, one sentence each
    too_big: bool = False                      # some problem is this machine's (disk, memory, GPU): a bigger one helps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def on_zero_gpu() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def gpu_seconds(parameters: int) -> int:
    """ZeroGPU duration for one GPU stage of a model this size (the `spaces.GPU` duration)."""
    return int(GPU_BASE_SECONDS + GPU_SECONDS_PER_BILLION * parameters / 1e9)


def detect_hardware(workdir: str | None = None) -> Hardware:
    """ZeroGPU, a local CUDA GPU, or the CPU; memory and free disk as far as they can be read."""
    ram = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    disk = shutil.disk_usage(workdir or tempfile.gettempdir()).free
    if on_zero_gpu():
        # ZeroGPU hands out a slice of an H200; `spaces` reports the same figure to torch inside a window.
        from spaces.config import Config

        return Hardware("zerogpu", Config.zerogpu_cuda_device_name, Config.zerogpu_cuda_total_memory, ram, disk)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, int(props.total_memory), ram, disk)
    return Hardware("cpu", None, None, ram, disk)


def eval_scratch_bytes(config: dict[str, Any], ctx: int = 512, max_chunks: int = 16) -> int:
    """The source's float16 log-probabilities kept on disk during evaluation (scored tokens × vocabulary)."""
    from .evaluate import EvalSettings

    settings = EvalSettings(ctx=ctx, max_chunks=max_chunks)
    from .multimodal import text_config

    vocab = int(text_config(config).get("vocab_size") or 0)   # a multimodal config keeps it in text_config
    return settings.scored_per_chunk * settings.max_chunks * vocab * FP16_BYTES


def preflight(source: str, method: str = "gguf", variants: list[str] | None = None, token: str | None = None,
              evaluate: bool = True, target: str | None = None, hardware: Hardware | None = None,
              options: dict[str, Any] | None = None, info: SourceInfo | None = None) -> PreflightResult:
    """Check `source` for `method` (and the push `target`, the method's `options`) before any weight download
    (`info`: the source already resolved, so it is not asked of the Hub again);
    never raises for the user's input: every problem is a sentence in `problems`."""
    result = PreflightResult(source=(source or "").strip(), method=method, variants=list(variants or []))
    try:
        fmt = get_format(method)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        return result
    result.method = fmt.name
    reason = fmt.unavailable()
    if reason:
        result.problems.append(f"{fmt.name.upper()} is not available here: {reason}")
    try:
        result.variants = fmt.check_variants(list(variants or fmt.default_variants))
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        result.variants = []
    try:
        options = check_options(fmt, options, result.variants)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        options = None   # the sizes below are then llama.cpp's own choice

    from .diskplan import plan
    from .estimate import estimate
    from .hub import check_target
    from .source import resolve

    if target:
        try:
            check_target(target, token)
            result.checks.append(f"You can push to {target}.")
        except QuantSpaceError as exc:
            result.problems.append(str(exc))

    try:
        info = info or resolve(result.source, token=token)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        return result
    result.architecture = info.architecture
    result.repo_name = f"{info.name}-{fmt.suffix}"
    result.checks.append(f"Found {info.display} in the local Hub cache (the Hub cannot be reached)." if info.cached
                         else f"Found {info.display} on the Hub; access OK." if info.repo_id
                         else f"Found the folder {info.display}.")
    try:
        maker = fmt.check_architecture(info.config)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        return result
    result.checks.append(f"Architecture {info.architecture} is supported; tokenizer and weights are usable."
                         + (f" {maker}" if maker else ""))
    try:
        fmt.check_source(info.config, result.variants)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
    try:
        est = estimate(result.source, fmt.name, result.variants or list(fmt.default_variants), token=token, info=info,
                       options=options)
    except QuantSpaceError as exc:
        result.problems.append(str(exc))
        return result
    result.parameters = est.parameters
    result.sizes = est.sizes if result.variants else {}
    if "mmproj" in result.sizes:   # GGUF of a multimodal model: the projector file, counted with the outputs
        result.checks.append(f"Also writes mmproj-{info.name}-F16.gguf, the vision/audio projector for "
                             f"llama-mtmd-cli / llama-server --mmproj (about {format_size(result.sizes['mmproj'])}).")
    disk = plan(info, result.sizes, est.work_bytes, eval_scratch_bytes(info.config) if evaluate else 0)
    result.download_bytes, result.disk_needed = disk.download, disk.peak
    memory = eval_memory(info.config, est.parameters) if evaluate else None
    before = len(result.problems)
    _check_hardware(result, fmt.needs_gpu, memory, hardware or detect_hardware())
    result.too_big = len(result.problems) > before
    result.ok = not result.problems
    return result


def eval_memory(config: dict[str, Any], parameters: int) -> tuple[int, bool]:
    """(bytes of memory measuring accuracy needs, whether the source is run layer by layer).

    Layer by layer (text-only models of a family with a layer table): about the largest layer in fp32, the
    evaluation chunks' activations and a block of the output head. Otherwise the whole source in fp32.
    """
    from .reference import memory_needed, streamable

    if streamable(config):
        try:
            return memory_needed(config), True
        except (KeyError, TypeError, ValueError):   # a config without the usual sizes: assume the whole model
            pass
    return FP32_BYTES * parameters, False


def _check_hardware(result: PreflightResult, needs_gpu: bool, eval_need: tuple[int, bool] | None,
                    hw: Hardware) -> None:
    assert result.parameters is not None and result.disk_needed is not None
    result.hardware = asdict(hw)
    if hw.disk_free is not None:
        if result.disk_needed > hw.disk_free:
            result.problems.append(
                f"Needs about {format_size(result.disk_needed)} of disk but only {format_size(hw.disk_free)} "
                "is free; free some space or pick fewer variants."
            )
        else:
            result.checks.append(f"Disk: needs about {format_size(result.disk_needed)}, "
                                 f"{format_size(hw.disk_free)} free.")
    if eval_need is not None and hw.ram is not None:
        ram_needed, layered = eval_need
        how = ("runs the source in fp32 one decoder layer at a time (about " + format_size(ram_needed)
               + ": its largest layer, the evaluation chunks' activations and a block of the output head)"
               if layered else f"loads the whole source in fp32 (about {format_size(ram_needed)})")
        if ram_needed > hw.ram:
            result.problems.append(f"Measuring accuracy {how}, more than this machine's {format_size(hw.ram)} "
                                   "of memory; turn evaluation off.")
        else:
            result.checks.append(f"Memory: measuring accuracy {how}; {format_size(hw.ram)} here.")
    result.gpu_memory_needed = int(FP16_BYTES * GPU_HEADROOM * result.parameters)
    if hw.kind == "cpu":
        if needs_gpu:
            result.problems.append(f"{result.method.upper()} needs a CUDA GPU and this machine has none; "
                                   "pick another method or run on a GPU machine.")
        return
    assert hw.gpu_memory is not None
    if result.gpu_memory_needed > hw.gpu_memory:
        result.problems.append(
            f"The model needs about {format_size(result.gpu_memory_needed)} of GPU memory; "
            f"the {hw.gpu_name} has {format_size(hw.gpu_memory)}."
        )
    elif needs_gpu:
        result.checks.append(f"GPU memory: needs about {format_size(result.gpu_memory_needed)} of "
                             f"{format_size(hw.gpu_memory)} ({hw.gpu_name}).")
    if hw.kind == "zerogpu":
        result.gpu_seconds = gpu_seconds(result.parameters)
        if needs_gpu and result.gpu_seconds > ZEROGPU_MAX_SECONDS:
            result.problems.append(
                f"Each GPU stage would need about {result.gpu_seconds} s, more than the {ZEROGPU_MAX_SECONDS} s "
                "ZeroGPU window this Space asks for; duplicate the Space on a dedicated GPU or run it locally."
            )
