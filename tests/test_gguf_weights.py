"""A GGUF's weights read back dequantized under the source's tensor names (quantspace/gguf_weights.py), for the
layer-by-layer walk that measures a GGUF on a GPU this llama.cpp build cannot use (ZeroGPU, a CPU-only wheel)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from quantspace.converter.streaming import convert
from quantspace.evaluate import EvalSettings, evaluate_gguf, evaluate_layers, evaluate_source, load_eval_text, \
    tokenize_for_eval
from quantspace.formats.gguf import VARIANTS, llama_quantize
from quantspace.formats.gguf_split import split_file
from quantspace.gguf_weights import GGUFWeights
from quantspace.reference import SourceWeights
from tests.conftest import _tiny

CPU = torch.device("cpu")
SETTINGS = EvalSettings(ctx=128, max_chunks=4, threads=2)
# Llama: q/k rows permuted for llama.cpp's RoPE; Gemma 3: norms stored as 1 + w, the embedding trimmed.
FAMILIES = [("tiny-llama-bpe", "bpe", "llama"), ("tiny-gemma3-gemma", "gemma", "gemma3")]


@pytest.mark.parametrize("name,kind,arch", FAMILIES, ids=[f[2] for f in FAMILIES])
def test_unquantized_gguf_reads_back_as_the_source_tensors(name, kind, arch, tmp_path):
    """The converter's changes are undone exactly: an F32 GGUF gives every source tensor bit for bit (Gemma's
    norms: the 1 + w it scales by), an F16 one the source rounded to float16 (norms stay F32), whole and in rows."""
    src = _tiny(name, kind, arch)
    source = SourceWeights(src)
    for out_type in ("F32", "F16"):
        weights = GGUFWeights([convert(src, tmp_path / f"{out_type}.gguf", out_type=out_type)], src)
        assert set(weights.entries) == set(source.entries)
        for tensor in weights.entries:
            want = source.get(tensor, CPU)
            if out_type == "F16" and want.dim() >= 2:
                want = want.half().float()
            got = weights.get(tensor, CPU)
            if arch == "gemma3" and tensor.endswith("norm.weight"):   # Gemma scales by 1 + w: that, exactly
                got, want = got + 1, want + 1
            assert got.shape == want.shape and torch.equal(got, want), tensor
            if got.dim() == 2:
                assert torch.equal(weights.rows(tensor, 3, 7, CPU), want[3:7]), tensor


def _quantized(tmp_path: Path, src: Path, variant: str) -> Path:
    path = tmp_path / f"{variant}.gguf"
    llama_quantize(convert(src, tmp_path / "F16.gguf"), path, VARIANTS[variant].ftype)
    return path


@pytest.mark.parametrize("name,kind,arch", FAMILIES, ids=[f[2] for f in FAMILIES])
def test_dequantized_walk_measures_what_llama_cpp_measures(name, kind, arch, tmp_path):
    """A Q4_K_M measured by the walk on its dequantized weights: the KLD llama.cpp measures running the file, a
    little lower (llama.cpp also rounds activations and the KV cache), the same perplexity to 1 %; a split file
    gives the same numbers as the whole."""
    src = _tiny(name, kind, arch)
    path = _quantized(tmp_path, src, "Q4_K_M")
    chunks = tokenize_for_eval(src, load_eval_text(), SETTINGS)
    with evaluate_source(src, chunks, SETTINGS, tmp_path, "t") as ref:
        lcpp = evaluate_gguf(path, ref)
        walk = evaluate_layers(src, GGUFWeights([path], src), ref)
        assert 0.85 * lcpp.kld_mean < walk.kld_mean < 1.01 * lcpp.kld_mean, (walk, lcpp)
        assert abs(walk.perplexity / lcpp.perplexity - 1) < 0.01
        shards = split_file(path, path.stat().st_size // 3)
        assert len(shards) > 1
        assert evaluate_layers(src, GGUFWeights(shards, src), ref) == walk


def test_zerogpu_measures_gguf_files_on_the_gpu_in_windows(tmp_path, monkeypatch):
    """Under ZeroGPU (llama.cpp without CUDA, the GPU only inside windows) the GGUF format measures its files by
    the dequantized walk in GPU windows, and the card's method line says so. Driven on this CPU: the runner
    pickles as ZeroGPU does and the walk's "cuda" device is the CPU."""
    from quantspace import reference
    from quantspace.formats import Context
    from quantspace.formats.gguf import GGUF

    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    calls = []

    def window(fn, *args):
        calls.append(fn.__name__)
        fn, args = pickle.loads(pickle.dumps((fn, args)))
        return pickle.loads(pickle.dumps(fn(*args)))

    real_device = reference._device
    monkeypatch.setattr(reference, "_device", lambda device: real_device("cpu"))
    fmt = GGUF()
    (tmp_path / "out").mkdir()
    ctx = Context(lambda name: (lambda done, total: None), options={"imatrix": "off", "split_max_size": "0"},
                  device="cuda", run_gpu=window, workdir=tmp_path / "work")
    [output] = fmt.produce(src, tmp_path / "out", "tiny", ["Q4_K_M"], ctx)
    assert "gguf-py" in fmt.runtime(ctx) and "CUDA in ZeroGPU windows" in fmt.runtime(ctx)
    chunks = tokenize_for_eval(src, load_eval_text(), SETTINGS)
    with evaluate_source(src, chunks, SETTINGS, tmp_path, "t") as ref:
        windowed = fmt.evaluate(output, ref, ctx, lambda done, total: None)
        assert calls and set(calls) == {"walk_window"}
        assert windowed == evaluate_layers(src, GGUFWeights([output.path], src), ref)
        # On the CPU the file is run by llama.cpp, as before.
        cpu = Context(lambda name: (lambda done, total: None), options=ctx.options, workdir=tmp_path / "work")
        assert fmt.runtime(cpu) == "GGUF (llama.cpp, CPU)"
        assert fmt.evaluate(output, ref, cpu, lambda done, total: None) == evaluate_gguf(output.path, ref)
