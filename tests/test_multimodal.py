"""Multimodal checkpoints: a tiny Gemma3ForConditionalGeneration (SigLIP tower) gives a text GGUF per variant
plus one mmproj file that llama.cpp's multimodal loader (libmtmd) accepts and that turns an image into the same
embeddings transformers computes; NF4 keeps the towers 16-bit, quantizes and LoRA-trains the language model;
AWQ refuses in one line."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from quantspace.preflight import preflight
from tests.tiny import IMAGE_TOKENS, VISION_IMAGE_SIZE, build_tiny_gemma3_vision

NAME = "tiny-gemma3-vision"
MMPROJ = f"mmproj-{NAME}-F16.gguf"
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_vlm():
    from tests.conftest import CACHE

    path = CACHE / NAME
    if not (path / "model.safetensors").is_file():
        build_tiny_gemma3_vision(path)
    return path


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(VISION_IMAGE_SIZE, VISION_IMAGE_SIZE, 3), dtype=np.uint8)


def mtmd_image_embeddings(text_gguf, mmproj, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Load the projector with llama.cpp's libmtmd next to the text model, tokenize a prompt with one image and
    encode it; then decode the whole prompt. Returns (the image's embeddings, the chunk types)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=128, n_batch=128, verbose=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup = False, 2, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    assert ctx, "libmtmd refused the mmproj file"
    try:
        assert mtmd.mtmd_support_vision(ctx)
        pixels = (ctypes.c_uint8 * image.size).from_buffer_copy(image.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(image.shape[1], image.shape[0], pixels)
        chunks = mtmd.mtmd_input_chunks_init()
        prompt = b"Describe " + mtmd.mtmd_default_marker() + b" in one word."
        text = mtmd.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=True, parse_special=True)
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        kinds = [mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(chunks, i))
                 for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        image_chunk = mtmd.mtmd_input_chunks_get(chunks, kinds.index(mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE))
        assert mtmd.mtmd_encode_chunk(ctx, image_chunk) == 0
        n = mtmd.mtmd_input_chunk_get_n_tokens(image_chunk)
        width = llama_cpp.llama_model_n_embd(llm.model)
        embeddings = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n, width)).copy()
        n_past = llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, llm.ctx, chunks, 0, 0, 128, True, ctypes.byref(n_past)) == 0
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        assert n_past.value == mtmd.mtmd_helper_get_n_pos(chunks) and np.isfinite(logits).all()
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()
    return embeddings, kinds


def transformers_image_embeddings(model_dir, image: np.ndarray) -> np.ndarray:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    pixels = processor.image_processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)
    return (out[0] if isinstance(out, (list, tuple)) else out).reshape(IMAGE_TOKENS, -1).numpy()


def test_gguf_writes_text_variants_and_one_mmproj_llama_cpp_loads(tiny_vlm, tmp_path):
    from quantspace import quantize
    from quantspace.report import Report

    pre = preflight(str(tiny_vlm), "gguf", ["Q4_K_M", "Q8_0"], evaluate=True)
    assert pre.ok, pre.problems
    assert any("Also writes " + MMPROJ in c for c in pre.checks), pre.checks
    out = tmp_path / "out"
    report = quantize(str(tiny_vlm), variants="Q4_K_M,Q8_0", out=out, ctx=64, max_chunks=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "quantspace.json", "size_vs_kld.svg", MMPROJ, f"{NAME}-Q4_K_M.gguf", f"{NAME}-Q8_0.gguf"])
    mmproj = out / MMPROJ
    assert Report.load(out / "quantspace.json").files[0].details["mmproj"] == MMPROJ
    # Sizes as preflight said: the text files without the towers, the projector on its own.
    for f in report.files:
        assert f.details["mmproj"] == MMPROJ
        assert abs(pre.sizes[f.variant] - f.size_bytes) / f.size_bytes < 0.03, (f.variant, pre.sizes, f.size_bytes)
    assert abs(pre.sizes["mmproj"] - mmproj.stat().st_size) / mmproj.stat().st_size < 0.05
    # The text model against the source's language model, on text: 8 bits keep it nearly exactly.
    by = {f.variant: f.metrics for f in report.files}
    assert by["Q8_0"]["kld_mean"] < 0.01 and by["Q8_0"]["top1_agreement"] > 0.9, by
    assert by["Q4_K_M"]["kld_mean"] > by["Q8_0"]["kld_mean"]
    # llama.cpp's multimodal loader takes the projector with a quantized text model, and an image becomes the
    # embeddings transformers computes (the projector is F16).
    image = _image()
    got, kinds = mtmd_image_embeddings(out / f"{NAME}-Q4_K_M.gguf", mmproj, image)
    assert kinds == [0, 1, 0]   # text, image, text
    want = transformers_image_embeddings(tiny_vlm, image)
    assert got.shape == want.shape == (IMAGE_TOKENS, 256)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max(), np.abs(got - want).max()
    card = (out / "README.md").read_text()
    assert f"llama-mtmd-cli -m {NAME}-Q4_K_M.gguf --mmproj {MMPROJ}" in card
    assert f"llama-server -m {NAME}-Q4_K_M.gguf --mmproj {MMPROJ}" in card


def test_the_mmproj_is_pushed_in_the_same_commit(tiny_vlm, tmp_path, hub):
    """From a Hub repo (the processor files, which the projector's conversion reads, come with the download) to
    a Hub repo."""
    from quantspace import quantize
    from tests.hub_fixtures import ALICE_TOKEN

    hub.create_repo(f"quantorg/{NAME}")
    hub.upload_folder(f"quantorg/{NAME}", tiny_vlm)
    repo = f"quantorg/{NAME}-GGUF"
    quantize(f"quantorg/{NAME}", variants="Q8_0", out=tmp_path / "out", push=repo, token=ALICE_TOKEN,
             no_eval=True)
    files = hub.files(repo)
    assert {MMPROJ, f"{NAME}-Q8_0.gguf", "README.md", "quantspace.json"} <= set(files), sorted(files)
    assert files[MMPROJ] == (tmp_path / "out" / MMPROJ).read_bytes()
    assert len(hub.commits(repo)) == 2   # the repo's initial commit + ours: the projector came with the rest
    card = files["README.md"].decode()
    assert f"llama-mtmd-cli -hf {repo}:Q8_0" in card and f"--mmproj {MMPROJ}" in card


def test_nf4_keeps_the_towers_16bit_and_trains_the_language_model(tiny_vlm, tmp_path):
    import torch
    from bitsandbytes.nn import Linear4bit
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from quantspace import quantize

    pre = preflight(str(tiny_vlm), "nf4", evaluate=True)
    assert pre.ok, pre.problems
    out = tmp_path / "out"
    report = quantize(str(tiny_vlm), method="nf4", out=out, ctx=64, max_chunks=2,
                      options={"qlora_steps": 2, "qlora_seqlen": 32})
    f = report.files[0]
    assert abs(pre.sizes["NF4"] - f.size_bytes) / f.size_bytes < 0.05, (pre.sizes, f.size_bytes)
    assert f.details["towers_16bit"] == ["vision_tower", "multi_modal_projector"]
    assert f.details["lora_targets"] == LM_TARGETS
    m = f.metrics   # the 4-bit language model against the source's, on text
    assert math.isfinite(m["kld_mean"]) and 0 <= m["kld_mean"] < 1 and m["top1_agreement"] > 0.3, m
    # LoRA on the language model's decoder linears only (the SigLIP tower has q_proj/k_proj/v_proj too).
    q = f.details["qlora"]
    assert q["lora_tensors"] == q["lora_tensors_with_gradient"] == 2 * len(LM_TARGETS) * 2
    assert math.isfinite(q["loss_before"]) and math.isfinite(q["loss_after"])
    # The checkpoint reloads as a user loads it: 4-bit language model, 16-bit tower, and it still sees images.
    model = AutoModelForImageTextToText.from_pretrained(out, device_map={"": "cpu"})
    four_bit = [n for n, mod in model.named_modules() if isinstance(mod, Linear4bit)]
    assert len(four_bit) == len(LM_TARGETS) * 2 and all(".language_model." in n for n in four_bit), four_bit
    tower = [mod for n, mod in model.named_modules() if ".vision_tower." in n and isinstance(mod, torch.nn.Linear)]
    assert tower and not any(isinstance(mod, Linear4bit) for mod in tower)
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(text="Describe <start_of_image>", images=Image.fromarray(_image()), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "AutoModelForImageTextToText.from_pretrained(model_id" in card and "exclude_modules=" in card


def test_awq_refuses_a_multimodal_model_in_one_line(tiny_vlm):
    pre = preflight(str(tiny_vlm), "awq", evaluate=False)
    assert not pre.ok and pre.problems == ["AWQ does not support Gemma3ForConditionalGeneration yet (supported: "
                                           + pre.problems[0].split("(supported: ", 1)[1]], pre.problems
