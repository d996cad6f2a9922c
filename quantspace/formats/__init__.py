"""Output formats. Each one is a module with one object implementing `Format`; the pipeline knows no more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import BadOptionError

if TYPE_CHECKING:
    from ..evaluate import Metrics, Reference
    from ..report import Report

# (done, total) for the current stage; the pipeline wraps it with the stage's name.
Tick = Callable[[int, int], None]
# Opens a named stage and returns its tick function.
StageFn = Callable[[str], Tick]


@dataclass(frozen=True)
class Output:
    path: Path
    variant: str


@dataclass(frozen=True)
class TensorStats:
    """What size estimates need, read from safetensors headers."""
    matrix_params: dict[str, int]   # HF tensor name → element count, 2-D weights
    vector_params: int              # 1-D tensors (norms, biases)

    @property
    def total(self) -> int:
        return sum(self.matrix_params.values()) + self.vector_params


class Format(Protocol):
    name: str                      # CLI value of --method
    library_name: str              # model card metadata
    suffix: str                    # default repo suffix, e.g. "GGUF"
    variants: tuple[str, ...]          # every variant it can make
    default_variants: tuple[str, ...]

    def check_variants(self, variants: list[str]) -> list[str]:
        """Normalised variant names, or BadOptionError before any work starts."""

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        """Expected file size in bytes per variant."""

    def produce(self, model_dir: Path, out_dir: Path, name: str, variants: list[str], stage: StageFn) -> list[Output]:
        """Write one file per variant into out_dir."""

    def evaluate(self, output: Output, ref: "Reference", tick: Tick) -> "Metrics":
        """Accuracy of one output against the source's reference."""

    def bits_per_weight(self, output: Output, n_params: int) -> float: ...

    def tags(self, variants: list[str]) -> list[str]: ...

    def usage(self, repo_id: str | None, report: "Report") -> str:
        """Markdown: how to run the files of this format (from the Hub repo, or locally when None)."""


def get_format(name: str) -> Format:
    from .gguf import GGUF

    formats: dict[str, Format] = {"gguf": GGUF()}
    try:
        return formats[name.lower()]
    except KeyError:
        raise BadOptionError(
            f"Unknown method '{name}'. Available: {', '.join(sorted(formats))}."
        ) from None
