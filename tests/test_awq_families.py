"""AWQ beyond Llama: Qwen3, Gemma 3, Phi-3, SmolLM3 and the mixture-of-experts Qwen3-MoE and Mixtral, each as the
GEMM checkpoint vLLM loads, closer to the source than round-to-nearest; routers 16-bit and compensated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from transformers import AutoModelForCausalLM

from quantspace.awq.checkpoint import dequantized_model, rtn_model
from quantspace.awq.search import fold_scale
from quantspace.errors import UnsupportedArchitectureError
from quantspace.report import Report
from tests.conftest import _tiny
from tests.test_awq import TINY_CALIB, _check_transformers_matches_dequantized, _tokens

FAMILIES = ["qwen3", "gemma3", "phi3", "smollm3", "qwen3_moe", "mixtral"]
MOE = ["qwen3_moe", "mixtral"]
ROUTER = {"qwen3_moe": "mlp.gate", "mixtral": "block_sparse_moe.gate"}   # as the checkpoint names them
NOT_CONVERTED = {"qwen3_moe": ["lm_head", "mlp.gate"], "mixtral": ["lm_head", "block_sparse_moe.gate", "mlp.gate"]}


def _source(family: str) -> Path:
    return _tiny(f"tiny-{family}", "spm" if family in ("gemma3", "mixtral") else "bpe", family)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module", params=FAMILIES)
def quantized(request, tmp_path_factory) -> tuple[str, Path, Path, Report]:
    """(family, source, checkpoint folder, report): W4G128 on a short calibration, evaluated with its RTN baseline."""
    from quantspace import quantize

    family = request.param
    src = _source(family)
    out = tmp_path_factory.mktemp(f"awq-{family}")
    report = quantize(str(src), method="awq", out=out, options=TINY_CALIB, ctx=64, max_chunks=2)
    return family, src, out, report


def test_checkpoint_is_close_to_the_source_and_beats_round_to_nearest(quantized):
    family, src, out, report = quantized
    result = report.files[0]
    awq = result.metrics   # the pipeline's own evaluation (dequantized checkpoint, and its RTN baseline)
    assert awq["kld_mean"] < 0.25 and abs(awq["delta_ppl"]) < 0.1 * report.source_metrics["perplexity"]
    assert result.details["rtn"]["kld_mean"] < 0.25
    # Beats round-to-nearest on held-out text like the calibration (the eval text of a random tiny model is too
    # short to separate the two reliably): the calibration used the first 4 of these blocks.
    ids = torch.tensor(_tokens(src, 6, 64)[4:])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits.log_softmax(-1)
        kld = {}
        for name, model in (("awq", dequantized_model(out)), ("rtn", rtn_model(src, 128))):
            lp = model(ids).logits.log_softmax(-1)
            kld[name] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kld["awq"] < kld["rtn"], kld
    # The GEMM layout: every 2-D weight of the decoder layers packed (each expert's too), except the router.
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": NOT_CONVERTED.get(family, ["lm_head"])}
    source, ckpt = _tensors(src / "model.safetensors"), _tensors(out / "model.safetensors")
    matrices = {n[:-len(".weight")] for n, t in source.items() if ".layers." in n and t.dim() == 2}
    routers = {n for n in matrices if family in ROUTER and n.endswith("." + ROUTER[family])}
    packed = {n[:-len(".qweight")] for n in ckpt if n.endswith(".qweight")}
    assert packed == matrices - routers and len(packed) >= 8
    for name in packed:
        assert ckpt[name + ".qweight"].dtype == torch.int32 and name + ".weight" not in ckpt
    assert all(ckpt[r + ".weight"].dtype == torch.float16 for r in routers)
    assert all(t.dtype in (torch.float16, torch.int32) for t in ckpt.values())
    # The size estimate from headers alone knows which tensors AWQ packs.
    from quantspace.estimate import estimate

    assert abs(estimate(str(src), method="awq").sizes["W4G128"] - result.size_bytes) < 0.02 * result.size_bytes


def _routing(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the experts each router picks, sorted: [layers, tokens, top_k]; what enters each post-attention norm)."""
    picks, residuals = [], []
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.mlp.gate.register_forward_hook(lambda m, a, out: picks.append(out[2].sort(-1).values)))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: residuals.append(a[0])))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(picks), residuals


def test_layer_by_layer_measurement_equals_the_whole_dequantized_model(quantized, tmp_path):
    """The pipeline measures the checkpoint (and its RTN baseline) one decoder layer at a time: the same KLD,
    ΔPPL and top-1 as the whole dequantized model (and the whole rounded source) loaded in float32."""
    from quantspace.awq.checkpoint import CheckpointWeights, RoundedWeights
    from quantspace.evaluate import (EvalSettings, evaluate_layers, evaluate_source, evaluate_torch_model,
                                     load_eval_text, tokenize_for_eval)

    family, src, out, report = quantized
    settings = EvalSettings(ctx=64, max_chunks=2, threads=2)
    chunks = tokenize_for_eval(src, load_eval_text(), settings)
    steps: list[tuple[int, int]] = []
    with evaluate_source(src, chunks, settings, tmp_path, "t") as ref:
        pairs = [(evaluate_layers(out, CheckpointWeights(out), ref, progress=lambda *a: steps.append(a)),
                  evaluate_torch_model(dequantized_model(out), ref)),
                 (evaluate_layers(src, RoundedWeights(src, 128), ref), evaluate_torch_model(rtn_model(src, 128), ref))]
    for layered, whole in pairs:
        assert layered.kld_mean > 1e-4   # quantized: there is a difference to measure
        assert abs(layered.kld_mean - whole.kld_mean) < 1e-5 + 1e-3 * whole.kld_mean, (layered, whole)
        assert abs(layered.perplexity / whole.perplexity - 1) < 1e-4
        assert abs(layered.top1_agreement - whole.top1_agreement) <= 1 / whole.n_tokens   # a near-tie at most
    # The report's numbers are the layered ones (same settings as the fixture's run).
    assert abs(report.files[0].metrics["kld_mean"] - pairs[0][0].kld_mean) < 1e-6
    assert abs(report.files[0].details["rtn"]["kld_mean"] - pairs[1][0].kld_mean) < 1e-6
    # One progress bar: the layers, then the chunks, to the end.
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert steps[0] == (1, layers + 2) and steps[-1] == (layers + 2, layers + 2)
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)


@pytest.mark.parametrize("quantized", MOE, indirect=True)
def test_routers_stay_16_bit_and_route_as_the_source(quantized):
    family, src, out, _ = quantized
    source, ckpt = _tensors(src / "model.safetensors"), _tensors(out / "model.safetensors")
    for i in range(2):
        router, norm = f"model.layers.{i}.{ROUTER[family]}.weight", f"model.layers.{i}.post_attention_layernorm.weight"
        # The norm's scales were folded out and into the router's input columns: router(norm(x)) is unchanged.
        before = source[router].half().float() * source[norm].half().float()
        after = ckpt[router].float() * ckpt[norm].float()
        assert torch.allclose(after, before, rtol=4e-3, atol=1e-4)
        assert not torch.equal(ckpt[router], source[router].half())   # the scales did reach it
    ids = torch.tensor(_tokens(src, 4, 64))
    ref_model, ours = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), dequantized_model(out)
    ref, _ = _routing(ref_model, ids)
    got, residuals = _routing(ours, ids)
    # Given the same hidden state, the checkpoint's norm and router pick the source's experts.
    with torch.no_grad():
        for i, r in enumerate(residuals):
            pick = [m.model.layers[i].mlp.gate(m.model.layers[i].post_attention_layernorm(r))[2].sort(-1).values
                    for m in (ref_model, ours)]
            assert (pick[0] == pick[1]).all(-1).float().mean() > 0.995   # without compensation: 0.94-0.99
    # End to end, the quantized attention before it moves some close calls; most tokens keep their experts.
    agree = (ref == got).all(-1).float().mean(-1)
    assert agree.min() > 0.75, agree


@pytest.mark.parametrize("family, probe", [("qwen3", "self_attn.q_proj"), ("gemma3", "self_attn.q_proj"),
                                           ("phi3", "self_attn.qkv_proj"), ("smollm3", "self_attn.q_proj")])
def test_transformers_loads_the_dense_families_like_our_dequantized_model(family, probe, tmp_path):
    """transformers 5 fuses MoE experts into 3-D parameters and cannot load per-expert AWQ tensors (vLLM can):
    dense families only."""
    from quantspace import quantize

    src = _source(family)
    quantize(str(src), method="awq", out=tmp_path / "o", options=TINY_CALIB, no_eval=True)
    _check_transformers_matches_dequantized(tmp_path / "o", _tokens(src, 1, 24)[0], rel=2e-3, new_tokens=4,
                                            probe=probe)


def test_gemma_norm_fold_respects_one_plus_weight():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(2)
    x, s = torch.randn(16, 128), torch.rand(128) + 0.5
    for offset, keeps in ((1.0, True), (0.0, False)):   # folding as if w were the multiplier breaks Gemma
        norm, lin = Gemma3RMSNorm(128), torch.nn.Linear(128, 32, bias=False)
        with torch.no_grad():
            norm.weight.normal_(0, 0.3)
        before = lin(norm(x))
        fold_scale(norm, [lin], s, norm_offset=offset)
        assert torch.allclose(lin(norm(x)), before, atol=1e-5) is keeps


def test_phi3_down_scales_go_into_the_up_half_of_gate_up():
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    torch.manual_seed(3)
    mlp = Phi3MLP(Phi3Config(hidden_size=64, intermediate_size=128))
    x, s = torch.randn(8, 64), torch.rand(128) + 0.5
    before = mlp(x)
    fold_scale(mlp.gate_up_proj, [mlp.down_proj], s)   # the last 128 rows: Phi3MLP chunks gate first, up second
    assert torch.allclose(mlp(x), before, atol=1e-5)


def test_unsupported_architecture_gives_one_line_naming_what_awq_supports(tmp_path):
    from quantspace import quantize
    from quantspace.awq.layers import spec_for

    names = ["Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
             "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "SmolLM3ForCausalLM"]
    for arch in ("GPT2LMHeadModel", "Gemma3ForConditionalGeneration"):
        with pytest.raises(UnsupportedArchitectureError) as err:
            spec_for({"architectures": [arch]})
        message = str(err.value)
        assert "\n" not in message and arch in message and f"supported: {', '.join(names)})" in message
    other = tmp_path / "gpt2"
    shutil.copytree(_source("qwen3"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="MixtralForCausalLM"):
        quantize(str(other), method="awq", out=tmp_path / "o", no_eval=True)
    assert not (tmp_path / "o").exists()


def test_moe_model_with_a_dense_layer_is_refused_before_any_layer(tmp_path):
    """Qwen3-MoE's mlp_only_layers make some layers dense: their gate_proj would collide with the router's
    "mlp.gate" in vLLM's substring match, so such models are refused with the reason."""
    from quantspace import quantize

    other = tmp_path / "mixed"
    shutil.copytree(_source("qwen3_moe"), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1]}))
    with pytest.raises(UnsupportedArchitectureError, match="Layer 1 has no mlp.experts.0.gate_proj"):
        quantize(str(other), method="awq", out=tmp_path / "o", options=TINY_CALIB, no_eval=True)
