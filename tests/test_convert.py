"""HF → GGUF conversion checked against the real llama.cpp and transformers."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from quantspace.converter.streaming import convert, permute_rows
from quantspace.errors import CorruptWeightsError, TokenizerError, UnsupportedArchitectureError
from quantspace.formats.gguf import llama_quantize, VARIANTS
from tests.tiny import corpus

SPECIAL_CASES = [
    "Hello world", " leading space", "double  space", "trailing space ", "tabs\tand\nnewlines\n\n\n",
    "numbers 1 12 123 1234 12345 3.14159", "Ünïcödé ñ 日本語 emoji 🎉", "it's they're we'll I'd",
    "   many     spaces   ", "line1\r\nline2", "<unknown-ish> [brackets] {braces} $money$ 100%",
]


def llama(path: Path, **kwargs):
    from llama_cpp import Llama

    return Llama(model_path=str(path), verbose=False, n_threads=2, **kwargs)


def eval_lines() -> list[str]:
    lines = [line for line in corpus().splitlines() if line.strip()]
    return lines[:300:3] + SPECIAL_CASES


def hf_logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def gguf_logits(path: Path, tokens: list[int]) -> np.ndarray:
    llm = llama(path, n_ctx=256, n_batch=256, logits_all=True)
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_bpe, tiny_spm, tiny_qwen2, tiny_digits) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("gguf")
    return {name: (src, convert(src, out / f"{name}-F16.gguf"))
            for name, src in (("bpe", tiny_bpe), ("spm", tiny_spm), ("qwen2", tiny_qwen2), ("digits", tiny_digits))}


def test_sentencepiece_from_tokenizer_json_only(tiny_spm, tmp_path):
    """Without tokenizer.model, scores rebuilt from merge ranks still give llama.cpp the same tokens."""
    from transformers import AutoTokenizer

    src = tmp_path / "spm-json"
    shutil.copytree(tiny_spm, src)
    (src / "tokenizer.model").unlink()
    path = convert(src, tmp_path / "m.gguf")
    hf = AutoTokenizer.from_pretrained(src)
    llm = llama(path, vocab_only=True)
    # Lines that start with whitespace are left out: there transformers 5's Metaspace and SentencePiece
    # (which llama.cpp follows) disagree about the "▁" prefix; see the test above.
    lines = [line for line in eval_lines() if not line[:1].isspace()]
    bad = [line[:40] for line in lines
           if llm.tokenize(line.encode(), add_bos=False, special=False) != hf(line, add_special_tokens=False).input_ids]
    assert not bad
    llm.close()


def test_pre_tokenizer_names(converted):
    import gguf

    pre = {kind: gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() for kind, (_, path) in converted.items()}
    # SentencePiece needs no pre-tokenizer: "default", as llama.cpp's converter writes it
    assert pre == {"spm": "default", "bpe": "llama-bpe", "qwen2": "qwen2", "digits": "smollm"}


def tokenize_mismatches(src: Path, path: Path, lines: list[str] | None = None) -> tuple[list, object, object]:
    """Lines llama.cpp tokenizes differently from transformers: (mismatches, llama, transformers tokenizer).

    transformers 5's Metaspace does not add the "▁" prefix before a leading space; SentencePiece (the original
    tokenizer, and llama.cpp) does. For such lines the original is the reference.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(src)
    llm = llama(path, vocab_only=True)
    spm = None
    if (src / "tokenizer.model").is_file():
        import sentencepiece

        spm = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    mismatches = []
    for line in eval_lines() if lines is None else lines:
        ours = llm.tokenize(line.encode(), add_bos=False, special=False)
        if spm is not None and line[:1].isspace():
            theirs = spm.encode(line)
        else:
            theirs = hf(line, add_special_tokens=False).input_ids
        if ours != theirs:
            mismatches.append((line[:40], ours[:8], theirs[:8]))
    return mismatches, llm, hf


@pytest.mark.parametrize("kind", ["bpe", "spm", "qwen2", "digits"])
def test_llama_cpp_tokenizes_like_transformers(converted, kind):
    src, path = converted[kind]
    mismatches, llm, hf = tokenize_mismatches(src, path)
    assert not mismatches, f"{len(mismatches)} lines tokenized differently, e.g. {mismatches[:3]}"
    # BOS handling and special tokens survive too.
    with_bos = llm.tokenize(b"Hello", add_bos=True, special=False)
    assert with_bos == hf("Hello").input_ids
    llm.close()


@pytest.mark.parametrize("kind", ["bpe", "spm", "qwen2"])
def test_f16_logits_match_transformers(converted, kind):
    src, path = converted[kind]
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(src)(corpus()[:2000]).input_ids[:128]
    ours, theirs = gguf_logits(path, tokens), hf_logits(src, tokens)
    assert ours.shape == theirs.shape
    # fp16 weights: agreement to ~1e-3 of the logit scale, same argmax nearly everywhere.
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 5e-3 * scale + 1e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.98


def test_llama3_rope_scaling_matches_transformers(tiny_bpe, tmp_path):
    """llama3-style RoPE scaling becomes llama.cpp's rope_freqs factors; logits still match transformers."""
    import json

    from transformers import AutoTokenizer

    src = tmp_path / "llama3-rope"
    shutil.copytree(tiny_bpe, src)
    cfg = json.loads((src / "config.json").read_text())
    # A short original context makes the scaled (low) frequencies matter within a 128-token test.
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (src / "config.json").write_text(json.dumps(cfg))
    path = convert(src, tmp_path / "m.gguf")
    tokens = AutoTokenizer.from_pretrained(src)(corpus()[:2000]).input_ids[:128]
    ours, theirs = gguf_logits(path, tokens), hf_logits(src, tokens)
    unscaled = gguf_logits(convert(tiny_bpe, tmp_path / "plain.gguf"), tokens)
    assert np.abs(unscaled - theirs).max() > 10 * np.abs(ours - theirs).max()  # the scaling is visible...
    assert np.abs(ours - theirs).max() < 5e-3 * np.abs(theirs).max() + 1e-3    # ...and reproduced


def test_quantized_logits_stay_close(converted, tmp_path):
    """Q8_0 and Q4_K_M keep the F16 model's predictions within stated bounds (KL divergence)."""
    src, f16 = converted["bpe"]
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(src)(corpus()[:2000]).input_ids[:128]
    ref = torch.log_softmax(torch.from_numpy(gguf_logits(f16, tokens)).double(), -1)
    # Bounds for this random model, whose logits are far sharper than a trained model's (measured here:
    # Q8_0 ~1e-3, Q4_K_M ~0.14). The real-model bounds are in test_accuracy.py.
    bounds = {"Q8_0": 5e-3, "Q4_K_M": 0.3}
    klds = {}
    for variant, bound in bounds.items():
        out = tmp_path / f"{variant}.gguf"
        llama_quantize(f16, out, VARIANTS[variant].ftype)
        q = torch.log_softmax(torch.from_numpy(gguf_logits(out, tokens)).double(), -1)
        kld = (ref.exp() * (ref - q)).sum(-1).mean().item()
        assert 0 <= kld < bound, f"{variant}: KLD {kld}"
        klds[variant] = kld
    assert klds["Q8_0"] < klds["Q4_K_M"]  # fewer bits, more loss


def test_permute_rows_matches_rotary_layouts():
    """Rotate-half RoPE on permuted rows equals interleaved-pair RoPE: check on one head by definition."""
    head_dim, n_head = 8, 2
    w = np.arange(n_head * head_dim * 3, dtype=np.float32).reshape(n_head * head_dim, 3)
    p = permute_rows(w, n_head)
    for h in range(n_head):
        block, out = w[h * head_dim:(h + 1) * head_dim], p[h * head_dim:(h + 1) * head_dim]
        half = head_dim // 2
        for i in range(half):  # pair i of llama.cpp = (row i, row i + half) of HF
            assert np.array_equal(out[2 * i], block[i])
            assert np.array_equal(out[2 * i + 1], block[i + half])


def test_conversion_streams_one_tensor_at_a_time(tiny_bpe, tmp_path):
    """Peak Python-side memory stays near the largest tensor, not the model."""
    from quantspace.weights import all_entries

    entries = all_entries(tiny_bpe)
    largest = max(e.n_elements for e in entries) * 4
    total = sum(e.n_elements for e in entries) * 4
    tracemalloc.start()
    convert(tiny_bpe, tmp_path / "m.gguf")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 6 * largest  # so holding the whole model could not pass the check below
    assert peak < total / 2, f"peak {peak} B for a {total} B model (largest tensor {largest} B)"


def test_bf16_output_is_exact_for_bf16_weights(tiny_bpe, tmp_path):
    import gguf
    from safetensors import safe_open

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_bpe, bf16)
    with safe_open(str(tiny_bpe / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}
    from safetensors.torch import save_file

    save_file(weights, str(bf16 / "model.safetensors"))
    out = convert(bf16, tmp_path / "b.gguf", out_type="BF16")
    reader = gguf.GGUFReader(out)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = weights["model.embed_tokens.weight"].view(torch.int16).numpy().view(np.uint16)
    assert emb.tensor_type == gguf.GGMLQuantizationType.BF16
    assert np.array_equal(np.asarray(emb.data).view(np.uint16).reshape(expected.shape), expected)


def test_f16_saturates_instead_of_overflowing(tmp_path):
    from safetensors.torch import save_file

    from quantspace.weights import entries, read_converted

    save_file({"w": torch.tensor([[1e6, -1e6, 1.5, 0.1]], dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    (entry,) = entries(tmp_path / "w.safetensors")
    out = read_converted(entry, "F16")
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert out.tolist() == [[65504.0, -65504.0, 1.5, np.float16(torch.tensor(0.1, dtype=torch.bfloat16).item())]]


def test_corrupt_safetensors_is_a_clear_error(tiny_bpe, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bpe, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match="truncated"):
        convert(broken, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))  # no partial file left behind


def test_unsupported_architecture_names_it(tiny_bpe, tmp_path):
    import json

    other = tmp_path / "other"
    shutil.copytree(tiny_bpe, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPTBigCodeForCausalLM"):
        convert(other, tmp_path / "x.gguf")


def test_unknown_pre_tokenizer_is_refused(tiny_bpe, tmp_path):
    import json

    other = tmp_path / "odd"
    shutil.copytree(tiny_bpe, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerError, match="Whitespace"):
        convert(other, tmp_path / "x.gguf")


def test_real_model_converts_like_llama_cpp_expects(smollm2, tmp_path):
    """SmolLM2: the SmolLM pre-tokenizer, same tokens as transformers on the corpus, chat tokens special."""
    import gguf
    from transformers import AutoTokenizer

    path = convert(smollm2, tmp_path / "smollm2-F16.gguf")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    hf = AutoTokenizer.from_pretrained(smollm2)
    llm = llama(path, vocab_only=True)
    bad = [line[:40] for line in eval_lines()
           if llm.tokenize(line.encode(), add_bos=False, special=False) != hf(line, add_special_tokens=False).input_ids]
    assert not bad
    chat = "<|im_start|>user\nHello<|im_end|>\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf(chat, add_special_tokens=False).input_ids
    llm.close()
