"""Output formats. Each one is a module with one object implementing `Format`; the pipeline knows no more."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, TypeVar

from ..errors import BadOptionError

if TYPE_CHECKING:
    from ..evaluate import Metrics, Reference
    from ..reference import GpuWindows
    from ..report import Report

T = TypeVar("T")
# (done, total) for the current stage; the pipeline wraps it with the stage's name.
Tick = Callable[[int, int], None]
# Opens a named stage and returns its tick function.
StageFn = Callable[[str], Tick]
# Runs a GPU stage: on a ZeroGPU Space inside a GPU window (function and arguments must pickle), else directly.
GpuRunner = Callable[..., Any]
WINDOW_BUDGET_S = 50.0   # work in one ZeroGPU window of unknown length (60 s by default), less start and hand-back
WINDOW_SHARE = 0.8       # of a known window's length: the rest covers the start and the hand-back


def run_directly(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


@dataclass(frozen=True)
class Output:
    """What one variant wrote: its weight files (counted in its size) and any files that go with them."""
    variant: str
    weights: tuple[Path, ...]
    extra: tuple[Path, ...] = ()     # config.json, tokenizer files...: pushed, not counted in the size
    details: dict[str, Any] = field(default_factory=dict, compare=False)   # format-specific facts for the report

    @property
    def path(self) -> Path:
        return self.weights[0]

    @property
    def files(self) -> tuple[Path, ...]:
        return self.weights + self.extra

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights)


@dataclass(frozen=True)
class TensorStats:
    """What size estimates need, known before any weight download: safetensors headers, config, file sizes."""
    shapes: dict[str, tuple[int, ...]]                            # HF tensor name → shape
    config: dict[str, Any] = field(default_factory=dict)          # the source's config.json
    files: dict[str, int | None] = field(default_factory=dict)    # source file name → bytes (tokenizer files...)
    options: dict[str, Any] = field(default_factory=dict)         # the format's options, when sizes depend on them

    @property
    def matrix_params(self) -> dict[str, int]:
        """HF tensor name → element count, 2-D (and larger) weights."""
        return {name: math.prod(s) for name, s in self.shapes.items() if len(s) >= 2}

    @property
    def vector_params(self) -> int:
        """Elements of 1-D tensors (norms, biases)."""
        return sum(math.prod(s) for s in self.shapes.values() if len(s) < 2)

    @property
    def total(self) -> int:
        return sum(self.matrix_params.values()) + self.vector_params


@dataclass(frozen=True)
class Option:
    """One format-specific option; the CLI makes a flag of it (--group-size) and the UI a control."""
    name: str                        # python name, e.g. "group_size"
    default: Any                     # its type is the option's type (bool, int, float or str)
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None     # for numbers
    label: str | None = None         # for the page; default: the name in words
    advanced: bool = False           # the page puts it in its format's "Advanced" section
    suggestions: tuple[str, ...] = ()  # common values the page offers for a free-text option

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()


@dataclass
class Context:
    """What a format's produce/evaluate get beside the model: options, where to compute, progress."""
    stage: StageFn
    options: dict[str, Any] = field(default_factory=dict)   # checked, defaults filled (check_options)
    device: str = "cpu"              # "cpu" or "cuda" (resolved from "auto" by the pipeline)
    run_gpu: GpuRunner = run_directly
    workdir: Path | None = None      # scratch space that is removed after the run
    token: str | None = None         # the user's Hub token (a calibration dataset may be private)
    gpu_window_s: float | None = None   # length of one run_gpu window (ZeroGPU); None: unbounded

    @property
    def local_device(self) -> str:
        """The device this process may use itself: ZeroGPU lends its GPU only inside a window (run_gpu)."""
        return self.device if self.run_gpu is run_directly else "cpu"

    @property
    def window_budget_s(self) -> float:
        """Seconds of work to put in one GPU window (ZeroGPU)."""
        return WINDOW_SHARE * self.gpu_window_s if self.gpu_window_s else WINDOW_BUDGET_S

    def layer_walk(self) -> tuple[str, "GpuWindows | None", str]:
        """Where a layer-by-layer evaluation (quantspace.reference) runs: (device, GPU windows or None, the
        place in words for the card). Under ZeroGPU the layers go to the GPU in windows; elsewhere this process's
        device."""
        if self.run_gpu is run_directly or self.device != "cuda":
            return self.local_device, None, "CUDA" if self.local_device == "cuda" else "CPU"
        from ..reference import GpuWindows

        workdir = self.workdir or Path(tempfile.gettempdir())
        return "cuda", GpuWindows(self.run_gpu, self.window_budget_s, workdir), "CUDA in ZeroGPU windows"


class Format(Protocol):
    name: str                      # CLI value of --method
    library_name: str              # model card metadata
    suffix: str                    # default repo suffix, e.g. "GGUF"
    title: str                     # for people: card heading and commit message, e.g. "GGUF"
    variants: tuple[str, ...]          # every variant it can make
    default_variants: tuple[str, ...]
    options: tuple[Option, ...]        # format-specific options (may be empty)
    needs_gpu: bool                    # True: refuses to run on the CPU

    def unavailable(self) -> str | None:
        """Why this format cannot run in this installation (a missing package...), or None."""

    def check_variants(self, variants: list[str]) -> list[str]:
        """Normalised variant names, or BadOptionError before any work starts."""

    def check_architecture(self, config: dict[str, Any]) -> str | None:
        """Refuse (UnsupportedArchitectureError) a model this format cannot make at all, from its config; may
        say, for people, what will make it (e.g. which converter)."""

    def check_source(self, config: dict[str, Any], variants: list[str]) -> None:
        """Refuse a model these variants cannot be made of (its architecture included), from its config, before
        any download."""

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        """Expected file size in bytes per variant."""

    def work_bytes(self, stats: TensorStats, variants: list[str], sizes: dict[str, int]) -> int:
        """Disk the method holds at its peak beyond its outputs (`sizes`, from estimate): its intermediates."""

    def produce(self, model_dir: Path, out_dir: Path, name: str, variants: list[str], ctx: Context) -> list[Output]:
        """Write each variant's files into out_dir."""

    def evaluate(self, output: Output, ref: "Reference", ctx: Context, tick: Tick) -> "Metrics":
        """Accuracy of one output against the source's reference."""

    def runtime(self, ctx: Context) -> str:
        """What runs the outputs when evaluate measures them, and where, for the card's method line."""

    def tags(self, variants: list[str]) -> list[str]: ...

    def usage(self, repo_id: str | None, report: "Report") -> str:
        """Markdown: how to run the files of this format (from the Hub repo, or locally when None)."""

    def card_notes(self, report: "Report") -> str:
        """Markdown: a format-specific card section (may be empty), e.g. the QLoRA check of NF4."""


# name → "module:object". A new format is one module and one line here.
REGISTRY: dict[str, str] = {
    "gguf": "quantspace.formats.gguf:GGUF",
    "awq": "quantspace.formats.awq:AWQ",
    "nf4": "quantspace.formats.nf4:NF4",
}


def get_format(name: str) -> Format:
    key = name.strip().lower()
    if key not in REGISTRY:
        raise BadOptionError(f"Unknown method '{name}'. Available: {', '.join(REGISTRY)}.")
    module, obj = REGISTRY[key].split(":")
    return getattr(importlib.import_module(module), obj)()


def copy_source_files(model_dir: Path, dest: Path) -> list[Path]:
    """The source's tokenizer files and generation config, byte for byte, into a checkpoint folder."""
    from ..converter.vocab import TOKENIZER_FILES

    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            tmp = dest / (name + ".partial")
            shutil.copyfile(model_dir / name, tmp)
            os.replace(tmp, dest / name)
            copied.append(dest / name)
    return copied


def pick_variants(method: str, given: list[str], known: Iterable[str], one_per_run: bool = False) -> list[str]:
    """Upper-cased, de-duplicated variant names in the given order; BadOptionError names what is allowed."""
    known = list(known)
    chosen: list[str] = []
    for v in given:
        key = v.strip().upper()
        if key not in known:
            raise BadOptionError(f"Unknown {method} variant '{v.strip()}'. Choose from: {', '.join(known)}.")
        if key not in chosen:
            chosen.append(key)
    if not chosen:
        raise BadOptionError(f"No {method} variant given. Choose from: {', '.join(known)}.")
    if one_per_run and len(chosen) > 1:
        raise BadOptionError(f"{method} makes one checkpoint per run (a folder at the repo root); "
                             f"pick one of {', '.join(known)}, got {len(chosen)}.")
    return chosen


def check_options(fmt: Format, given: dict[str, Any] | None, variants: list[str] | None = None) -> dict[str, Any]:
    """The format's options with defaults filled in; BadOptionError names the bad one. With the chosen
    variants, a format may also refuse values they cannot use together (its optional `check_choice`)."""
    given = dict(given or {})
    known = {o.name: o for o in fmt.options}
    unknown = sorted(set(given) - set(known))
    if unknown:
        allowed = ", ".join(known) or "none"
        raise BadOptionError(f"Unknown option(s) for {fmt.name}: {', '.join(unknown)}. Options: {allowed}.")
    out: dict[str, Any] = {}
    for opt in fmt.options:
        value = given.get(opt.name, opt.default)
        kind = type(opt.default)
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes", "on")
            elif opt.default is not None:
                value = kind(value)
        except (TypeError, ValueError):
            raise BadOptionError(f"Option {opt.name} of {fmt.name} must be a {kind.__name__}, got {value!r}.") from None
        if opt.choices is not None and value not in opt.choices:
            raise BadOptionError(
                f"Option {opt.name} of {fmt.name} must be one of {', '.join(map(str, opt.choices))}; got {value!r}."
            )
        if opt.minimum is not None and value < opt.minimum:
            raise BadOptionError(f"Option {opt.name} of {fmt.name} must be at least {opt.minimum}; got {value!r}.")
        out[opt.name] = value
    check_choice = getattr(fmt, "check_choice", None)
    if check_choice is not None and variants is not None:
        check_choice(out, variants)
    return out


def resolve_device(device: str, fmt: Format) -> str:
    """"auto" → cuda when a CUDA GPU is visible, else cpu; refuses what cannot work, before any work."""
    device = (device or "auto").strip().lower()
    if device not in ("auto", "cpu", "cuda"):
        raise BadOptionError(f"Unknown device '{device}'. Use auto, cpu or cuda.")
    if device != "cpu":
        import torch

        has_cuda = torch.cuda.is_available()
        if device == "cuda" and not has_cuda:
            raise BadOptionError("--device cuda was asked for, but no CUDA GPU is visible to torch.")
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu" and fmt.needs_gpu:
        raise BadOptionError(f"{fmt.name} needs a CUDA GPU; none is available here.")
    return device
