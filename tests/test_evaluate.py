"""quantspace.evaluate: text, chunking, source reference, GGUF comparison, and the metric math.

Expected values are computed here independently (direct formulas, a plain
transformers forward pass), never hard-coded.
"""

from __future__ import annotations

import json

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantspace.errors import EvalTextError, TokenizerError
from quantspace.evaluate import (
    DEFAULT_TEXT,
    EvalSettings,
    EvalText,
    Metrics,
    Reference,
    chunk_tokens,
    common_vocab,
    compare_to_reference,
    evaluate_gguf,
    evaluate_source,
    load_eval_text,
    reference_from_logits,
    tokenize_for_eval,
)

SETTINGS = EvalSettings(ctx=128, max_chunks=2, threads=2)


# --------------------------------------------------------------------------- text


def test_default_text_is_substantial_and_deterministic() -> None:
    first, second = load_eval_text(), load_eval_text()
    assert first == second
    assert first.source == DEFAULT_TEXT
    assert len(first.text) > 100_000
    assert first.text.startswith("Barack Obama, 2016\n")


def test_missing_text_file(tmp_path: Path) -> None:
    with pytest.raises(EvalTextError, match="does not exist"):
        load_eval_text(tmp_path / "nope.txt")


def test_empty_text_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(EvalTextError, match="empty"):
        load_eval_text(empty)


def test_user_text_file(tmp_path: Path) -> None:
    file = tmp_path / "mine.txt"
    file.write_text("Some words.", encoding="utf-8")
    assert load_eval_text(str(file)) == EvalText(text="Some words.", source="mine.txt")


# --------------------------------------------------------------------------- chunking


def test_chunk_tokens_without_bos() -> None:
    ids = list(range(100, 1100))
    chunks = chunk_tokens(ids, EvalSettings(ctx=128, max_chunks=3), bos=None)
    assert chunks == [ids[0:128], ids[128:256], ids[256:384]]


def test_chunk_tokens_with_bos() -> None:
    ids = list(range(100, 400))
    chunks = chunk_tokens(ids, EvalSettings(ctx=128, max_chunks=16), bos=1)
    stream = [1, *ids]  # 301 tokens: two whole chunks
    assert len(chunks) == 2
    assert chunks[0] == stream[0:128]
    assert chunks[1] == [1, *stream[129:256]]


def test_text_too_short(smollm2: Path) -> None:
    with pytest.raises(EvalTextError, match="needs 128"):
        tokenize_for_eval(smollm2, EvalText("A few words.", "short.txt"), SETTINGS)


def test_tokenize_smollm2_has_no_bos(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    text = load_eval_text()
    chunks = tokenize_for_eval(smollm2, text, SETTINGS)
    assert [len(c) for c in chunks] == [128, 128]
    # SmolLM2's tokenizer adds no BOS, so (like llama-perplexity) nothing is replaced.
    ids = AutoTokenizer.from_pretrained(smollm2)(text.text[:5000], add_special_tokens=False)["input_ids"]
    assert chunks[0] + chunks[1] == ids[:256]


def test_tokenize_replaces_first_token_with_bos(smollm2: Path, tmp_path: Path) -> None:
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    bos = tokenizer.bos_token_id
    # The same tokenizer, made to add BOS when encoding with special tokens.
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    tokenizer.save_pretrained(tmp_path)
    text = load_eval_text()
    chunks = tokenize_for_eval(tmp_path, text, EvalSettings(ctx=128, max_chunks=3))
    ids = tokenizer(text.text[:5000], add_special_tokens=False)["input_ids"]
    assert [c[0] for c in chunks] == [bos, bos, bos]
    assert chunks[0][1:] == ids[:127]
    assert chunks[1][1:] == ids[128:255]  # position 127 of the stream was replaced by BOS


# --------------------------------------------------------------------------- metric math


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_kld_and_top1_math(tmp_path: Path) -> None:
    settings = EvalSettings(ctx=8, max_chunks=4)
    n, vocab = settings.scored_per_chunk, 7  # 3 scored rows per chunk
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab, size=8).tolist() for _ in range(4)]
    source = [rng.normal(0, 2, size=(n, vocab)).astype(np.float32) for _ in chunks]
    quant = [(s + rng.normal(0, 0.7, size=s.shape)).astype(np.float32) for s in source]

    # Direct formulas over all 12 scored rows.
    targets = np.concatenate([np.array(c[settings.ctx // 2 + 1 :]) for c in chunks])
    lp, lq = _log_softmax(np.concatenate(source)), _log_softmax(np.concatenate(quant))
    rows = np.arange(len(targets))
    expected_kld = float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())
    expected_top1 = float((lp.argmax(axis=1) == lq.argmax(axis=1)).mean())
    expected_ppl_source = math.exp(-lp[rows, targets].mean())
    expected_ppl_quant = math.exp(-lq[rows, targets].mean())
    assert 0 < expected_top1 < 1  # the synthetic case exercises both outcomes

    with reference_from_logits(chunks, source, settings, tmp_path, "synthetic") as ref:
        assert ref.metrics.perplexity == pytest.approx(expected_ppl_source, rel=1e-12)
        metrics = compare_to_reference(ref, quant)
        itself = compare_to_reference(ref, source)
    assert not list(tmp_path.iterdir())  # the memmap is deleted on close

    assert metrics.n_tokens == 12
    assert metrics.top1_agreement == expected_top1
    assert metrics.perplexity == pytest.approx(expected_ppl_quant, rel=1e-12)
    assert metrics.delta_ppl == pytest.approx(expected_ppl_quant - expected_ppl_source, rel=1e-9)
    # The reference is stored as float16: agreement to about 1e-3 relative.
    assert metrics.kld_mean == pytest.approx(expected_kld, rel=2e-3)
    kld, top1, delta_ppl = _comparison(itself)
    assert top1 == 1.0
    assert 0 <= kld < 1e-5
    assert delta_ppl == pytest.approx(0.0, abs=1e-9)


def test_padded_vocabulary_is_compared_over_common_range(tmp_path: Path) -> None:
    settings = EvalSettings(ctx=8, max_chunks=1)
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 5, size=8).tolist()]
    source = [rng.normal(size=(3, 5)).astype(np.float32)]
    # The quantized model has 3 padding entries that it never predicts.
    padded = [np.concatenate([source[0], np.full((3, 3), -1e4, dtype=np.float32)], axis=1)]
    with reference_from_logits(chunks, source, settings, tmp_path, "synthetic", tokenizer_size=5) as ref:
        metrics = compare_to_reference(ref, padded)
    kld, top1, delta_ppl = _comparison(metrics)
    assert top1 == 1.0
    assert 0 <= kld < 1e-5
    assert delta_ppl == pytest.approx(0.0, abs=1e-9)


def test_vocabulary_mismatch_is_an_error() -> None:
    assert common_vocab(49152, 49152, 49152) == 49152
    assert common_vocab(151936, 151665, 151665) == 151665  # padding only
    with pytest.raises(TokenizerError, match="tokenizer has 49152 tokens"):
        common_vocab(49152, 32000, 49152)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def chunks(smollm2: Path) -> list[list[int]]:
    return tokenize_for_eval(smollm2, load_eval_text(), SETTINGS)


@pytest.fixture(scope="module")
def reference(smollm2: Path, chunks: list[list[int]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    seen: list[tuple[int, int]] = []
    workdir = tmp_path_factory.mktemp("work")
    ref = evaluate_source(smollm2, chunks, SETTINGS, workdir, DEFAULT_TEXT, progress=lambda d, t: seen.append((d, t)))
    # One bar over the walk through the 30 decoder layers, then the 2 chunks scored.
    steps = json.loads((smollm2 / "config.json").read_text())["num_hidden_layers"] + len(chunks)
    assert seen == [(i, steps) for i in range(1, steps + 1)]
    yield ref
    ref.close()


def _source_logits(model_dir: Path, chunks: list[list[int]]) -> list[np.ndarray]:
    """Scored logits from a plain transformers forward pass of each whole chunk."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    first, last = SETTINGS.ctx // 2, SETTINGS.ctx - 1
    with torch.inference_mode():
        return [model(torch.tensor([c])).logits[0, first:last].numpy().copy() for c in chunks]


def test_source_perplexity_matches_cross_entropy(
    smollm2: Path, chunks: list[list[int]], reference: Reference
) -> None:
    import torch

    logits = _source_logits(smollm2, chunks)
    first = SETTINGS.ctx // 2
    nll = sum(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(rows).double(), torch.tensor(chunk[first + 1 :]), reduction="sum"
        ).item()
        for rows, chunk in zip(logits, chunks, strict=True)
    )
    n_tokens = len(chunks) * (SETTINGS.ctx - 1 - first)
    assert reference.metrics.n_tokens == n_tokens == 126
    assert 2 < reference.metrics.perplexity < 100
    assert reference.metrics.perplexity == pytest.approx(math.exp(nll / n_tokens), rel=1e-4)
    assert reference.metrics.delta_ppl is None and reference.metrics.kld_mean is None
    assert reference.tokens == chunks and reference.vocab_size == 49152

    # The same logits through the comparison path: nothing differs from the source.
    kld, top1, delta_ppl = _comparison(compare_to_reference(reference, logits))
    assert top1 == 1.0
    assert 0 <= kld < 1e-4
    assert abs(delta_ppl) < 1e-3 * reference.metrics.perplexity


def test_source_evaluation_is_deterministic(
    smollm2: Path, chunks: list[list[int]], reference: Reference, tmp_path: Path
) -> None:
    with evaluate_source(smollm2, chunks, SETTINGS, tmp_path, DEFAULT_TEXT) as again:
        assert again.metrics == reference.metrics
        assert np.array_equal(again.argmax, reference.argmax)
        assert np.array_equal(again.logprobs(1), reference.logprobs(1))


def test_gguf_against_its_dequantized_source(reference: Reference) -> None:
    from tests.models import smollm2_gguf

    seen: list[tuple[int, int]] = []
    metrics = evaluate_gguf(smollm2_gguf(), reference, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    assert metrics.n_tokens == reference.metrics.n_tokens
    # The HF folder is this very GGUF, dequantized and rounded to bfloat16.
    kld, top1, delta_ppl = _comparison(metrics)
    assert 0 <= kld < 0.05
    assert top1 > 0.9
    assert abs(delta_ppl) < 0.05 * reference.metrics.perplexity
    # What a user relies on: the same file gives the same numbers.
    assert evaluate_gguf(smollm2_gguf(), reference) == metrics


def test_gguf_with_other_vocabulary_is_refused(reference: Reference, tmp_path: Path) -> None:
    from tests.models import smollm2_gguf

    narrow = Reference(
        metrics=reference.metrics,
        tokens=reference.tokens,
        settings=reference.settings,
        text_source=reference.text_source,
        vocab_size=reference.vocab_size,
        tokenizer_size=reference.vocab_size + 1000,  # a tokenizer the GGUF cannot cover
        logprobs_path=_copy(reference.logprobs_path, tmp_path),
        argmax=reference.argmax,
    )
    with narrow, pytest.raises(TokenizerError):
        evaluate_gguf(smollm2_gguf(), narrow)


def _comparison(metrics: Metrics) -> tuple[float, float, float]:
    """KLD, top-1 agreement and ΔPPL, which a comparison always has."""
    assert metrics.kld_mean is not None and metrics.top1_agreement is not None and metrics.delta_ppl is not None
    return metrics.kld_mean, metrics.top1_agreement, metrics.delta_ppl


def _copy(path: Path, folder: Path) -> Path:
    return Path(shutil.copy(path, folder / path.name))
