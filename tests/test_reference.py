"""The accuracy reference computed one decoder layer at a time (quantspace/reference.py) gives the numbers of the
whole-model float32 reference, and its memory stays near one layer's worth whatever the model's depth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from quantspace import reference as streamed_ref
from quantspace.evaluate import (EvalSettings, Reference, evaluate_gguf, evaluate_source, load_eval_text,
                                 tokenize_for_eval)
from tests.conftest import _tiny

SETTINGS = EvalSettings(ctx=128, max_chunks=4, threads=2)
ROOT = Path(__file__).resolve().parent.parent

FAMILIES = [("tiny-llama-bpe", "bpe", "llama"), ("tiny-gemma3-gemma", "gemma", "gemma3"),
            ("tiny-qwen3", "bpe", "qwen3"), ("tiny-phi3", "bpe", "phi3"), ("tiny-smollm3", "bpe", "smollm3"),
            ("tiny-qwen3_moe", "bpe", "qwen3_moe"), ("tiny-mixtral", "spm", "mixtral")]


def _both(model_dir: Path, settings: EvalSettings, workdir: Path) -> tuple[Reference, Reference]:
    chunks = tokenize_for_eval(model_dir, load_eval_text(), settings)
    whole = evaluate_source(model_dir, chunks, settings, workdir, "t", streamed=False)
    layered = evaluate_source(model_dir, chunks, settings, workdir, "t", streamed=True)
    return whole, layered


def _assert_same(whole: Reference, layered: Reference) -> None:
    a, b = whole.metrics, layered.metrics
    assert a.n_tokens == b.n_tokens and whole.vocab_size == layered.vocab_size
    assert abs(b.perplexity / a.perplexity - 1) < 1e-4, (a.perplexity, b.perplexity)
    assert whole.tokenizer_size == layered.tokenizer_size
    assert np.mean(whole.argmax == layered.argmax) > 0.99
    for chunk in range(len(whole.tokens)):
        # float16 rows: equal up to one rounding step of float16 (relative 2^-11)
        np.testing.assert_allclose(layered.logprobs(chunk).astype(np.float32),
                                   whole.logprobs(chunk).astype(np.float32), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("name,kind,arch", FAMILIES, ids=[f[2] for f in FAMILIES])
def test_layered_reference_equals_whole_model(name: str, kind: str, arch: str, tmp_path: Path) -> None:
    model_dir = _tiny(name, kind, arch)
    assert streamed_ref.streamable(json.loads((model_dir / "config.json").read_text()))
    whole, layered = _both(model_dir, SETTINGS, tmp_path)
    with whole, layered:
        _assert_same(whole, layered)


def test_sliding_window_layers_are_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny Gemma 3's layers slide over 64 tokens, less than the 128-token chunk: the walk masks them as
    transformers does (above), and without the mask the numbers would differ, so the comparison above sees it."""
    model_dir = _tiny("tiny-gemma3-gemma", "gemma", "gemma3")
    assert json.loads((model_dir / "config.json").read_text())["sliding_window"] < SETTINGS.ctx
    chunks = tokenize_for_eval(model_dir, load_eval_text(), SETTINGS)
    with evaluate_source(model_dir, chunks, SETTINGS, tmp_path, "t", streamed=True) as masked:
        monkeypatch.setattr(streamed_ref, "_mask", lambda *args: None)
        with evaluate_source(model_dir, chunks, SETTINGS, tmp_path, "t", streamed=True) as unmasked:
            assert abs(unmasked.metrics.perplexity / masked.metrics.perplexity - 1) > 1e-3


def test_layered_reference_equals_whole_model_on_smollm2(smollm2: Path, tmp_path: Path) -> None:
    settings = EvalSettings(ctx=256, max_chunks=3, threads=2)
    whole, layered = _both(smollm2, settings, tmp_path)
    with whole, layered:
        assert 2 < whole.metrics.perplexity < 100   # a trained model: the numbers mean something
        _assert_same(whole, layered)


def test_quantized_file_kld_is_the_same_against_either_reference(tmp_path: Path) -> None:
    from quantspace.converter.streaming import convert
    from quantspace.formats.gguf import VARIANTS, llama_quantize

    model_dir = _tiny("tiny-llama-bpe", "bpe", "llama")
    f16 = convert(model_dir, tmp_path / "model-F16.gguf")
    q4 = tmp_path / "model-Q4_K_M.gguf"
    llama_quantize(f16, q4, VARIANTS["Q4_K_M"].ftype)
    whole, layered = _both(model_dir, SETTINGS, tmp_path)
    with whole, layered:
        a, b = evaluate_gguf(q4, whole), evaluate_gguf(q4, layered)
    assert a.kld_mean is not None and b.kld_mean is not None and a.kld_mean > 1e-3   # Q4 loses something
    assert abs(a.kld_mean - b.kld_mean) < 1e-5
    assert a.perplexity == b.perplexity and a.top1_agreement == b.top1_agreement


def test_source_evaluation_takes_the_layered_path_only_where_it_can(tmp_path: Path) -> None:
    from quantspace.errors import BadOptionError

    assert streamed_ref.streamable({"architectures": ["LlamaForCausalLM"]})
    assert not streamed_ref.streamable({"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": {}})
    assert not streamed_ref.streamable({"architectures": ["StableLmForCausalLM"]})   # no layer table
    vision = _tiny_vision()
    chunks = tokenize_for_eval(vision, load_eval_text(), SETTINGS)
    with pytest.raises(BadOptionError, match="layer by layer"):
        evaluate_source(vision, chunks, SETTINGS, tmp_path, "t", streamed=True)


def _tiny_vision() -> Path:
    from tests.conftest import CACHE
    from tests.tiny import build_tiny_gemma3_vision

    path = CACHE / "tiny-gemma3-vision"
    if not (path / "model.safetensors").is_file():
        build_tiny_gemma3_vision(path)
    return path


# --------------------------------------------------------------------------- memory

DEEP = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=1024)

_CHILD = """
import json, sys, tempfile
from pathlib import Path
import torch, transformers
import transformers.models.llama.modeling_llama
from quantspace.evaluate import EvalSettings, evaluate_source
from quantspace import reference
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
def rss():
    return status("VmRSS")
model_dir, warm_dir, ctx, n = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
settings = EvalSettings(ctx=ctx, max_chunks=n, threads=2)
chunks = torch.randint(0, 1000, (n, ctx), generator=torch.Generator().manual_seed(0)).tolist()
after_imports = rss()
# A first run on a tiny model imports what the path imports lazily (tokenizers, the model classes) and starts
# torch's thread pools: the figure after it is where the deep model starts from.
evaluate_source(warm_dir, chunks, settings, Path(tempfile.mkdtemp()), "t", streamed=True).close()
after_warmup = rss()
try:   # restart the peak (VmHWM) from here; where the kernel refuses, it still holds the warm-up's peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
with evaluate_source(model_dir, chunks, settings, Path(tempfile.mkdtemp()), "t", streamed=True) as ref:
    ppl = ref.metrics.perplexity
peak = status("VmHWM")
print(json.dumps({"after_imports": after_imports, "after_warmup": after_warmup, "peak": peak, "ppl": ppl}))
"""


def _deep_llama(out: Path) -> dict:
    """A random 32-layer Llama written straight to bfloat16 safetensors shards, 8 layers at a time (never the
    whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(**DEEP, tie_word_embeddings=False, max_position_embeddings=1024)
    config.architectures = ["LlamaForCausalLM"]
    out.mkdir()
    config.save_pretrained(out)
    h, f, kv = DEEP["hidden_size"], DEEP["intermediate_size"], DEEP["num_key_value_heads"] * 64
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    index = {}
    n = DEEP["num_hidden_layers"]
    for shard, first in enumerate(range(0, n, 8)):
        tensors = {}
        if shard == 0:
            tensors["model.embed_tokens.weight"] = rand(DEEP["vocab_size"], h)
        for i in range(first, min(n, first + 8)):
            p = f"model.layers.{i}."
            tensors.update({p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                            p + "mlp.down_proj.weight": rand(h, f)})
        if first + 8 >= n:
            tensors["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
            tensors["lm_head.weight"] = rand(DEEP["vocab_size"], h)
        name = f"model-{shard:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return config.to_dict()


def test_layered_reference_memory_stays_near_one_layer(tmp_path: Path) -> None:
    config = _deep_llama(tmp_path / "deep")
    ctx, n = 128, 4
    parameters = sum(int(np.prod(s)) for s in _shapes(tmp_path / "deep"))
    whole_fp32 = 4 * parameters
    need = streamed_ref.memory_needed(config, ctx=ctx, max_chunks=n)
    assert streamed_ref.layer_bytes(config) * config["num_hidden_layers"] < whole_fp32
    assert need < whole_fp32 / 4   # the bound below means something: the whole model could not fit in it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # A fresh interpreter reports its own peak: VmHWM, the high-water mark of its own memory since the warm-up.
    # Not getrusage's ru_maxrss: the kernel folds in the memory the process had before exec, i.e. this test
    # process's size when subprocess forked it (hundreds of MB here, after building the model).
    warm = _tiny("tiny-llama-bpe", "bpe", "llama")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "deep"), str(warm), str(ctx), str(n)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    growth = report["peak"] - report["after_warmup"]
    assert np.isfinite(report["ppl"])
    print(report, need, whole_fp32)
    assert streamed_ref.layer_bytes(config) < growth < 2 * need, (growth, need, whole_fp32)   # a layer, not more
    assert growth < whole_fp32 / 4, (growth, whole_fp32)


def _shapes(model_dir: Path) -> list[tuple[int, ...]]:
    from quantspace.weights import all_entries

    return [e.shape for e in all_entries(model_dir)]


# --------------------------------------------------------------------------- preflight


def test_preflight_sizes_evaluation_memory_by_the_path_the_source_takes(tmp_path: Path) -> None:
    from quantspace.preflight import Hardware, eval_memory, preflight

    deep = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **DEEP}
    parameters = 363_000_000   # 32 layers of 11.3M, embedding and head
    need, layered = eval_memory(deep, parameters)
    assert layered and need == streamed_ref.memory_needed(deep) and need < 4 * parameters / 4   # a quarter of the whole in fp32
    vision = json.loads((_tiny_vision() / "config.json").read_text())
    assert eval_memory(vision, parameters) == (4 * parameters, False)   # loaded whole

    tiny = _tiny("tiny-llama-bpe", "bpe", "llama")
    need, _ = eval_memory(json.loads((tiny / "config.json").read_text()), 1)
    short = preflight(str(tiny), "gguf", ["Q8_0"], hardware=Hardware("cpu", ram=need - 1, disk_free=2**40))
    assert any("one decoder layer at a time" in p and "turn evaluation off" in p for p in short.problems)
    assert short.too_big     # the page points to Hugging Face Jobs
    roomy = preflight(str(tiny), "gguf", ["Q8_0"], hardware=Hardware("cpu", ram=need + 1, disk_free=2**40))
    assert roomy.ok and any(c.startswith("Memory: measuring accuracy runs the source") for c in roomy.checks)
    assert not roomy.too_big
    bad = preflight(str(tiny), "gguf", ["Q9_9"], hardware=Hardware("cpu", ram=need - 1, disk_free=2**40))
    assert bad.problems and bad.problems[0].startswith("Unknown") and bad.too_big   # and too big for this RAM
    assert not preflight(str(tiny), "gguf", ["Q9_9"], hardware=Hardware("cpu", ram=need + 1,
                                                                         disk_free=2**40)).too_big


def test_the_card_says_how_and_where_each_side_was_measured(tmp_path):
    from quantspace import quantize

    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    report = quantize(str(src), variants="Q8_0", out=tmp_path / "out", ctx=64, max_chunks=2)
    method = report.evaluation.method
    assert "source (transformers fp32, layer by layer, CPU) and GGUF (llama.cpp, CPU)" in method, method
    assert method in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def _pickling_runner(calls: list):
    """A ZeroGPU-like runner: function and arguments pickled as if sent to the window's worker, result back."""
    import pickle

    def run(fn, *args):
        fn, args = pickle.loads(pickle.dumps((fn, args)))
        calls.append(args)
        return pickle.loads(pickle.dumps(fn(*args)))

    return run


@pytest.mark.parametrize("name,kind,arch", [FAMILIES[1], FAMILIES[5]], ids=["gemma3", "qwen3_moe"])
def test_walk_in_gpu_windows_gives_the_same_reference(name: str, kind: str, arch: str, tmp_path: Path) -> None:
    """Under ZeroGPU the layers run in GPU windows (here: a pickling runner on the CPU, a budget of one layer per
    window), the hidden states waiting on disk between windows: the same reference as one uninterrupted walk,
    progress after each window, and nothing left in the work folder."""
    model_dir = _tiny(name, kind, arch)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    chunks = tokenize_for_eval(model_dir, load_eval_text(), SETTINGS)
    calls: list = []
    steps: list = []
    windows = streamed_ref.GpuWindows(_pickling_runner(calls), 0.0, tmp_path / "work")
    with evaluate_source(model_dir, chunks, SETTINGS, tmp_path, "t", streamed=True) as direct, \
            evaluate_source(model_dir, chunks, SETTINGS, tmp_path, "t", streamed=True, windows=windows,
                            progress=lambda *a: steps.append(a)) as windowed:
        assert windowed.metrics == direct.metrics
        for chunk in range(len(chunks)):
            assert np.array_equal(windowed.logprobs(chunk), direct.logprobs(chunk))
    assert [c[3] for c in calls] == list(range(layers))          # one layer per window, each from where it stopped
    assert steps[:layers] == [(i + 1, layers + len(chunks)) for i in range(layers)]
    assert not any((tmp_path / "work").iterdir())


def test_zerogpu_jobs_walk_in_windows_and_the_card_says_so() -> None:
    from quantspace.formats import Context, run_directly

    def runner(fn, *args):
        return fn(*args)

    stage = lambda name: (lambda done, total: None)   # noqa: E731
    assert Context(stage, device="cpu").layer_walk() == ("cpu", None, "CPU")
    assert Context(stage, device="cuda", run_gpu=run_directly).layer_walk() == ("cuda", None, "CUDA")
    device, windows, where = Context(stage, device="cuda", run_gpu=runner, gpu_window_s=60).layer_walk()
    assert (device, where) == ("cuda", "CUDA in ZeroGPU windows") and windows.run is runner
    assert windows.budget_s == pytest.approx(48.0)   # most of the window: the rest is its start and hand-back
