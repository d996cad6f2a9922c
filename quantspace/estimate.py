"""Sizes before any download: parameter counts from safetensors headers, output sizes per variant."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import BadOptionError
from .formats import TensorStats, check_options, get_format
from .source import HUB_ERRORS, SourceInfo, hub_error, resolve
from .weights import all_entries


@dataclass
class Estimate:
    source: str
    architecture: str
    parameters: int
    source_bytes: int
    sizes: dict[str, int]            # variant → bytes
    work_bytes: int = 0              # the method's intermediates on disk at their peak

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_shapes(info: SourceInfo, token: str | None) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers only (a few KB per file from the Hub)."""
    if info.local_dir is not None:
        return {e.name: e.shape for e in all_entries(info.local_dir)}
    if info.pickled:
        raise BadOptionError("Sizes can only be estimated from safetensors headers; this model has pickled weights.")
    from huggingface_hub import get_safetensors_metadata

    assert info.repo_id is not None
    try:
        meta = get_safetensors_metadata(info.repo_id, revision=info.revision, token=token)
    except HUB_ERRORS as exc:
        raise hub_error(exc, info.repo_id, info.revision) from None
    return {name: tuple(t.shape) for fm in meta.files_metadata.values() for name, t in fm.tensors.items()}


def estimate(source: str, method: str = "gguf", variants: list[str] | None = None, token: str | None = None,
             info: SourceInfo | None = None, options: dict | None = None) -> Estimate:
    """Sizes per variant; `options` are the method's own (GGUF's per-tensor types change its sizes)."""
    fmt = get_format(method)
    # Without a choice, every variant (a method may allow only one per run, but all can be estimated).
    chosen = fmt.check_variants(variants) if variants else list(fmt.variants)
    opts = check_options(fmt, options, chosen if variants else None)
    info = info or resolve(source, token=token)
    fmt.check_architecture(info.config)
    stats = TensorStats(tensor_shapes(info, token), info.config, info.files, opts)
    sizes = fmt.estimate(stats, chosen)
    return Estimate(info.display, info.architecture, stats.total, info.weight_bytes, sizes,
                    fmt.work_bytes(stats, chosen, sizes))
