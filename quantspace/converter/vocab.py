"""Tokenizer → GGUF metadata, for the two tokenizer kinds llama.cpp reproduces exactly.

- SentencePiece-style (llama-2, mistral): `tokenizer.model`, or a tokenizer.json BPE model with byte fallback.
- Byte-level BPE (llama-3, qwen2, SmolLM, GPT-2): tokenizer.json; the pre-tokenizer is recognised by how it
  splits a probe text (references below) and written as `tokenizer.ggml.pre`, which selects llama.cpp's splitter.

Anything else raises TokenizerError: a GGUF whose tokenizer silently differs is worse than no GGUF.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import MissingFileError, TokenizerError

# Regexes of byte-level pre-tokenizers as tokenizer.json writes them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(regex: str) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


_GPT2_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}

# llama.cpp pre-tokenizer name → a tokenizers pre-tokenizer that splits text exactly as llama.cpp's does for it.
# A tokenizer is recognised when it splits the probe text the same way, whatever its tokenizer.json looks like.
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "llama-bpe": _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(_QWEN2_SPLIT),
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTES]},
    "gpt-2": _GPT2_BYTES,
}

# Text that tells the pre-tokenizers apart: digit runs of every length, contractions in both cases, runs and
# mixes of spaces, tabs and newlines, punctuation runs, letters and digits of several scripts, emoji sequences.
PROBE_TEXT = (
    "\n \n\n \t\t \t\n  \r\n   x\n    \n🦙 (llama) 👩\u200d💻✨ 🚀🚀 7 77 777 7777 77777 777777 1.5 1..5 "
    "١٢٣٤ 四五六七 ४२ café Ωmega über-straße Привет мир 日本語のテキストabc123 ～～ ----==== ''''```\"\"....!!!??? "
    "I'm sure you'll see; We'VE 'RE 'S 'Ll she's THEY'D  it's    spaced\tout\n\n\nend "
)


def _splits(pre_tokenizer: dict[str, Any] | None) -> list[str] | None:
    """How a pre-tokenizer (tokenizer.json form) splits the probe text; None when tokenizers cannot build it."""
    from tokenizers import Tokenizer

    if pre_tokenizer is None:
        return None
    holder = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"},
              "pre_tokenizer": pre_tokenizer}
    try:
        tok = Tokenizer.from_str(json.dumps(holder))
    except Exception:   # tokenizers raises plain Exceptions for configs it does not know
        return None
    return [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(PROBE_TEXT)]


# Fetched with the weights, and copied as they are next to a transformers checkpoint (AWQ, NF4).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


@dataclass
class VocabData:
    """Everything the GGUF writer needs about the tokenizer."""

    model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None                 # tokenizer.ggml.pre, BPE only
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool | None = None
    special: gguf.SpecialVocab | None = field(default=None, repr=False)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.special is not None:
            self.special.add_to_gguf(writer, quiet=True)


def detect_pre(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer, recognised by how it splits a probe text
    (as llama.cpp recognises tokenizers by how they tokenize its own), or TokenizerError."""
    got = _splits(tokenizer_json.get("pre_tokenizer"))
    if got is not None:
        for name, reference in PRE_TOKENIZERS.items():
            if _splits(reference) == got:
                return name
    kind = (tokenizer_json.get("pre_tokenizer") or {}).get("type", "none")
    raise TokenizerError(
        f"This byte-level BPE tokenizer's pre-tokenizer ({kind}) splits text unlike any llama.cpp reproduces "
        f"({', '.join(PRE_TOKENIZERS)}); the GGUF would tokenize differently from the original, so it is not "
        "converted."
    )


def is_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """A BPE model without SentencePiece's byte fallback: the kind whose pre-tokenizer llama.cpp must be told."""
    model = tokenizer_json.get("model", {})
    return model.get("type") == "BPE" and not model.get("byte_fallback")


def _added_types(tokenizer_json: dict[str, Any]) -> dict[int, int]:
    """Token id → GGUF type for added tokens: special ones are control tokens, others user-defined."""
    return {
        tok["id"]: int(gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED)
        for tok in tokenizer_json.get("added_tokens", [])
    }


def _pad(vocab: VocabData, n_vocab: int) -> None:
    """Pad to the embedding size: llama.cpp requires one token per embedding row."""
    if len(vocab.tokens) > n_vocab:
        raise TokenizerError(
            f"The tokenizer has {len(vocab.tokens)} tokens but the model only {n_vocab} embeddings; "
            "the tokenizer does not belong to this model."
        )
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))


def _tokens_by_id(tok: dict[str, Any]) -> tuple[dict[int, str], int]:
    """Token text per id (model vocabulary, then added tokens) and the vocabulary size they span."""
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    return by_id, max(by_id) + 1


def _bpe_vocab(tok: dict[str, Any]) -> VocabData:
    by_id, n = _tokens_by_id(tok)
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise TokenizerError(f"tokenizer.json has holes in its token ids (first: {missing[0]}); cannot convert.")
    added = _added_types(tok)
    return VocabData(
        model="gpt2",
        pre=detect_pre(tok),
        tokens=[by_id[i].encode("utf-8") for i in range(n)],
        scores=[0.0] * n,
        types=[added.get(i, int(gguf.TokenType.NORMAL)) for i in range(n)],
    )


def _spm_vocab_from_model(path: Path, tok: dict[str, Any] | None) -> VocabData:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    if tok is not None:
        added_types = _added_types(tok)
        for added in sorted(tok.get("added_tokens", []), key=lambda a: a["id"]):
            tid = added["id"]
            kind = added_types[tid]
            if tid < len(tokens):
                if types[tid] == gguf.TokenType.NORMAL:
                    types[tid] = kind
                continue
            if tid != len(tokens):
                raise TokenizerError(f"Added token id {tid} leaves a gap after the SentencePiece vocabulary.")
            tokens.append(added["content"].encode("utf-8"))
            scores.append(-1000.0)
            types.append(kind)
    from sentencepiece import sentencepiece_model_pb2 as pb  # type: ignore[attr-defined]

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return VocabData(model="llama", pre=None, tokens=tokens, scores=scores, types=types,
                     add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _spm_vocab_from_json(tok: dict[str, Any]) -> VocabData:
    """A SentencePiece BPE model exported to tokenizer.json: scores are rebuilt from merge ranks.

    llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result scores highest, which is the
    same as applying merges in rank order when a merged piece scores minus its rank.
    """
    model = tok["model"]
    by_id, n = _tokens_by_id(tok)
    scores = [0.0] * n
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        tid = model["vocab"].get(left + right)
        if tid is not None and scores[tid] == 0.0:
            scores[tid] = -float(rank + 1)
    added = _added_types(tok)
    types = []
    unk = model.get("unk_token")
    for i in range(n):
        text = by_id.get(i, "")
        if i in added:
            types.append(added[i])
        elif text == unk:
            types.append(int(gguf.TokenType.UNKNOWN))
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(int(gguf.TokenType.BYTE))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    prefix = "Prepend" in json.dumps(tok.get("normalizer")) or "Metaspace" in json.dumps(tok.get("pre_tokenizer"))
    return VocabData(model="llama", pre=None, tokens=[by_id.get(i, "").encode() for i in range(n)],
                     scores=scores, types=types, add_space_prefix=prefix)


def _is_spm_json(tok: dict[str, Any]) -> bool:
    model = tok.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def check_tokenizer_files(names: set[str]) -> None:
    """Fail before any download when the repo lacks a tokenizer we can convert."""
    if "tokenizer.json" not in names and "tokenizer.model" not in names:
        raise MissingFileError(
            "The model has no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer inside it. "
            "Add the tokenizer files to the repo (or the folder) and try again."
        )


def effective_tokenizer_json(model_dir: Path) -> dict[str, Any] | None:
    """The tokenizer as transformers really loads it, which can differ from tokenizer.json.

    transformers 5 tokenizer classes may rebuild parts of the pipeline (Qwen2Tokenizer sets its own
    pre-tokenizer regex, for one); users get that behaviour, so the GGUF must reproduce it.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return json.loads(backend.to_str()) if backend is not None else None
    except Exception as exc:  # transformers raises many types here; all mean "cannot load this tokenizer"
        raise TokenizerError(f"transformers cannot load this tokenizer: {str(exc).splitlines()[0]}") from None


def load_vocab(model_dir: Path, n_vocab: int) -> VocabData:
    """Read the tokenizer of an HF model folder into GGUF form, padded to `n_vocab` tokens."""
    check_tokenizer_files({p.name for p in model_dir.iterdir()})
    tok_path, spm_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tok = effective_tokenizer_json(model_dir) if tok_path.is_file() else None
    if tok is not None and tok.get("model", {}).get("type") not in ("BPE", None):
        raise TokenizerError(
            f"Tokenizer type {tok['model']['type']} is not supported yet (only BPE and SentencePiece BPE)."
        )
    if spm_path.is_file() and (tok is None or _is_spm_json(tok)):
        vocab = _spm_vocab_from_model(spm_path, tok)
    elif tok is not None and _is_spm_json(tok):
        vocab = _spm_vocab_from_json(tok)
    elif tok is not None:
        vocab = _bpe_vocab(tok)
    else:
        raise TokenizerError("tokenizer.model alone is not enough for this tokenizer; tokenizer.json is needed.")
    _pad(vocab, n_vocab)
    # gguf warns about template shapes it does not parse (pair templates); the parts we need are read fine.
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        vocab.special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    finally:
        log.setLevel(level)
    return vocab
