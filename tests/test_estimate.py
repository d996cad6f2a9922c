"""Size estimates against the files llama.cpp really writes: per-tensor types first, then whole-file sizes.

Every GGUF variant is made for real (one F16 intermediate per model, through the format's own produce()) on
tiny models with all their rows a multiple of 256 (tiny_bpe, tiny_qwen2), on an odd-shaped tiny model that
forces llama.cpp's fallbacks (hidden 160, FFN 400: Q5_0/Q5_1/Q8_0 and F16 instead of K-quants), and on the
real SmolLM2-135M (hidden 576, tied embeddings, 30 layers) in SMOLLM2_VARIANTS.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from quantspace.estimate import estimate, tensor_shapes
from quantspace.formats import Context, get_format
from quantspace.formats.gguf import VARIANTS
from quantspace.gguf_types import choose_types, f16_tensors, model_facts
from quantspace.source import resolve

GGUF_VARIANTS = get_format("gguf").variants
# SmolLM2 in every variant costs minutes on 2 cores; these cover each kind of rule: plain, the output/fallback
# rules only (Q8_0, Q6_K), more_bits bumps with fallbacks (Q4_K_M, Q5_K_M), first-layers bumps (Q3_K_M, Q4_K_S),
# the 2-bit mix (Q2_K), a legacy type (Q4_0) and our converter's own BF16.
SMOLLM2_VARIANTS = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
TOLERANCE = 0.03


def _no_progress(name: str):
    return lambda done, total: None


def odd_model(out: Path, tokenizer_from: Path) -> Path:
    """A tiny Llama whose rows are not multiples of 256 (and FFN rows not of 32), tied embeddings, GQA 4, 16
    layers: every fallback and every layer-dependent rule of llama.cpp's choice shows up."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(hidden_size=160, intermediate_size=400, num_hidden_layers=16, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def models(tiny_bpe, tiny_qwen2, smollm2, tmp_path_factory) -> dict[str, Path]:
    odd = odd_model(tmp_path_factory.mktemp("odd") / "tiny-odd", tiny_bpe)
    return {"tiny_bpe": tiny_bpe, "tiny_qwen2": tiny_qwen2, "tiny_odd": odd, "smollm2": smollm2}


@pytest.fixture(scope="module")
def made(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(model, variant) → the file the product wrote; one produce() call per model shares its F16 file."""
    fmt = get_format("gguf")
    out: dict[tuple[str, str], Path] = {}
    for key, src in models.items():
        variants = list(SMOLLM2_VARIANTS if key == "smollm2" else GGUF_VARIANTS)
        folder = tmp_path_factory.mktemp(key)
        for o in fmt.produce(src, folder, key, variants, Context(stage=_no_progress)):
            out[key, o.variant] = o.path
    return out


CASES = [(m, v) for m in ("tiny_bpe", "tiny_qwen2", "tiny_odd") for v in GGUF_VARIANTS] + \
        [("smollm2", v) for v in SMOLLM2_VARIANTS]


def _written_types(path: Path) -> dict[str, gguf.GGMLQuantizationType]:
    return {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("model,variant", CASES)
def test_predicted_types_are_what_llama_cpp_wrote(models, made, model, variant):
    """Tensor by tensor, the type we predict from safetensors headers + config is the one in the file."""
    info = resolve(str(models[model]))
    tensors = f16_tensors(tensor_shapes(info, None), info.config)
    if variant in ("F16", "BF16"):
        wide = gguf.GGMLQuantizationType[variant]
        predicted = {n: wide if t == gguf.GGMLQuantizationType.F16 else t for n, (_, t) in tensors.items()}
    else:
        predicted = choose_types(tensors, VARIANTS[variant].ftype, model_facts(info.config))
    written = _written_types(made[model, variant])
    assert set(predicted) == set(written)
    wrong = {n: (predicted[n].name, written[n].name) for n in written if predicted[n] != written[n]}
    assert not wrong, f"{model} {variant}: predicted vs written {wrong}"


@pytest.mark.parametrize("model,variant", CASES)
def test_size_estimate_within_3_percent(models, made, model, variant):
    """The estimate a user sees before any download is within 3% of the file llama.cpp writes."""
    est = estimate(str(models[model]), "gguf", [variant]).sizes[variant]
    real = made[model, variant].stat().st_size
    assert abs(est - real) <= TOLERANCE * real, f"{model} {variant}: estimated {est}, wrote {real} " \
                                                f"({(est - real) / real:+.1%})"


def test_fallbacks_are_exercised(models, made):
    """The odd model really makes llama.cpp fall back (else the type test above would prove little)."""
    Q = gguf.GGMLQuantizationType
    written = _written_types(made["tiny_odd", "Q4_K_M"])
    kinds = set(written.values())
    assert {Q.Q5_0, Q.Q8_0, Q.F16} <= kinds, kinds
    smol = _written_types(made["smollm2", "Q4_K_M"])
    assert Q.Q5_0 in set(smol.values()) and smol["token_embd.weight"] == Q.Q8_0

