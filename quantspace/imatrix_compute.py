"""Our importance matrix, computed in PyTorch from the HF folder, layer by layer, as llama-imatrix would.

The calibration text is cut into chunks of `ctx` tokens (the first token of each is BOS when the tokenizer adds
one, as llama-imatrix does). The model is the AWQ engine's meta-device skeleton (experts one linear each);
each decoder layer is read from the safetensors files, run over every chunk with a hook on each of its linears
that adds up the squared inputs per column and counts the tokens (an expert sees, and counts, only the tokens
routed to it), and dropped. After the last layer the final norm's output is the input of lm_head (output.weight).

A resumable state folder, like AWQ's (see quantspace.awq.engine), so ZeroGPU windows can share the work:
  settings.json, tokens.pt, progress.json   as AWQ's
  sums-00007.safetensors                    one layer's sums and counts by module path inside the layer
  hidden-00008.pt                           the input of the next layer when a run stops before the end
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .archs import load_config
from .awq import engine
from .awq.layers import LayerSpec, spec_for
from .errors import QuantizeError
from .gguf_header import read_header
from .imatrix import Entry, Imatrix

HEAD = "lm_head"   # the sums of the head step (the final norm's output) are stored under this name


@dataclass(frozen=True)
class Settings:
    ctx: int = 512
    n_chunks: int = 64
    device: str = "cpu"
    chunk_tokens: int = 16384   # tokens per forward pass through a layer (bounds activation memory)


def calibration_chunks(model_dir: Path, n_chunks: int, ctx: int, dataset: str | None = None,
                       token: str | None = None) -> tuple[str, list[list[int]]]:
    """(where the text came from, up to n_chunks chunks of exactly ctx tokens), BOS first where the model's
    tokenizer adds it."""
    from transformers import AutoTokenizer

    from .calib import calibration_samples, load_calibration_text

    calib = load_calibration_text(dataset or None, token=token)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chunks = calibration_samples(tokenizer, calib, n_chunks, ctx)
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a")["input_ids"]
    if bos is not None and with_special and with_special[0] == bos:
        chunks = [[bos] + c[1:] for c in chunks]
    return calib.source, chunks


def steps(config: dict[str, Any]) -> int:
    """Decoder layers, then the head."""
    return int(config["num_hidden_layers"]) + 1


def prepare(state_dir: Path, settings: Settings, chunks: list[list[int]]) -> None:
    engine.prepare(state_dir, settings, chunks)   # type: ignore[arg-type]  (any dataclass of plain values)


def _settings(state_dir: Path) -> Settings:
    data = json.loads((state_dir / "settings.json").read_text())
    data.pop("tokens", None)
    return Settings(**data)


def _sums_file(state_dir: Path, i: int) -> Path:
    return state_dir / f"sums-{i:05d}.safetensors"


class _Collector:
    """Forward pre-hooks on every linear of a module: Σ x² per input column (float64) and the token count.

    Linears fed the same tensor (q/k/v, gate/up) share one sum: it is computed once per forward pass. The sum
    over a pass's rows is a float32 matrix product (ones · x²; several times faster on CPU than an elementwise
    float64 sum), added to a float64 total across passes; llama.cpp itself adds float32 row by row.
    """

    def __init__(self, module: nn.Module):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._hooks = []
        self._last: tuple[Any, ...] | None = None   # (input, its version, its column sums) of the latest one
        for name, mod in module.named_modules():
            if isinstance(mod, nn.Linear):
                self.sums[name] = torch.zeros(mod.in_features, dtype=torch.float64, device=mod.weight.device)
                self.counts[name] = 0   # an expert no token reaches keeps 0: llama.cpp then ignores its row
                self._hooks.append(mod.register_forward_pre_hook(lambda m, args, n=name: self._add(n, args[0])))

    def _add(self, name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            col = self._last[2]
        else:
            sq = flat.float().square()
            col = torch.ones(1, sq.shape[0], dtype=sq.dtype, device=sq.device).mm(sq)[0]
            self._last = (x, x._version, col)   # holding x keeps it from being freed and its id reused
        self.sums[name] += col
        self.counts[name] += flat.shape[0]

    def close(self) -> dict[str, torch.Tensor]:
        for h in self._hooks:
            h.remove()
        self._last = None
        out = {}
        for name, s in self.sums.items():
            out[f"{name}.in_sum2"] = s.cpu()
            out[f"{name}.counts"] = torch.tensor([self.counts[name]], dtype=torch.float64)
        return out


def _head_input(model: nn.Module, spec: LayerSpec, src: engine.SourceTensors, x: torch.Tensor,
                runner: Any) -> dict[str, torch.Tensor]:
    """The sums of lm_head's input: the final norm over the last layer's output."""
    base = spec.layers_path.rpartition(".")[0]
    norm = model.get_submodule(f"{base}.norm")
    state = {n: src.get(f"{base}.norm.{n}").to(x.device, x.dtype) for n in norm.state_dict()}
    norm.load_state_dict(state, assign=True)
    head = nn.Linear(x.shape[-1], 1, bias=False, device=x.device)   # stands for lm_head: only its input matters
    wrapped = nn.Sequential(norm, head)
    collector = _Collector(nn.ModuleDict({HEAD: head}))
    try:
        runner(wrapped, x)
    finally:
        sums = collector.close()
    return sums


def run(model_dir: Path, state_dir: Path, budget_s: float | None = None,
        progress: Callable[[int, int], None] | None = None) -> bool:
    """Collect from where the state folder stands; True when every layer and the head are done. Stops before a
    layer that would not finish within budget_s (the first always runs). Top-level with plain arguments, so a
    ZeroGPU runner can call it in another process."""
    from safetensors.torch import save_file

    start = time.monotonic()
    settings = _settings(state_dir)
    config = load_config(model_dir)
    spec = spec_for(config)
    n_layers, total = int(config["num_hidden_layers"]), steps(config)
    first = engine.next_layer(state_dir)
    if first >= total:
        return True
    dev, dtype = torch.device(settings.device), torch.float32
    src = engine.SourceTensors(model_dir)
    model = engine._skeleton(config, spec)
    x = engine.layer_input(state_dir, first, src, spec, config, dev, dtype)
    pe_of = engine._position_embeddings(model, spec, x, settings.ctx)
    runner = engine._Runner(None, settings.chunk_tokens)
    layers = model.get_submodule(spec.layers_path)
    slowest = 0.0
    i = first
    while i < total:
        if budget_s is not None and i > first and time.monotonic() - start + slowest * 1.2 > budget_s:
            break
        t0 = time.monotonic()
        if i < n_layers:
            layer = engine._materialise(layers[i], f"{spec.layers_path}.{i}.", spec, src, dev, dtype)
            runner.pe = pe_of(i)
            collector = _Collector(layer)
            try:
                x = runner(layer, x)
            finally:
                sums = collector.close()
            layers[i] = layer.to("meta")
            del layer
        else:
            sums = _head_input(model, spec, src, x, runner)
        tmp = _sums_file(state_dir, i).with_suffix(".tmp")
        save_file(sums, str(tmp))
        tmp.replace(_sums_file(state_dir, i))
        i += 1
        if progress is not None:
            progress(i, total)
        slowest = max(slowest, time.monotonic() - t0)
    if i < total:
        engine._save_atomic(x.cpu(), engine._hidden_file(state_dir, i))
    engine._write_json(state_dir / "progress.json", {"next": i})
    if first > 0:
        engine._hidden_file(state_dir, first).unlink(missing_ok=True)
    return i >= total


# --------------------------------------------------------------------------- GGUF names

_EXPERT = re.compile(r"^(?P<base>.*\.experts)\.(?P<e>\d+)\.(?P<rest>.+)$")


def _gguf_tensors(gguf_path: Path) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """(gguf's MODEL_ARCH, name → shape in ggml order) of the F16 GGUF the variants are quantized from."""
    import gguf

    header = read_header(gguf_path)
    name, shapes = header.architecture, {n: shape for n, (shape, _) in header.tensors.items()}
    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if name not in by_name:
        raise QuantizeError(f"{gguf_path.name} names architecture '{name}', which this gguf-py does not know.")
    return by_name[name], shapes


def assemble(model_dir: Path, state_dir: Path, gguf_path: Path, dataset: str) -> Imatrix:
    """The finished sums as llama.cpp names them in the model's GGUF: each linear under its weight's name, the
    experts of a layer as the rows of one `ffn_*_exps` entry. Linears the GGUF has no weight for (lm_head of a
    model with tied embeddings) are left out."""
    import gguf
    from safetensors.torch import load_file

    config = load_config(model_dir)
    spec = spec_for(config)
    n_layers = int(config["num_hidden_layers"])
    arch, shapes = _gguf_tensors(gguf_path)
    names = gguf.get_tensor_name_map(arch, n_layers)
    rows: dict[str, dict[int, tuple[torch.Tensor, float]]] = {}   # GGUF name → expert (or 0) → (sums, count)
    for i in range(steps(config)):
        sums = load_file(str(_sums_file(state_dir, i)))
        for key, s in sums.items():
            if not key.endswith(".in_sum2"):
                continue
            module = key[:-len(".in_sum2")]
            count = float(sums[f"{module}.counts"][0])
            hf = module if i == n_layers else f"{spec.layers_path}.{i}.{spec.stored(module)}"
            m = _EXPERT.match(hf)
            expert = int(m["e"]) if m else 0
            if m:
                hf = f"{m['base']}.{m['rest']}"
            target = _target(names.get_name(hf + ".weight", try_suffixes=(".weight",)), shapes)
            if target is None:
                continue
            if shapes[target][0] != s.numel():
                raise QuantizeError(f"{hf} reads {s.numel()} inputs but {target} in {gguf_path.name} has "
                                    f"{shapes[target][0]} columns; the imatrix names do not fit this GGUF.")
            rows.setdefault(target, {})[expert] = (s, count)
    entries = {}
    for name, by_expert in rows.items():
        shape = shapes[name]
        n_mat = shape[2] if len(shape) > 2 else 1
        width = shape[0]
        s = torch.zeros(n_mat, width, dtype=torch.float64)
        c = torch.zeros(n_mat, dtype=torch.float64)
        for e, (sums, count) in by_expert.items():
            s[e], c[e] = sums, count
        entries[name] = Entry(s.float().numpy(), c.float().numpy())
    settings = _settings(state_dir)
    return Imatrix(entries, [dataset], chunk_count=_chunk_count(state_dir), chunk_size=settings.ctx)


def _target(name: str | None, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The GGUF weight a linear feeds: its mapped name, or the fused gate+up experts tensor some converters
    write (gate and up read the same input, so either one's sums are the fused tensor's)."""
    if name is None:
        return None
    if name in shapes:
        return name
    fused = re.sub(r"\.ffn_(gate|up)_exps\.", ".ffn_gate_up_exps.", name)
    return fused if fused in shapes else None


def _chunk_count(state_dir: Path) -> int:
    return int(json.loads((state_dir / "settings.json").read_text()).get("tokens", 0))


def compute(model_dir: Path, gguf_path: Path, state_dir: Path, settings: Settings, chunks: list[list[int]],
            dataset: str, progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """Everything in this process (CLI, a local GPU or the CPU): prepare, run, assemble."""
    prepare(state_dir, settings, chunks)
    run(model_dir, state_dir, progress=progress)
    return assemble(model_dir, state_dir, gguf_path, dataset)
