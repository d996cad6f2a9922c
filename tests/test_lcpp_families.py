"""Architectures our converter does not have go through llama.cpp's own converter: a mixture of experts
(Qwen3-MoE), a newer family (Gemma 4 text) and an older one (StableLM) convert, tokenize like transformers, give
transformers' next-token distribution, and quantize to a Q4_K_M that generates. The byte-level BPE tokenizers
trained here are unknown to llama.cpp's table of vocabularies; their pre-tokenizer is recognised by behaviour."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from quantspace.converter import llama_cpp
from quantspace.converter.vocab import PRE_TOKENIZERS, detect_pre
from quantspace.errors import QuantizeError, TokenizerError
from tests.test_convert import eval_lines, gguf_logits, hf_logits, llama, tokenize_mismatches
from tests.test_pipeline import llama_generate

FAMILIES = [("qwen3_moe", "bpe", "Qwen3MoeForCausalLM"), ("gemma4", "gemma", "Gemma4ForCausalLM"),
            ("stablelm", "bpe", "StableLmForCausalLM")]


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.mark.parametrize("arch,kind,hf_name", FAMILIES)
def test_llama_cpps_converter_matches_transformers(arch, kind, hf_name, tmp_path):
    from quantspace.formats.gguf import LLAMA_CPP, VARIANTS, converter_for, llama_quantize
    from tests.conftest import _tiny

    folder = _tiny(f"tiny-{arch}", kind, arch)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [hf_name] and converter_for(config) == LLAMA_CPP
    f16 = llama_cpp.convert(folder, tmp_path / "f16.gguf", "F16")

    differ, vocab_only, hf = tokenize_mismatches(folder, f16, eval_lines()[::4])
    vocab_only.close()
    assert not differ, differ

    tokens = hf("It is a great honor to address this Congress. We have 1234 reasons, and 5 more.").input_ids
    ours, theirs = gguf_logits(f16, tokens), hf_logits(folder, tokens)
    # F16 weights in llama.cpp against float32 transformers: the same model, so nearly the same distribution.
    assert _kld(theirs, ours).mean() < 2e-3
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9

    q4 = tmp_path / "q4.gguf"
    llama_quantize(f16, q4, int(VARIANTS["Q4_K_M"].ftype))
    assert llama_generate(q4)


def test_a_pre_tokenizer_is_recognised_by_how_it_splits_text(tiny_bpe, tmp_path):
    """A tokenizer.json written differently (GPT-2's regex spelled out as a Split) but splitting text as GPT-2's
    does is GPT-2's; one that splits differently is refused, naming what is known."""
    gpt2_regex = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    spelled_out = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gpt2_regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert detect_pre({"pre_tokenizer": spelled_out}) == "gpt-2"
    for name, reference in PRE_TOKENIZERS.items():
        assert detect_pre({"pre_tokenizer": reference}) == name
    odd = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False},
                                                 spelled_out["pretokenizers"][1]]}
    with pytest.raises(TokenizerError, match="splits text unlike any llama.cpp reproduces"):
        detect_pre({"pre_tokenizer": odd})

    # The recognised name goes to llama.cpp's converter, and llama.cpp then tokenizes as transformers does.
    from transformers import AutoTokenizer

    folder = tmp_path / "gpt2-style"
    shutil.copytree(tiny_bpe, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = spelled_out
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    assert llama_cpp.recognised_pre(folder) == "gpt-2"
    out = llama_cpp.convert(folder, tmp_path / "f16.gguf", "F16")
    hf = AutoTokenizer.from_pretrained(folder)
    llm = llama(out, vocab_only=True)
    for line in eval_lines()[::5]:
        assert llm.tokenize(line.encode(), add_bos=False, special=False) == \
            hf(line, add_special_tokens=False).input_ids, line


def test_an_unrecognised_bpe_pre_tokenizer_is_one_clear_line(tmp_path, capsys):
    """Neither llama.cpp's table nor our probe knows a whitespace-splitting byte-level BPE: refused in one line,
    nothing left behind."""
    from quantspace.cli import main
    from tests.conftest import _tiny

    folder = tmp_path / "odd"
    shutil.copytree(_tiny("tiny-qwen3_moe", "bpe", "qwen3_moe"), folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": False}]}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    assert llama_cpp.recognised_pre(folder) is None
    with pytest.raises(QuantizeError, match="BPE pre-tokenizer is not one llama.cpp recognises"):
        llama_cpp.convert(folder, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))
    out = tmp_path / "out"
    code = main(["quantize", str(folder), "--variants", "Q8_0", "--no-eval", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "llama.cpp's converter failed: its BPE pre-tokenizer is not one llama.cpp recognises" in errors[0]
    assert not out.exists() or not any(out.iterdir())
