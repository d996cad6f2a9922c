"""NF4/FP4 bitsandbytes checkpoints on the CPU: what is saved, that it reloads 4-bit and fine-tunes, and the
accuracy/QLoRA numbers the card reports (real SmolLM2 through the local Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantspace.report import Report
from tests.hub_fixtures import ALICE_TOKEN
from tests.test_pipeline import run_cli, seed

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def safetensors_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def load_4bit(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})


def test_checkpoint_reloads_4bit_and_generates(tiny_bpe, tmp_path):
    """The saved folder is a transformers checkpoint whose linears reload as 4-bit NF4 and generate."""
    import torch
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoTokenizer

    from quantspace import quantize
    from quantspace.estimate import estimate

    out = tmp_path / "out"
    report = quantize(str(tiny_bpe), method="nf4", out=out, no_eval=True, options={"qlora_check": False})
    assert report.name == "tiny-llama-bpe-bnb-4bit"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "quantspace.json", "config.json", "model.safetensors", "generation_config.json",
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_bpe / name).read_bytes(), name
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] is True
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["llm_int8_skip_modules"] == ["lm_head"]

    model = load_4bit(out)
    n_layers = model.config.num_hidden_layers
    four_bit = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(four_bit) == n_layers * len(PROJECTIONS)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8 and q.weight.quant_state.quant_type == "nf4"
    assert q.weight.quant_state.nested   # double quantization: the block scales are quantized too
    assert not isinstance(model.lm_head, Linear4bit)   # skipped by default
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The State of the Union is", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 6

    f = report.files[0]
    assert f.variant == "NF4" and f.filename == "model.safetensors"
    assert f.size_bytes == (out / "model.safetensors").stat().st_size
    d = f.details
    assert d["quantized_layers"] == len(four_bit)
    assert d["memory_footprint_bytes"] == model.get_memory_footprint()
    assert d["memory_footprint_bytes"] < d["source_memory_footprint_bytes"] / 3
    assert d["source_file_bytes"] == (tiny_bpe / "model.safetensors").stat().st_size
    assert "qlora" not in d
    # The estimate (from headers alone) is close to what was written.
    est = estimate(str(tiny_bpe), method="nf4", variants=["NF4"]).sizes["NF4"]
    assert abs(est - f.size_bytes) < 0.1 * f.size_bytes
    card = (out / "README.md").read_text()
    assert 'model_id = "."' in card and "Not run for this upload" in card


def test_fp4_double_quant_and_skip_modules_change_what_is_saved(tiny_qwen2, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from quantspace import quantize

    runs = {
        "nf4": {},
        "fp4": {},
        "plain": {"double_quant": "false", "skip_modules": "lm_head,down_proj"},
    }
    reports, keys = {}, {}
    for name, opts in runs.items():
        out = tmp_path / name
        reports[name] = quantize(str(tiny_qwen2), method="nf4", variants="fp4" if name == "fp4" else "NF4",
                                 out=out, no_eval=True, options={"qlora_check": False, **opts})
        keys[name] = safetensors_keys(out / "model.safetensors")
    q_state = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__{}"
    assert q_state.format("nf4") in keys["nf4"] and q_state.format("fp4") in keys["fp4"]
    assert q_state.format("fp4") not in keys["nf4"]
    nested = "model.layers.0.self_attn.q_proj.weight.nested_absmax"
    assert nested in keys["nf4"] and nested not in keys["plain"]
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in keys["plain"]   # stayed unquantized
    sizes = {n: r.files[0].size_bytes for n, r in reports.items()}
    assert sizes["nf4"] == sizes["fp4"] < sizes["plain"]   # fp32 scales and a 16-bit down_proj weigh more
    assert reports["fp4"].files[0].variant == "FP4"
    qc = json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4"
    plain = load_4bit(tmp_path / "plain")
    assert not isinstance(plain.model.layers[0].mlp.down_proj, Linear4bit)
    assert isinstance(plain.model.layers[0].mlp.up_proj, Linear4bit)
    assert not plain.model.layers[0].mlp.up_proj.weight.quant_state.nested
    card = (tmp_path / "fp4" / "README.md").read_text()
    assert "fp4" in card.split("---")[1] and "bnb-4bit" in card


def test_smollm2_push_accuracy_and_qlora_check(hub, smollm2, tmp_path, capsys, monkeypatch):
    """Real SmolLM2 from the local Hub → NF4 → pushed with card and report; accuracy close to the source and
    the QLoRA check trained every LoRA tensor of the reloaded checkpoint."""
    seed(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2)
    hub.put_file("HuggingFaceTB/SmolLM2-135M-Instruct", "README.md", b"---\nlicense: apache-2.0\n---\n# SmolLM2\n")
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    target = "alice/SmolLM2-135M-Instruct-bnb-4bit"
    code, out, err = run_cli(["quantize", "HuggingFaceTB/SmolLM2-135M-Instruct", "--method", "nf4", "--push", target,
                              "--out", str(tmp_path / "out"), "--ctx", "128", "--chunks", "2",
                              "--qlora-steps", "2", "--qlora-seqlen", "32"], capsys)
    assert code == 0, err
    files = hub.files(target)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "quantspace.json"} == set(files) - {".gitattributes"}
    assert len(hub.commits(target)) == 2

    from huggingface_hub import ModelCard

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "quantized"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert {"bitsandbytes", "4-bit", "nf4", "qlora"} <= set(card.data.tags)
    assert f'model_id = "{target}"' in card.text
    assert 'target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]' \
        in card.text

    report = Report.from_dict(json.loads(files["quantspace.json"]))
    f = report.files[0]
    assert f.size_bytes == len(files["model.safetensors"])
    m, src = f.metrics, report.source_metrics
    assert m["kld_mean"] < 0.35 and m["top1_agreement"] > 0.65
    assert 0 < m["delta_ppl"] < 0.3 * src["perplexity"]
    assert f"{m['perplexity']:.4f}" in card.text

    d = f.details
    # 135M parameters, 4-bit linears, 16-bit tied embedding: well under half the bf16 source in memory.
    assert d["memory_footprint_bytes"] < 0.5 * d["source_memory_footprint_bytes"]
    q = d["qlora"]
    cfg = json.loads((smollm2 / "config.json").read_text())
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + inter) * 2 + (inter + h)   # in+out of each projection
    assert q["trainable_parameters"] == 8 * per_layer * cfg["num_hidden_layers"]
    assert q["lora_tensors"] == q["lora_tensors_with_gradient"] == 2 * 7 * cfg["num_hidden_layers"]
    assert q["steps"] == 2 and q["seqlen"] == 32 and q["device"] == "cpu"
    assert q["loss_after"] < q["loss_before"] < 10
    assert f"{q['loss_before']:.4f}" in card.text and f"{q['trainable_parameters']:,}" in card.text
    assert "--method nf4 --variants NF4 --qlora-steps 2 --qlora-seqlen 32" in report.command


def test_failed_qlora_check_leaves_nothing_behind(tiny_bpe, tmp_path, monkeypatch):
    """A QLoRA check that diverges fails the run after quantizing; the output folder keeps only what was there."""
    from quantspace import qlora, quantize
    from quantspace.errors import QuantizeError

    monkeypatch.setattr(qlora, "LEARNING_RATE", 1e30)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QuantizeError, match="QLoRA check's loss"):
        quantize(str(tiny_bpe), method="nf4", out=out, no_eval=True, options={"qlora_steps": 2, "qlora_seqlen": 32})
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_short_calibration_dataset_fails_before_quantizing(hub, tiny_bpe, tmp_path, monkeypatch):
    from quantspace import quantize
    from quantspace.errors import CalibrationError
    from quantspace.formats import nf4

    hub.create_repo("alice/short", repo_type="dataset")
    hub.put_file("alice/short", "calib.txt", b"Too short.", repo_type="dataset")
    monkeypatch.setattr(nf4, "quantize_folder", lambda *a: pytest.fail("quantized before reading calibration"))
    with pytest.raises(CalibrationError, match="fewer than one sample"):
        quantize(str(tiny_bpe), method="nf4", out=tmp_path / "out", no_eval=True,
                 options={"calib_dataset": "alice/short"})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--variants", "NF4,FP4"], "one checkpoint per run"),
    (["--variants", "int3"], "Unknown NF4 variant 'int3'"),
    (["--compute-dtype", "float32"], "compute_dtype of nf4 must be one of bfloat16, float16"),
    (["--qlora-steps", "0"], "qlora_steps of nf4 must be at least 1"),
    (["--double-quant", "maybe"], "double_quant of nf4 must be a bool"),
    (["--group-size", "64"], "unrecognized arguments"),
])
def test_bad_options_fail_before_download(hub, tiny_bpe, tmp_path, capsys, monkeypatch, args, message):
    seed(hub, "quantorg/tiny", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    try:
        code, _, err = run_cli(["quantize", "quantorg/tiny", "--method", "nf4", *args, "--out", str(tmp_path / "o")],
                               capsys)
    except SystemExit as exc:   # argparse refuses flags no format defines
        code, err = exc.code, capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not any(p.endswith(".safetensors") for m, p in hub.requests_log if m == "GET")
    assert not (tmp_path / "o").exists()


def test_unknown_option_and_unknown_module_are_refused(tiny_bpe, tmp_path):
    from quantspace import quantize
    from quantspace.errors import BadOptionError

    with pytest.raises(BadOptionError, match="Unknown option.*group_size"):
        quantize(str(tiny_bpe), method="nf4", out=tmp_path / "a", no_eval=True, options={"group_size": 64})
    with pytest.raises(BadOptionError, match="skip_modules names no layer of this model: mlp.gate"):
        quantize(str(tiny_bpe), method="nf4", out=tmp_path / "b", no_eval=True,
                 options={"skip_modules": "lm_head, mlp.gate"})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gpu_stages_cross_a_process_boundary(tiny_qwen2, tmp_path):
    """On a ZeroGPU Space each GPU stage runs in another process: its function, arguments and result must
    pickle. A runner that round-trips all three through pickle gives the same checkpoint and numbers."""
    import pickle

    from quantspace import quantize

    called = []

    def pickling_runner(fn, *args):
        called.append(fn.__name__)
        fn, args = pickle.loads(pickle.dumps((fn, args)))
        return pickle.loads(pickle.dumps(fn(*args)))

    opts = {"qlora_steps": 2, "qlora_seqlen": 32}
    direct = quantize(str(tiny_qwen2), method="nf4", out=tmp_path / "a", ctx=64, max_chunks=2, options=opts)
    crossed = quantize(str(tiny_qwen2), method="nf4", out=tmp_path / "b", ctx=64, max_chunks=2, options=opts,
                       run_gpu=pickling_runner)
    assert called == ["quantize_folder", "qlora_check", "evaluate_folder"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert crossed.files[0].metrics == direct.files[0].metrics
    a, b = direct.files[0].details["qlora"], crossed.files[0].details["qlora"]
    assert (a["loss_before"], a["loss_after"]) == (b["loss_before"], b["loss_after"])


def test_qlora_check_fails_loudly_when_training_diverges(tiny_bpe, tmp_path, monkeypatch):
    """A check whose loss stops being finite is an error, not a number on the card."""
    from quantspace import qlora
    from quantspace.errors import QuantizeError
    from quantspace.formats.nf4 import OPTIONS, bnb_config, quantize_folder

    folder = tmp_path / "nf4"
    quantize_folder(str(tiny_bpe), str(folder), bnb_config("NF4", {o.name: o.default for o in OPTIONS}), "cpu")
    blocks = [[i % 500 + 4 for i in range(s, s + 32)] for s in range(0, 128, 32)]
    ok = qlora.qlora_check(str(folder), blocks, ["q_proj", "down_proj"], 2, "cpu")
    assert ok["lora_tensors"] == 2 * 2 * 2 and ok["trainable_parameters"] == 8 * 2 * ((256 + 256) + (512 + 256))
    monkeypatch.setattr(qlora, "LEARNING_RATE", 1e30)
    with pytest.raises(QuantizeError, match="loss on .* is (nan|inf)"):
        qlora.qlora_check(str(folder), blocks, ["q_proj", "down_proj"], 2, "cpu")


def test_estimate_lists_each_variant(tiny_bpe, capsys):
    code, out, err = run_cli(["estimate", str(tiny_bpe), "--method", "nf4", "--json"], capsys)
    assert code == 0, err
    sizes = json.loads(out)["sizes"]
    assert set(sizes) == {"NF4", "FP4"} and 0 < sizes["NF4"] < (tiny_bpe / "model.safetensors").stat().st_size


def test_qlora_check_trains_where_bitsandbytes_packs_layers_for_cpu_inference(tiny_bpe, tmp_path, monkeypatch):
    """On an AVX512-BF16 CPU, bitsandbytes rewrites a 4-bit layer into an inference-only layout (no backward) at
    its first eval forward without grad. Driven here on every CPU: the layers believe the CPU has the feature and
    arrive already rewritten, as the library leaves them; the check still trains every LoRA tensor."""
    import bitsandbytes.nn.modules as bnb_modules
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn import Linear4bit

    from quantspace import qlora
    from quantspace.formats.nf4 import OPTIONS, bnb_config, quantize_folder

    folder = tmp_path / "nf4"
    quantize_folder(str(tiny_bpe), str(folder), bnb_config("NF4", {o.name: o.default for o in OPTIONS}), "cpu")
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    real_load, packed_at_load = qlora.load_4bit, []

    def load_packed(path, device):
        model = real_load(path, device)
        for layer in (m for m in model.modules() if isinstance(m, Linear4bit)):
            assert layer.support_avx512bf16_for_cpu
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                        layer.weight.quant_state)
            packed_at_load.append(layer)
        return model

    monkeypatch.setattr(qlora, "load_4bit", load_packed)
    blocks = [[i % 500 + 4 for i in range(s, s + 32)] for s in range(0, 160, 32)]
    result = qlora.qlora_check(str(folder), blocks, list(PROJECTIONS), 4, "cpu")
    assert len(packed_at_load) == 2 * len(PROJECTIONS)
    assert not any(qlora._packed(layer) or layer.support_avx512bf16_for_cpu for layer in packed_at_load)
    assert result["lora_tensors"] == result["lora_tensors_with_gradient"] == 2 * 2 * len(PROJECTIONS)
    assert result["loss_after"] < result["loss_before"]


def test_check_computes_in_bf16_only_where_the_cpu_has_it(tiny_bpe, tmp_path, monkeypatch):
    from quantspace import qlora
    from quantspace.formats.nf4 import OPTIONS, bnb_config, quantize_folder

    folder = tmp_path / "nf4"
    quantize_folder(str(tiny_bpe), str(folder), bnb_config("NF4", {o.name: o.default for o in OPTIONS}), "cpu")
    blocks = [[i % 500 + 4 for i in range(s, s + 16)] for s in range(0, 48, 16)]
    for has, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(qlora, "cpu_has_bf16", lambda has=has: has)
        assert qlora.qlora_check(str(folder), blocks, ["q_proj"], 1, "cpu")["compute_dtype"] == dtype
