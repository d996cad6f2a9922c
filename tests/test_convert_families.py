"""Our streaming converter on every family it has, against llama.cpp's own converter and transformers.

For each family (Llama with byte-level BPE and with SentencePiece, Qwen3, Gemma 3, Phi-3 with SentencePiece,
Phi-4 with GPT-2 BPE, SmolLM3): our F16 GGUF and the one llama.cpp's convert_hf_to_gguf.py writes for the same
folder have the same tensors (names, types, shapes, bytes) and the same metadata (every key, every value,
general.* included: both derive the name from the folder when none is given); llama.cpp running our file gives
transformers' logits and tokens; its Q4_K_M has the per-tensor types our size estimate predicts and generates.
Gemma 3 and SmolLM3 get six and four layers so that a global-attention layer and a no-RoPE layer are in the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantspace.converter import llama_cpp
from quantspace.converter.streaming import convert
from quantspace.converter.tensor_types import choose_types, f16_tensors, model_facts
from quantspace.formats.gguf import LLAMA_CPP, OURS, VARIANTS, converter_for, llama_quantize
from tests.conftest import _tiny
from tests.test_convert import gguf_logits, hf_logits, tokenize_mismatches
from tests.test_pipeline import llama_generate
from tests.tiny import corpus

FAMILIES = ["llama", "llama_spm", "qwen3", "gemma3", "phi3", "phi4", "smollm3"]
# llama.cpp loads a Phi-3 SentencePiece vocabulary only with Phi-3's own chat tokens (<|end|>, ...), which a
# tokenizer trained here lacks: that folder is checked against llama.cpp's converter byte for byte only.
RUNNABLE = [f for f in FAMILIES if f != "phi3"]


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")):
            shutil.copy(f, dst / f.name)


def _rebuild(src: Path, dst: Path, **overrides) -> Path:
    """A random model of src's family with config overrides (more layers), src's tokenizer, made as tiny.py
    makes its models (weights that make a wrong conversion visible)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True)
    config = AutoConfig.from_pretrained(src)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return dst


def _family_folder(family: str, root: Path) -> Path:
    if family == "llama":
        return _tiny("tiny-llama-bpe", "bpe", "llama")
    if family == "llama_spm":
        return _tiny("tiny-llama-spm", "spm", "llama")
    if family == "qwen3":
        return _tiny("tiny-qwen3", "bpe", "qwen3")
    if family == "gemma3":
        # Gemma's SentencePiece style (no "▁" added before the text), layers 0-4 sliding, layer 5 global.
        src = _tiny("tiny-gemma3-gemma", "gemma", "gemma3")
        return _rebuild(src, root / "gemma3", num_hidden_layers=6,
                        layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=16)
    if family == "smollm3":
        src = _tiny("tiny-smollm3", "bpe", "smollm3")
        return _rebuild(src, root / "smollm3", num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                        layer_types=["full_attention"] * 4)
    phi3 = _tiny("tiny-phi3", "bpe", "phi3")
    folder = root / family
    shutil.copytree(phi3, folder)
    if family == "phi4":   # Phi-4: a GPT-2 byte-level BPE tokenizer, no sliding window
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
        return folder
    # Phi-3: a SentencePiece tokenizer.model, and a sliding window as Phi-3-mini's config has
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    _copy_tokenizer(_tiny("tiny-llama-spm", "spm", "llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(bos_token_id=1, eos_token_id=2, sliding_window=2047)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """family → (HF folder, our F16 GGUF, llama.cpp converter's F16 GGUF)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        src = _family_folder(family, root / "src")
        ours = convert(src, root / f"{family}-ours.gguf")
        theirs = llama_cpp.convert(src, root / f"{family}-llama-cpp.gguf")
        out[family] = (src, ours, theirs)
    return out


def _metadata(reader: gguf.GGUFReader) -> dict[str, object]:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_file_as_llama_cpps_converter(made, family):
    src, ours, theirs = made[family]
    assert converter_for(json.loads((src / "config.json").read_text())) == OURS
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert list(ta) == list(tb)
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert list(ta[name].shape) == list(tb[name].shape), name
        assert np.asarray(ta[name].data).tobytes() == np.asarray(tb[name].data).tobytes(), name
    ka, kb = _metadata(a), _metadata(b)
    assert sorted(ka) == sorted(kb)
    assert {k: v for k, v in ka.items() if v != kb[k]} == {}
    # The keys this work added for the older families too: llama.cpp reads them where its defaults differ.
    arch = ka["general.architecture"]
    if "head_dim" in json.loads((src / "config.json").read_text()):
        assert f"{arch}.attention.key_length" in ka
    assert "tokenizer.ggml.add_bos_token" in ka


def test_a_given_name_is_the_models_name_whatever_its_folder(made, tmp_path):
    """A Hub download sits in a folder named by commit hash: with the model's name given, general.* are what
    llama.cpp's converter writes for a folder of that name, and general.name is the name itself."""
    src, _, _ = made["qwen3"]
    hashed = tmp_path / "3f9c0d2e41b7"
    shutil.copytree(src, hashed)
    named = tmp_path / "My-Qwen3-0.6B-Instruct"
    shutil.copytree(src, named)
    given = _metadata(gguf.GGUFReader(convert(hashed, tmp_path / "given.gguf", name=named.name)))
    theirs = _metadata(gguf.GGUFReader(llama_cpp.convert(named, tmp_path / "theirs.gguf")))
    assert given.pop("general.name") == named.name
    theirs.pop("general.name")
    assert given == theirs
    assert "Instruct" in given["general.finetune"]   # guessed from the name, not from "3f9c0d2e41b7"


@pytest.mark.parametrize("family", RUNNABLE)
def test_f16_logits_match_transformers(made, family):
    from transformers import AutoTokenizer

    src, ours, _ = made[family]
    tokens = AutoTokenizer.from_pretrained(src)(corpus()[:2000]).input_ids[:128]
    mine, ref = gguf_logits(ours, tokens), hf_logits(src, tokens)
    scale = np.abs(ref).max()
    assert np.abs(mine - ref).max() < 5e-3 * scale + 1e-3, np.abs(mine - ref).max() / scale
    # The bound above is the check; a random model's near-tied logits may swap the top token (Phi-4: 4 of 128).
    assert (mine.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("family", RUNNABLE)
def test_llama_cpp_tokenizes_like_transformers(made, family):
    src, ours, _ = made[family]
    bad, llm, hf = tokenize_mismatches(src, ours)
    assert not bad, f"{len(bad)} lines differ, e.g. {bad[:3]}"
    assert llm.tokenize(b"Hello", add_bos=True, special=False) == hf("Hello").input_ids
    llm.close()


@pytest.mark.parametrize("family", RUNNABLE)
def test_q4_k_m_has_the_predicted_types_and_generates(made, family, tmp_path):
    from quantspace.estimate import tensor_shapes
    from quantspace.source import resolve

    src, ours, _ = made[family]
    out = tmp_path / "q4.gguf"
    llama_quantize(ours, out, VARIANTS["Q4_K_M"].ftype)
    info = resolve(str(src))
    predicted = choose_types(f16_tensors(tensor_shapes(info, None), info.config), VARIANTS["Q4_K_M"].ftype,
                             model_facts(info.config))
    written = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    assert {n: t.name for n, t in predicted.items()} == {n: t.name for n, t in written.items()}
    assert llama_generate(out).strip()


def _with_config(src: Path, **changes) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("family,changes", [
    ("gemma3", {"layer_types": ["full_attention"] * 6}),                  # not llama.cpp's 5 sliding : 1 global
    ("smollm3", {"no_rope_layers": [1, 0, 1, 1]}),                       # not every fourth layer
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 32,
                                  "short_factor": [1.0] * 32, "original_max_position_embeddings": 512}}),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 256}}),
    ("llama_spm", {"vocab_size": 32016}),                                 # CodeLlama's infill tokens
])
def test_settings_we_do_not_reproduce_go_to_llama_cpps_converter(made, family, changes):
    src = made[family][0]
    assert converter_for(_with_config(src, **changes)) == LLAMA_CPP
