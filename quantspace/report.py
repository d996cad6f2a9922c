"""The one report object: what was made, from what, how well it kept accuracy. Saved as quantspace.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_NAME = "quantspace.json"
SCHEMA_VERSION = 1


def format_size(n: float, digits: int = 2) -> str:
    """Decimal units, as the Hub shows sizes: 271.08 MB."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return f"{n:.{digits}f} TB"


def format_number(value: float | None, spec: str) -> str:
    """A metric for a table, or an en dash where it was not measured."""
    return "–" if value is None else format(value, spec)


@dataclass
class FileResult:
    filename: str
    variant: str                      # e.g. "Q4_K_M"
    size_bytes: int
    bits_per_weight: float
    metrics: dict[str, Any] | None = None   # perplexity, delta_ppl, kld_mean, top1_agreement, n_tokens
    files: list[str] | None = None    # every weight file, when the variant has several (shards)
    details: dict[str, Any] | None = None   # format-specific facts (memory footprint, QLoRA check...)


@dataclass
class EvalInfo:
    text_source: str
    n_tokens: int                     # scored tokens per model
    ctx: int
    chunks: int
    method: str                       # one line: how the numbers were computed


@dataclass
class Report:
    source: str                       # repo id, or local folder name
    revision: str | None              # commit sha of the source, when from the Hub
    method: str                       # "gguf", ...
    name: str                         # output name, e.g. "SmolLM2-135M-Instruct-GGUF"
    architecture: str
    parameters: int
    license: str | None
    options: dict[str, Any] = field(default_factory=dict)   # format-specific options used
    device: str = "cpu"               # where the quantization ran
    files: list[FileResult] = field(default_factory=list)
    source_metrics: dict[str, Any] | None = None
    evaluation: EvalInfo | None = None
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)   # stage → seconds
    command: str = ""                 # the CLI command that reproduces this
    repo_id: str | None = None        # where it was pushed
    repo_url: str | None = None
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def save(self, folder: Path) -> Path:
        path = folder / REPORT_NAME
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        data = dict(data)
        data["files"] = [FileResult(**f) for f in data.get("files", [])]
        if data.get("evaluation"):
            data["evaluation"] = EvalInfo(**data["evaluation"])
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "Report":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
