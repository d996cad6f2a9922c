"""Size estimates against the files llama.cpp really writes: per-tensor types first, then whole-file sizes.

Every GGUF variant is made for real (one F16 intermediate per model, through the format's own produce()) on
tiny models with all their rows a multiple of 256 (tiny_bpe, tiny_qwen2, and a 16-layer one where the
layer-dependent rules show), on an odd-shaped tiny model that forces llama.cpp's fallbacks (hidden 160, FFN 400:
Q5_0/Q5_1/Q8_0, IQ4_NL and F16 instead of K- and IQ-quants), and on the real SmolLM2-135M (hidden 576, tied
embeddings, 30 layers). The variants llama.cpp makes only with an importance matrix (IQ3_XS ... IQ1_S) are
quantized from the same F16 file with an all-ones one (tests.test_gguf_types), and predicted with one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from quantspace.estimate import estimate, tensor_shapes
from quantspace.formats import Context, TensorStats, get_format
from quantspace.formats.gguf import VARIANTS
from quantspace.converter.tensor_types import choose_types, f16_tensors, model_facts
from quantspace.source import resolve
from tests.test_gguf_types import quantize_with_ones_imatrix

GGUF_VARIANTS = get_format("gguf").variants
TOLERANCE = 0.03


def _no_progress(name: str):
    return lambda done, total: None


def tiny_llama(out: Path, tokenizer_from: Path, **shape) -> Path:
    """A random Llama of the given shape with the tokenizer of another test model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-5, **shape)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


# Rows not a multiple of 256 (FFN rows not even of 32), tied embeddings, 4 heads per KV head, 16 layers: every
# fallback and every layer-dependent rule of llama.cpp's choice shows up.
ODD = dict(hidden_size=160, intermediate_size=400, num_hidden_layers=16, num_attention_heads=8,
           num_key_value_heads=2, tie_word_embeddings=True)
# 80 layers with grouped-query attention: llama.cpp takes it for a 70B model and gives attn_v more bits.
DEEP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=80, num_attention_heads=4,
            num_key_value_heads=1, tie_word_embeddings=False)
# 16 layers whose rows all split into 256-weight blocks, no grouped-query attention: the per-layer rules of the
# K- and IQ-quants without any fallback in the way.
LAYERED = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=16, num_attention_heads=4,
               num_key_value_heads=4, tie_word_embeddings=False)
MODELS = ("tiny_bpe", "tiny_qwen2", "tiny_odd", "tiny_deep", "tiny_layered", "smollm2")


# The tiny models take every variant; SmolLM2 (slow to quantize to IQ1/IQ2 on a CPU) the ones people use most
# and one of each family, which its 576-wide rows send through llama.cpp's fallbacks.
SMOLLM2_VARIANTS = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0",
                    "IQ4_XS", "Q3_K_M", "Q3_K_S", "IQ3_XXS", "Q2_K", "IQ2_XXS", "IQ1_S")


def variants_of(model: str) -> tuple[str, ...]:
    return SMOLLM2_VARIANTS if model == "smollm2" else GGUF_VARIANTS


@pytest.fixture(scope="module")
def models(tiny_bpe, tiny_qwen2, smollm2, tmp_path_factory) -> dict[str, Path]:
    odd = tiny_llama(tmp_path_factory.mktemp("odd") / "tiny-odd", tiny_bpe, **ODD)
    deep = tiny_llama(tmp_path_factory.mktemp("deep") / "tiny-deep", tiny_bpe, **DEEP)
    layered = tiny_llama(tmp_path_factory.mktemp("layered") / "tiny-layered", tiny_bpe, **LAYERED)
    return {"tiny_bpe": tiny_bpe, "tiny_qwen2": tiny_qwen2, "tiny_odd": odd, "tiny_deep": deep,
            "tiny_layered": layered, "smollm2": smollm2}


@pytest.fixture(scope="module")
def made(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """(model, variant) → the file the product wrote; one produce() call per model shares its F16 file."""
    fmt = get_format("gguf")
    out: dict[tuple[str, str], Path] = {}
    for key, src in models.items():
        variants = [v for v in variants_of(key) if not VARIANTS[v].needs_imatrix]
        folder = tmp_path_factory.mktemp(key)
        # Without an importance matrix here (the prediction below is told so); the types that need one get an
        # all-ones one.
        for o in fmt.produce(src, folder, key, variants, Context(stage=_no_progress, options={"imatrix": "off"})):
            out[key, o.variant] = o.path
        for v in variants_of(key):
            if VARIANTS[v].needs_imatrix:
                out[key, v] = folder / f"{key}-{v}.gguf"
                quantize_with_ones_imatrix(out[key, "F16"], out[key, v], VARIANTS[v].ftype)
    return out


CASES = [(m, v) for m in MODELS for v in variants_of(m)]


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
        predicted = choose_types(tensors, VARIANTS[variant].ftype, model_facts(info.config),
                                 imatrix=VARIANTS[variant].needs_imatrix)
    written = _written_types(made[model, variant])
    assert set(predicted) == set(written)
    wrong = {n: (predicted[n].name, written[n].name) for n in written if predicted[n] != written[n]}
    assert not wrong, f"{model} {variant}: predicted vs written {wrong}"


@pytest.mark.parametrize("model,variant", CASES)
def test_size_estimate_within_3_percent(models, made, model, variant):
    """The estimate a user sees before any download is within 3% of the file llama.cpp writes."""
    if VARIANTS[variant].needs_imatrix:   # as the run will quantize it: with an importance matrix
        info = resolve(str(models[model]))
        stats = TensorStats(tensor_shapes(info, None), info.config, info.files, {"imatrix": "auto"})
        est = get_format("gguf").estimate(stats, [variant])[variant]
    else:
        est = estimate(str(models[model]), "gguf", [variant], options={"imatrix": "off"}).sizes[variant]
    real = made[model, variant].stat().st_size
    assert abs(est - real) <= TOLERANCE * real, f"{model} {variant}: estimated {est}, wrote {real} " \
                                                f"({(est - real) / real:+.1%})"


def test_the_rules_are_exercised(models, made):
    """The test models really make llama.cpp fall back and bump (else the type test above would prove little)."""
    Q = gguf.GGMLQuantizationType
    odd = _written_types(made["tiny_odd", "Q4_K_M"])
    assert {Q.Q5_0, Q.Q8_0, Q.F16} <= set(odd.values())               # Q4_K, Q6_K and no 32-block fit
    assert odd["blk.0.attn_v.weight"] != odd["blk.3.attn_v.weight"]    # more bits in some layers only
    smol = _written_types(made["smollm2", "Q4_K_M"])
    assert Q.Q5_0 in set(smol.values()) and smol["token_embd.weight"] == Q.Q8_0
    deep = _written_types(made["tiny_deep", "Q4_K_S"])
    assert deep["blk.79.attn_v.weight"] == Q.Q5_1                        # 70B rule: Q5_K, which falls back
    assert deep["blk.79.attn_k.weight"] == Q.Q5_0
    wide = {v: _written_types(made["tiny_layered", v]) for v in ("IQ2_XXS", "IQ3_XS", "IQ3_XXS", "IQ2_M")}
    assert wide["IQ2_XXS"]["blk.1.ffn_down.weight"] == Q.Q2_K != wide["IQ2_XXS"]["blk.2.ffn_down.weight"]
    assert wide["IQ2_XXS"]["token_embd.weight"] == Q.Q2_K and wide["IQ2_XXS"]["output.weight"] == Q.Q5_K
    assert wide["IQ3_XS"]["blk.1.ffn_up.weight"] == Q.IQ3_S != wide["IQ3_XS"]["blk.2.ffn_up.weight"]
    assert wide["IQ3_XXS"]["blk.0.attn_k.weight"] == Q.IQ2_S and wide["IQ2_M"]["blk.0.attn_v.weight"] == Q.IQ3_S
    assert set(_written_types(made["tiny_odd", "IQ2_XXS"]).values()) >= {Q.IQ4_NL, Q.F16}   # IQ fallbacks



@pytest.mark.parametrize("model", ["tiny_bpe", "smollm2"])
def test_nf4_estimate_within_3_percent(models, model, tmp_path):
    """The bitsandbytes 4-bit checkpoint (default options, on the CPU) is the size the estimate said."""
    from quantspace.formats.nf4 import OPTIONS, bnb_config, quantize_folder

    options = {o.name: o.default for o in OPTIONS}
    quantize_folder(str(models[model]), str(tmp_path), bnb_config("NF4", options), "cpu")
    real = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    est = estimate(str(models[model]), "nf4", ["NF4"]).sizes["NF4"]
    assert abs(est - real) <= TOLERANCE * real, f"{model}: estimated {est}, wrote {real} ({(est - real) / real:+.1%})"


@pytest.mark.parametrize("model", ["tiny_qwen2", "tiny_odd"])
def test_hub_estimate_equals_local_estimate(hub, models, model, tmp_path):
    """From the Hub (headers, config and file sizes only, no weights fetched) the sizes are the same as from the
    folder, so the 3% above holds before any download too."""
    for method in ("gguf", "nf4"):
        hub.create_repo(f"quantorg/{model}-{method}")
        hub.upload_folder(f"quantorg/{model}-{method}", models[model])
        remote = estimate(f"quantorg/{model}-{method}", method)
        assert remote.sizes == estimate(str(models[model]), method).sizes
    assert not list((tmp_path / "hf_home").rglob("*.safetensors"))   # the client side fetched no weights
