"""Multimodal checkpoints (a language model with vision/audio towers, e.g. Gemma3ForConditionalGeneration,
Qwen3-VL, Mistral 3): how to tell them from text-only ones, which tensors are towers, how transformers loads them.

GGUF writes the language model as the usual files plus one `mmproj-…gguf` (llama.cpp's projector); NF4 keeps
the towers 16-bit and quantizes the language model; accuracy is always measured on the language model, text only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A multimodal model's image/audio settings: fetched with the weights, copied next to an NF4 checkpoint (for
# AutoProcessor), read by llama.cpp's --mmproj conversion (image mean and std).
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
# config.json keys that only multimodal checkpoints have.
TOWER_CONFIG_KEYS = ("vision_config", "audio_config", "vision_tower", "mm_vision_tower")
# Module names of towers and projectors in the checkpoints transformers and llama.cpp know (a tensor is a tower's
# when one of its dotted parts is one of these).
TOWER_MODULES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "audio_tower",
                 "audio_model", "embed_vision", "embed_audio", "vision_embed_tokens")


def is_multimodal(config: dict[str, Any]) -> bool:
    return any(key in config for key in TOWER_CONFIG_KEYS)


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: a multimodal config's text_config over its top level (vocab_size, layer
    counts and tie_word_embeddings live there)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def tower_of(tensor: str) -> str | None:
    """The tower/projector module a tensor belongs to (e.g. "vision_tower"), or None for the language model."""
    return next((part for part in tensor.split(".") if part in TOWER_MODULES), None)


def towers(names: list[str] | set[str] | dict[str, Any]) -> list[str]:
    """The tower/projector modules among these tensor names, in TOWER_MODULES order."""
    found = {tower_of(n) for n in names}
    return [m for m in TOWER_MODULES if m in found]


def tower_patterns(modules: list[str]) -> list[str]:
    """Module-name patterns matching every layer inside these towers, wherever transformers nests them
    ("model.vision_tower.encoder…"): for bitsandbytes' llm_int8_skip_modules (matched from the start, as a regex)
    and peft's exclude_modules (a full-match regex)."""
    return [rf"(?:.*\.)?{m}(?:\..*)?" for m in modules]


def auto_class_name(config: dict[str, Any]) -> str | None:
    """The transformers Auto class that loads this model with its language-model head, without remote code:
    AutoModelForImageTextToText for a multimodal model it maps (it takes images too), else AutoModelForCausalLM
    when it maps the model type."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    if is_multimodal(config) and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "AutoModelForImageTextToText"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "AutoModelForCausalLM"
    return None


def load_lm(model_dir: str | Path, **kwargs: Any) -> Any:
    """Load a causal LM, or a multimodal model with its language-model head (text-only inputs work on both)."""
    import transformers

    from .archs import load_config

    name = auto_class_name(load_config(Path(model_dir))) or "AutoModelForCausalLM"
    return getattr(transformers, name).from_pretrained(model_dir, **kwargs)


def vocab_size(model: Any) -> int:
    """The language model's vocabulary (a multimodal config keeps it in its text config)."""
    return int(model.config.get_text_config().vocab_size)
