"""Tiny random Llama-family models with tokenizers trained here, for fast tests (no downloads).

Hidden size 256 and FFN 512 so that every 2-D weight has rows of a multiple of 256: K-quants apply.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CORPUS_PATH = Path(__file__).resolve().parent.parent / "quantspace" / "data" / "sotu.txt"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def corpus() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


def _bpe_tokenizer(out: Path, vocab_size: int = 1024, split: str | None = LLAMA3_SPLIT) -> None:
    """A byte-level BPE tokenizer with BOS and a chat template: llama-3 style (split regex + byte-level), or
    SmolLM/StarCoder style (single digits + GPT-2 byte-level regex) when `split` is None."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    # <|endoftext|>: transformers' Qwen2Tokenizer adds it when missing, past the embedding rows.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus().splitlines(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>")
    fast.chat_template = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>"
                          "{% endfor %}")
    fast.save_pretrained(out)


def _spm_tokenizer(out: Path, vocab_size: int = 1024, gemma: bool = False) -> None:
    """A llama-2 style SentencePiece BPE tokenizer with byte fallback; Gemma style (no "▁" prefix added before
    the text, GemmaTokenizer) when `gemma`."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = out / "corpus.txt"
    # SentencePiece skips over-long lines: give it one sentence per line.
    text.write_text(corpus().replace(". ", ".\n"), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=2, minloglevel=2,
        # as llama-2: no normalisation, whitespace kept as written
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=not gemma,
    )
    text.unlink()
    (out / "tokenizer.vocab").unlink()
    # transformers converts tokenizer.model to tokenizer.json; real llama-2/mistral repos ship both.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "legacy": False}))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)


def build_tiny(out: Path, kind: str = "bpe", arch: str = "llama", seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Path:
    """Build a tiny random model folder (`kind`: "bpe", "digits", "spm" or "gemma"; `arch`: "llama", "qwen2" or one of
    FAMILIES)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if kind in ("spm", "gemma"):
        _spm_tokenizer(tmp, gemma=kind == "gemma")
    elif kind == "digits":
        _bpe_tokenizer(tmp, split=None)
    else:
        _bpe_tokenizer(tmp, split=QWEN2_SPLIT if arch == "qwen2" else LLAMA3_SPLIT)
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    if arch in FAMILIES:
        model = _family_model(arch, common)
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # default init is too flat to tell a right conversion from a wrong one
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# Newer families, built from transformers' own config classes: (config class, model class, overrides).
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 64, "query_pre_attn_scalar": 64,
                                                         "sliding_window": 64}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": None}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"pad_token_id": None}),
    # Mixture of experts: 4 experts, 2 per token, expert FFN width a multiple of 256.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"head_dim": 64, "num_experts": 4,
                                                           "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                                                           "norm_topk_prob": True}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # Hybrid: one gated-delta-net (linear attention) layer, one full-attention layer.
    "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", {
        "head_dim": 64, "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "layer_types": ["linear_attention", "full_attention"]}),
    # An older family: StableLM (2023): LayerNorm with biases, partial rotary.
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"layer_norm_eps": 1e-5, "use_qkv_bias": True}),
    # Gemma 4 (text): sliding and full attention layers.
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", {
        "head_dim": 64, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"],
        "per_layer_config": {"1": {"head_dim": 128}}, "hidden_size_per_layer_input": 0}),
}


def _family_model(arch: str, common: dict) -> torch.nn.Module:
    import transformers

    config_name, model_name, overrides = FAMILIES[arch]
    config = getattr(transformers, config_name)(**{**common, **overrides})
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():   # norms start at 1 (or 0 for Gemma's 1 + w): make them matter
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# The tiny Gemma 3 vision model's image: 64x64 pixels in 16x16 patches (a 4x4 grid), pooled to 2x2 = 4 tokens.
VISION_IMAGE_SIZE, VISION_PATCH, IMAGE_TOKENS = 64, 16, 4
GEMMA3_IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def build_tiny_gemma3_vision(out: Path, seed: int = 0) -> Path:
    """A tiny random Gemma3ForConditionalGeneration: the gemma3 family's text model (hidden 256, 2 layers,
    SentencePiece tokenizer plus Gemma 3's image tokens) with a small SigLIP vision tower, and the processor files
    (preprocessor_config.json, processor_config.json) transformers and llama.cpp's converter read."""
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Gemma3ImageProcessor, Gemma3Processor

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _spm_tokenizer(tmp)
    boi, eoi, image = GEMMA3_IMAGE_TOKENS
    config_path = tmp / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["extra_special_tokens"] = {"boi_token": boi, "eoi_token": eoi, "image_token": image}
    config_path.write_text(json.dumps(tok_config))
    tokenizer = AutoTokenizer.from_pretrained(tmp)
    tokenizer.add_special_tokens({"additional_special_tokens": list(GEMMA3_IMAGE_TOKENS)})
    ids = tokenizer.convert_tokens_to_ids(list(GEMMA3_IMAGE_TOKENS))
    processor = Gemma3Processor(
        Gemma3ImageProcessor(size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE}, do_pan_and_scan=False),
        tokenizer, image_seq_length=IMAGE_TOKENS,
        chat_template=("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if m['content'] is string %}"
                       "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                       "<start_of_image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
                       "{% endfor %}"))
    processor.save_pretrained(tmp)
    _, _, overrides = FAMILIES["gemma3"]
    text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5,
                **overrides)
    vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  image_size=VISION_IMAGE_SIZE, patch_size=VISION_PATCH, vision_use_head=False)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_TOKENS,
                                       boi_token_index=ids[0], eoi_token_index=ids[1], image_token_index=ids[2],
                                       tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():   # as _family_model: weights that tell a right conversion from a wrong one
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 saves the SigLIP tower without its `vision_model.` level; Hub checkpoints (and llama.cpp's
    # tensor map) have it, and transformers loads either.
    weights = load_file(tmp / "model.safetensors")
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
               for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
