"""NF4 for every transformers causal LM: tiny Qwen3, Gemma 3 (text), Phi-3 and SmolLM3 models, built from
transformers' own config classes, quantize, measure, reload 4-bit and train LoRA adapters on every linear layer
of their decoder layers, found from the checkpoint itself (Phi-3's fused qkv_proj / gate_up_proj included)."""

from __future__ import annotations

import json
import math

import pytest

from quantspace.preflight import preflight

LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"qwen3": LLAMA_LIKE, "gemma3": LLAMA_LIKE, "smollm3": LLAMA_LIKE,
           "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def test_nf4_quantizes_measures_and_trains_every_family(tiny_family, tmp_path):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    from quantspace import quantize

    arch, folder = tiny_family
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    pre = preflight(str(folder), "nf4", evaluate=True)
    assert pre.ok, pre.problems
    report = quantize(str(folder), method="nf4", out=tmp_path / "out", ctx=64, max_chunks=2,
                      options={"qlora_steps": 2, "qlora_seqlen": 32})
    f = report.files[0]
    assert report.architecture == config["architectures"][0]
    assert f.details["lora_targets"] == TARGETS[arch]
    m = f.metrics
    assert math.isfinite(m["kld_mean"]) and 0 <= m["kld_mean"] < 1 and m["top1_agreement"] > 0.3, m
    q = f.details["qlora"]
    assert q["target_modules"] == TARGETS[arch]
    assert q["lora_tensors"] == q["lora_tensors_with_gradient"] == 2 * len(TARGETS[arch]) * layers
    assert math.isfinite(q["loss_before"]) and math.isfinite(q["loss_after"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map={"": "cpu"})
    four_bit = [n for n, mod in model.named_modules() if isinstance(mod, Linear4bit)]
    assert len(four_bit) == len(TARGETS[arch]) * layers
    assert {n.rsplit(".", 1)[-1] for n in four_bit} == set(TARGETS[arch])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "target_modules=[" + ", ".join(f'"{t}"' for t in TARGETS[arch]) + "]" in card


def test_awq_preflight_takes_every_family_with_a_layer_table(tiny_family):
    arch, folder = tiny_family
    pre = preflight(str(folder), "awq", evaluate=False)
    assert pre.ok and pre.sizes.get("W4G128", 0) > 0, pre.problems


def test_awq_without_a_layer_table_says_so_before_anything_runs():
    from tests.conftest import _tiny

    pre = preflight(str(_tiny("tiny-stablelm", "bpe", "stablelm")), "awq", evaluate=False)
    assert not pre.ok and len(pre.problems) == 1, pre.problems
    assert "AWQ does not support StableLmForCausalLM yet (supported: " in pre.problems[0]
    assert "Qwen3MoeForCausalLM" in pre.problems[0] and pre.sizes == {}


def test_not_a_causal_lm_and_remote_code_are_refused(tiny_bpe, tmp_path):
    import shutil

    from quantspace.errors import UnsupportedArchitectureError
    from quantspace.formats.nf4 import causal_lm

    assert causal_lm({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) == "LlamaForCausalLM"
    with pytest.raises(UnsupportedArchitectureError, match="never run"):
        causal_lm({"model_type": "my_own", "architectures": ["MyLM"], "auto_map": {"AutoModelForCausalLM": "x.MyLM"}})
    with pytest.raises(UnsupportedArchitectureError, match="is not a causal LM"):
        causal_lm({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    # Multimodal: transformers' class with the language-model head; refused when only remote code would load it.
    assert causal_lm({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                      "vision_config": {}}) == "Gemma3ForConditionalGeneration"
    with pytest.raises(UnsupportedArchitectureError, match="is multimodal and neither"):
        causal_lm({"model_type": "my_vlm", "architectures": ["MyVLM"], "vision_config": {},
                   "auto_map": {"AutoModel": "x.MyVLM"}})
    # A mixture of experts: bitsandbytes would leave the fused experts (most of the weights) 16-bit.
    from tests.conftest import _tiny

    pre = preflight(str(_tiny("tiny-qwen3_moe", "bpe", "qwen3_moe")), "nf4", evaluate=False)
    assert not pre.ok and "Qwen3MoeForCausalLM is a mixture of experts" in pre.problems[0], pre.problems
    assert "GGUF quantizes every expert" in pre.problems[0]
    folder = tmp_path / "t5"
    shutil.copytree(tiny_bpe, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    pre = preflight(str(folder), "nf4", evaluate=False)
    assert not pre.ok and "T5ForConditionalGeneration is not a causal LM" in pre.problems[0]
