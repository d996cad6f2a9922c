"""AWQ: the packed layout, the engine (resume, biases), the checkpoint as transformers loads it, the product path."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from quantspace.awq import engine
from quantspace.awq.checkpoint import dequantized_model, dequantized_state, write_checkpoint
from quantspace.awq.pack import (AWQ_ORDER, dequantize, fake_quantize, pack_columns, pack_linear, quantize,
                                 unpack_columns, unpack_linear)
from quantspace.awq.search import fold_scale, search_clip
from quantspace.errors import BadOptionError, UnsupportedArchitectureError
from quantspace.report import Report
from tests.hub_fixtures import ALICE_TOKEN

TINY_CALIB = {"calib_samples": 4, "calib_seqlen": 64}


def _golden_pack(row: list[int]) -> list[int]:
    """The published layout, in plain integers: nibble i of each int32 holds column AWQ_ORDER[i] of its block."""
    words = []
    for block in range(len(row) // 8):
        word = 0
        for i, col in enumerate((0, 2, 4, 6, 1, 3, 5, 7)):
            word |= row[block * 8 + col] << (4 * i)
        words.append(word - (1 << 32) if word >= 1 << 31 else word)   # as a signed int32
    return words


def test_packing_matches_the_published_layout_bit_for_bit():
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    assert _golden_pack(list(range(8))) == [0x75316420]   # AutoAWQ's order_map, written out
    rng = random.Random(0)
    rows = [[rng.randrange(16) for _ in range(32)] for _ in range(5)] + [[15] * 32, [0] * 32]
    packed = pack_columns(torch.tensor(rows, dtype=torch.uint8))
    assert packed.dtype == torch.int32 and packed.shape == (7, 4)
    assert packed.tolist() == [_golden_pack(r) for r in rows]
    assert packed[5].tolist() == [-1] * 4   # all-ones nibbles use the sign bit
    assert unpack_columns(packed).tolist() == rows


def test_quantize_pack_unpack_is_q_minus_z_times_s():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    q, z, s = quantize(w, 64)
    assert q.shape == (64, 256) and z.shape == (64, 4) and s.dtype == torch.float16
    assert int(q.max()) <= 15 and int(z.max()) <= 15
    tensors = pack_linear(q, z, s)
    assert tensors["qweight"].shape == (256, 8) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (4, 8) and tensors["scales"].shape == (4, 64)
    assert tensors["scales"].dtype == torch.float16
    # The definition, by hand: weight[o, i] = (q[o, i] - z[o, i // g]) * s[o, i // g].
    g_of = torch.arange(256) // 64
    by_hand = (q.float() - z.float()[:, g_of]) * s.float()[:, g_of]
    assert torch.equal(unpack_linear(**tensors), by_hand)
    assert torch.equal(dequantize(q, z, s), by_hand)
    assert torch.equal(fake_quantize(w, 64), by_hand)
    # Round to nearest: every weight is within half a step of its group's grid.
    assert bool(((by_hand - w).abs() <= s.float()[:, g_of] * 0.5 + 1e-6).all())


def test_scale_folding_keeps_the_function_and_clipping_never_hurts():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm, lin = LlamaRMSNorm(128), torch.nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(32, 128)
    before = lin(norm(x))
    fold_scale(norm, [lin], torch.rand(128) + 0.5)
    assert torch.allclose(lin(norm(x)), before, atol=1e-5)
    # The clip search keeps the unclipped maximum when that is best, so its error is never larger.
    w, feats = lin.weight.detach(), torch.randn(512, 128)
    best = search_clip(w, feats, 64)
    clipped = torch.maximum(torch.minimum(w.reshape(64, 2, 64), best.unsqueeze(2)), -best.unsqueeze(2)).reshape(64, 128)
    err = lambda m: (feats @ (fake_quantize(m, 64) - w).t()).pow(2).mean().item()  # noqa: E731
    assert err(clipped) <= err(w) + 1e-9


def _tokens(model_dir: Path, n: int, seqlen: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from quantspace.calib import calibration_samples, load_calibration_text

    return calibration_samples(AutoTokenizer.from_pretrained(model_dir), load_calibration_text(), n, seqlen)


def _state(model_dir: Path, state: Path, group: int = 128) -> None:
    tokens = _tokens(model_dir, 4, 64)
    engine.prepare(state, engine.Settings(group_size=group, n_samples=len(tokens), seqlen=64), tokens)


@pytest.fixture(scope="module")
def tiny_done(tiny_bpe, tmp_path_factory) -> Path:
    """A finished state folder: tiny_bpe quantized in one uninterrupted run."""
    state = tmp_path_factory.mktemp("tiny-awq") / "state"
    _state(tiny_bpe, state)
    assert engine.run(tiny_bpe, state) is True
    return state


def test_resumed_run_writes_the_same_checkpoint_as_one_run(tiny_bpe, tiny_done, tmp_path):
    _state(tiny_bpe, tmp_path / "many")
    calls = 0
    while not engine.run(tiny_bpe, tmp_path / "many", budget_s=0):   # one layer per call, like short GPU windows
        calls += 1
        assert list((tmp_path / "many").glob("hidden-*.pt")), "a stopped run leaves the next layer's input"
    assert calls == 1 and engine.next_layer(tmp_path / "many") == 2
    a, _ = write_checkpoint(tiny_bpe, tiny_done, tmp_path / "a")
    b, _ = write_checkpoint(tiny_bpe, tmp_path / "many", tmp_path / "b")
    assert a[0].read_bytes() == b[0].read_bytes()
    # The same job in the same folder resumes (nothing left to do); a different job starts over.
    _state(tiny_bpe, tmp_path / "many")
    assert engine.next_layer(tmp_path / "many") == 2
    _state(tiny_bpe, tmp_path / "many", group=64)
    assert engine.next_layer(tmp_path / "many") == 0 and not list((tmp_path / "many").glob("layer-*"))


def test_pipeline_spans_several_gpu_windows(tiny_bpe, tiny_done, tmp_path, monkeypatch):
    """Through a ZeroGPU-like runner (function and arguments pickled, a window's budget): one call per layer
    here, and the same checkpoint as one uninterrupted run."""
    import pickle

    from quantspace import quantize
    import quantspace.formats

    calls = []

    def runner(fn, *args):
        fn, args = pickle.loads(pickle.dumps((fn, args)))   # as if sent to another process
        calls.append(args[-1])
        return fn(*args)

    monkeypatch.setattr(quantspace.formats, "WINDOW_BUDGET_S", 0.0)
    quantize(str(tiny_bpe), method="awq", out=tmp_path / "o", options=TINY_CALIB, no_eval=True, run_gpu=runner)
    assert calls == [0.0, 0.0]
    one, _ = write_checkpoint(tiny_bpe, tiny_done, tmp_path / "one")
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == one[0].read_bytes()


def test_sharded_checkpoint_has_an_index_and_the_same_tensors(tiny_bpe, tiny_done, tmp_path):
    one, _ = write_checkpoint(tiny_bpe, tiny_done, tmp_path / "one")
    many, extra = write_checkpoint(tiny_bpe, tiny_done, tmp_path / "many", max_shard_bytes=400_000)
    assert len(one) == 1 and len(many) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in many}
    assert tmp_path / "many" / "model.safetensors.index.json" in extra
    sa, sb = dequantized_state(tmp_path / "one"), dequantized_state(tmp_path / "many")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _load_with_transformers(folder: Path):
    pytest.importorskip("gptqmodel", reason="transformers loads AWQ checkpoints through gptqmodel")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()


def _check_transformers_matches_dequantized(folder: Path, ids: list[int], rel: float, new_tokens: int,
                                            probe: str = "self_attn.q_proj") -> None:
    """transformers (AWQ kernels via gptqmodel) gives our dequantized model's logits, and generates the same."""
    loaded, ours = _load_with_transformers(folder), dequantized_model(folder)
    linear = loaded.model.layers[0].get_submodule(probe)
    assert "Awq" in type(linear).__name__ and linear.qweight.dtype == torch.int32   # really the AWQ path
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = loaded(x).logits.float(), ours(x).logits
        tol = rel * b.abs().max().item()
        assert (a - b).abs().max().item() < tol
        top2 = b.topk(2, dim=-1).values
        clear = top2[..., 0] - top2[..., 1] > 2 * tol   # a near-tie may go either way within tol
        # Most positions must be clear, or the comparison says little (SmolLM2: 14 of 16 here).
        assert clear.float().mean() > 0.75 and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
        n = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gen = loaded.generate(x, **n)
        assert gen.shape[1] == x.shape[1] + new_tokens and torch.equal(gen, ours.generate(x, **n))


def test_qwen2_with_biases_quantizes_and_loads_in_transformers(tiny_qwen2, tmp_path):
    from quantspace import quantize

    report = quantize(str(tiny_qwen2), method="awq", out=tmp_path / "o", options=TINY_CALIB, ctx=64, max_chunks=2)
    folder = tmp_path / "o"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128,
                                             "zero_point": True, "version": "gemm",
                                             "modules_to_not_convert": ["lm_head"]}
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f, \
            safe_open(str(tiny_qwen2 / "model.safetensors"), framework="pt") as src:
        names = set(f.keys())
        for proj in ("q_proj", "k_proj", "v_proj"):   # biases carried (q/k/v scales act on inputs only)
            name = f"model.layers.1.self_attn.{proj}.bias"
            assert torch.equal(f.get_tensor(name), src.get_tensor(name).half())
        assert f.get_tensor("lm_head.weight").dtype == torch.float16
    assert "model.layers.1.mlp.down_proj.qweight" in names and "model.layers.1.mlp.down_proj.weight" not in names
    m, rtn = report.files[0].metrics, report.files[0].details["rtn"]
    assert m["kld_mean"] < rtn["kld_mean"]
    _check_transformers_matches_dequantized(folder, _tokens(tiny_qwen2, 1, 24)[0], rel=1e-3, new_tokens=6)


def test_end_to_end_push_with_card_and_rtn_comparison(hub, tiny_bpe, tmp_path, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    from quantspace.cli import main

    hub.create_repo("quantorg/tiny-llama")
    hub.upload_folder("quantorg/tiny-llama", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    target = "alice/tiny-llama-AWQ"
    code = main(["quantize", "quantorg/tiny-llama", "--method", "awq", "--variants", "w4g64", "--push", target,
                 "--out", str(tmp_path / "out"), "--ctx", "64", "--chunks", "2", "--calib-samples", "4",
                 "--calib-seqlen", "64", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    files = hub.files(target)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "quantspace.json"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["group_size"] == 64
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "quantized"
    assert {"awq", "4-bit"} <= set(card.data.tags)
    assert f"vllm serve {target} --quantization awq" in card.text and "--quantize awq" in card.text
    report = Report.from_dict(json.loads(files["quantspace.json"]))
    assert report.method == "awq" and report.options["calib_samples"] == 4
    result = report.files[0]
    assert result.variant == "W4G64" and result.size_bytes == len(files["model.safetensors"])
    rtn = result.details["rtn"]
    assert "AWQ vs RTN" in card.text
    assert f"| AWQ | {result.metrics['perplexity']:.4f} |" in card.text
    assert f"| RTN | {rtn['perplexity']:.4f} |" in card.text
    assert "--calib-samples 4" in report.command
    # The size estimate from headers alone is close to what was written.
    from quantspace.estimate import estimate

    est = estimate(str(tiny_bpe), method="awq")
    assert est.sizes["W4G32"] > est.sizes["W4G64"] > est.sizes["W4G128"]
    assert abs(est.sizes["W4G64"] - result.size_bytes) < 0.02 * result.size_bytes


@pytest.mark.parametrize("kwargs, error, message", [
    ({"variants": "W4G128,W4G64"}, BadOptionError, "one checkpoint per run"),
    ({"variants": "W3G128"}, BadOptionError, "Unknown AWQ variant"),
    ({"options": {"calib_samples": 0}}, BadOptionError, "calib_samples"),
    ({"options": {"calib_seqlen": "long"}}, BadOptionError, "calib_seqlen"),
    ({"options": {"group_size": 128}}, BadOptionError, "Unknown option"),
])
def test_bad_options_fail_before_any_work(tiny_bpe, tmp_path, kwargs, error, message):
    from quantspace import quantize

    with pytest.raises(error, match=message):
        quantize(str(tiny_bpe), method="awq", out=tmp_path / "o", no_eval=True, **kwargs)
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture_and_misfit_group_are_refused(tiny_bpe, smollm2, tmp_path):
    from quantspace import quantize
    from quantspace.awq.layers import spec_for

    with pytest.raises(UnsupportedArchitectureError, match="supported"):
        spec_for({"architectures": ["GPT2LMHeadModel"]})
    other = tmp_path / "gpt2"
    shutil.copytree(tiny_bpe, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError):
        quantize(str(other), method="awq", out=tmp_path / "o", no_eval=True)
    # SmolLM2's 576-wide layers do not split into groups of 128: refused before calibration, with what fits.
    with pytest.raises(BadOptionError, match="W4G64, W4G32"):
        quantize(str(smollm2), method="awq", out=tmp_path / "o", no_eval=True)
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def smollm2_awq(smollm2, tmp_path_factory) -> tuple[Path, Report]:
    """SmolLM2-135M quantized once, W4G64, on a small calibration (CPU time), evaluated with its RTN baseline."""
    from quantspace import quantize

    out = tmp_path_factory.mktemp("smollm2-awq")
    report = quantize(str(smollm2), method="awq", variants="W4G64", out=out, ctx=128, max_chunks=4,
                      options={"calib_samples": 4, "calib_seqlen": 128})
    return out, report


def test_awq_beats_round_to_nearest_on_smollm2(smollm2_awq):
    out, report = smollm2_awq
    awq, rtn = report.files[0].metrics, report.files[0].details["rtn"]
    src = report.source_metrics["perplexity"]
    assert src < awq["perplexity"] < rtn["perplexity"]
    assert awq["kld_mean"] < rtn["kld_mean"] and awq["top1_agreement"] > rtn["top1_agreement"]
    assert 4 < report.files[0].bits_per_weight < 8   # 4-bit layers, fp16 embeddings (tied, 49k × 576)
    card = (out / "README.md").read_text()
    assert f"| RTN | {rtn['perplexity']:.4f} |" in card and f"| AWQ | {awq['perplexity']:.4f} |" in card


def test_transformers_loads_the_smollm2_checkpoint_like_our_dequantized_model(smollm2_awq, smollm2):
    out, _ = smollm2_awq
    # gptqmodel's CPU kernel unpacks the weights on every call (~10 s a forward here): few tokens.
    _check_transformers_matches_dequantized(out, _tokens(smollm2, 1, 16)[0], rel=2e-3, new_tokens=2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_packing_is_bit_identical_to_cpu():
    """Packing on the GPU writes the same bits as on the CPU; quantizing there may only differ where a value
    sits on a rounding boundary, by one level."""
    torch.manual_seed(3)
    w = torch.randn(512, 1024) * 0.03
    q, z, s = quantize(w, 128)
    cpu = pack_linear(q, z, s)
    gpu = pack_linear(q.cuda(), z.cuda(), s.cuda())
    assert all(torch.equal(cpu[k], gpu[k].cpu()) for k in cpu)
    # Float32 arithmetic can differ in the last bit between devices: scales agree to fp16 precision and only
    # values on a rounding boundary move, by one level.
    gq, gz, gs = (t.cpu() for t in quantize(w.cuda(), 128))
    assert torch.allclose(gs.float(), s.float(), rtol=1e-3, atol=0)
    for mine, theirs in ((gq, q), (gz, z)):
        diff = (mine.int() - theirs.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-2


@needs_cuda
def test_cuda_engine_beats_round_to_nearest(tiny_bpe, tmp_path):
    """The fp16 GPU path (search, packing on the GPU) makes a checkpoint closer to the source than plain RTN."""
    from transformers import AutoModelForCausalLM

    from quantspace.awq.checkpoint import rtn_model

    tokens = _tokens(tiny_bpe, 6, 64)
    engine.prepare(tmp_path / "s", engine.Settings(n_samples=4, seqlen=64, device="cuda"), tokens[:4])
    assert engine.run(tiny_bpe, tmp_path / "s")
    write_checkpoint(tiny_bpe, tmp_path / "s", tmp_path / "o")
    ids = torch.tensor(tokens[4:])   # held out
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_bpe, dtype=torch.float32)(ids).logits.log_softmax(-1)
        kld = {}
        for name, model in (("awq", dequantized_model(tmp_path / "o")), ("rtn", rtn_model(tiny_bpe, 128))):
            lp = model(ids).logits.log_softmax(-1)
            kld[name] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    assert kld["awq"] < kld["rtn"], kld
