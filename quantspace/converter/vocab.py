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
    scores: list[float] | None        # None: byte-level BPE, where llama.cpp writes no scores
    types: list[int]
    add_space_prefix: bool | None = None
    special: gguf.SpecialVocab | None = field(default=None, repr=False)

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
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


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when not marked special (<|...|>, Gemma's
    <unused..>, a few names)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


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
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))


def _tokens_by_id(tok: dict[str, Any]) -> tuple[dict[int, str], int]:
    """Token text per id (model vocabulary, then added tokens) and the vocabulary size they span."""
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    return by_id, max(by_id) + 1


def _bpe_vocab(tok: dict[str, Any], vocab_size: int | None) -> VocabData:
    """llama.cpp's byte-level BPE reading: one token per id up to the config's vocab_size ([PADn] for ids the
    tokenizer lacks), added tokens control or user-defined, no scores."""
    by_id, n = _tokens_by_id(tok)
    size = vocab_size or n
    if n > size:
        raise TokenizerError(f"The tokenizer has token id {n - 1} but the config's vocab_size is {size}; "
                             "the tokenizer does not belong to this model.")
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            if added[i].get("special") or looks_special(text):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
            tokens.append(text.encode("utf-8"))
        else:
            tokens.append(text.encode("utf-8"))
            types.append(int(gguf.TokenType.NORMAL))
    return VocabData(model="gpt2", pre=detect_pre(tok), tokens=tokens, scores=None, types=types)


def _spm_pieces(path: Path) -> tuple[list[bytes], list[float], list[int]]:
    """Pieces, scores and GGUF types of a tokenizer.model, read from its protobuf in one pass (a 262k-piece
    Gemma-size vocabulary: about 1 s and 60 MiB on a 2-core VM; see bench/README.md)."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # type: ignore[attr-defined]

    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    kinds = {pb.ModelProto.SentencePiece.NORMAL: gguf.TokenType.NORMAL,
             pb.ModelProto.SentencePiece.UNKNOWN: gguf.TokenType.UNKNOWN,
             pb.ModelProto.SentencePiece.CONTROL: gguf.TokenType.CONTROL,
             pb.ModelProto.SentencePiece.USER_DEFINED: gguf.TokenType.NORMAL,   # SentencePiece: "normal"
             pb.ModelProto.SentencePiece.UNUSED: gguf.TokenType.UNUSED,
             pb.ModelProto.SentencePiece.BYTE: gguf.TokenType.BYTE}
    pieces = proto.pieces
    return ([p.piece.encode("utf-8") for p in pieces], [p.score for p in pieces],
            [int(kinds.get(p.type, gguf.TokenType.NORMAL)) for p in pieces])


def _spm_vocab_from_model(model_dir: Path, vocab_size: int | None, reader: str) -> VocabData:
    """tokenizer.model read as llama.cpp's converter does: `vocab_size` slots (config's, else the model's),
    [PADn] placeholders (score -10000, unused) where nothing fills them, then the added tokens of
    added_tokens.json and tokenizer_config.json (and, for Phi-3, tokenizer.json) on top with score -1000."""
    pieces, piece_scores, piece_types = _spm_pieces(model_dir / "tokenizer.model")
    size = vocab_size or len(pieces)
    if reader == "phi3" and len(pieces) > size:
        raise TokenizerError(f"tokenizer.model has {len(pieces)} pieces but the config's vocab_size is {size}.")
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    n = min(size, len(pieces))
    tokens[:n], scores[:n], types[:n] = pieces[:n], piece_scores[:n], piece_types[:n]

    def put(tid: int, text: str, kind: gguf.TokenType) -> None:
        if tid < size:
            tokens[tid], scores[tid], types[tid] = text.encode("utf-8"), -1000.0, int(kind)

    for text, tid in _json(model_dir / "added_tokens.json", {}).items():
        put(int(tid), text, gguf.TokenType.USER_DEFINED)
    decoder = _json(model_dir / "tokenizer_config.json", {}).get("added_tokens_decoder", {})
    added = [(int(tid), d) for tid, d in decoder.items()]
    if reader == "phi3":
        added += [(int(d["id"]), d) for d in _json(model_dir / "tokenizer.json", {}).get("added_tokens", [])]
    for tid, d in added:
        text = d["content"]
        if reader == "phi3":
            put(tid, text, gguf.TokenType.CONTROL if d.get("special") else gguf.TokenType.USER_DEFINED)
        elif d.get("special") or looks_special(text):
            put(tid, text, gguf.TokenType.CONTROL)
        else:
            put(tid, text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED)
    return VocabData(model="llama", pre="default", tokens=tokens, scores=scores, types=types)


def _json(path: Path, default: Any) -> Any:
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerError(f"{path.name} is not valid JSON: {exc}") from None


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


class SpecialTokens(gguf.SpecialVocab):
    """gguf's special-token reader, with the rule llama.cpp's converter follows where the two differ: what the
    tokenizer's post-processor says about adding BOS/EOS wins over tokenizer_config.json, and a byte-level
    post-processor adds neither unless a template says otherwise (SmolLM, Qwen: add_bos_token = false)."""

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        found = super()._try_load_from_tokenizer_json(path)
        self._post_processor = post_processor_adds(_json(path / "tokenizer.json", {}),
                                                   _json(path / "tokenizer_config.json", {}))
        return found

    def _try_load_from_config_json(self, path: Path) -> bool:
        found = super()._try_load_from_config_json(path)
        self.add_special_token.update(getattr(self, "_post_processor", {}))
        return found


def _content(entry: Any) -> Any:
    return entry.get("content") if isinstance(entry, dict) else entry


def post_processor_adds(tok: dict[str, Any], config: dict[str, Any]) -> dict[str, bool]:
    """Which special tokens the tokenizer's post-processor adds, as llama.cpp's converter reads it."""
    node = tok.get("post_processor") or {}
    bos, cls = _content(config.get("bos_token")), _content(config.get("cls_token"))
    eos, sep = _content(config.get("eos_token")), _content(config.get("sep_token"))
    bos, eos = bos or cls, eos or sep
    adds: dict[str, bool] = {}
    for proc in node.get("processors", [node]) if node else []:
        kind = proc.get("type")
        if kind == "ByteLevel":
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif kind == "RobertaProcessing":
            adds.update(bos=True, eos=True, sep=True)
        elif kind == "TemplateProcessing":
            single = proc.get("single", [])
            if len(single) > 1:
                first = single[0].get("SpecialToken", {}).get("id")
                last = single[-1].get("SpecialToken", {}).get("id")
                # A leading special token counts as BOS when it is the BOS or CLS token, or when either is unset
                # (llama.cpp's converter then takes it for one); a trailing one always becomes the EOS.
                if first:
                    adds["bos"] = not config or first in (bos, cls) or not bos or not cls
                if last:
                    adds["eos"] = True
    return adds


def load_vocab(model_dir: Path, n_vocab: int, vocab_size: int | None = None, spm_reader: str = "generic",
               spm_json: bool = True) -> VocabData:
    """Read the tokenizer of an HF model folder into GGUF form as llama.cpp's converter does for the family.

    `vocab_size` is the config's (llama.cpp sizes the token list by it), `spm_reader` the family's
    SentencePiece reader ("generic" or "phi3"), `spm_json` whether a SentencePiece tokenizer may come from
    tokenizer.json alone (Llama-family only). The result is padded to `n_vocab` tokens.
    """
    check_tokenizer_files({p.name for p in model_dir.iterdir()})
    tok_path, spm_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tokenizer_class = _json(model_dir / "tokenizer_config.json", {}).get("tokenizer_class")
    if spm_reader == "phi3" and tokenizer_class != "GPT2Tokenizer" and not spm_path.is_file():
        raise TokenizerError("Phi-3 models need tokenizer.model (Phi-4 models a GPT2Tokenizer); this has neither.")
    if spm_path.is_file() and not (spm_reader == "phi3" and tokenizer_class == "GPT2Tokenizer"):
        vocab = _spm_vocab_from_model(model_dir, vocab_size, spm_reader)
    else:
        tok = effective_tokenizer_json(model_dir) if tok_path.is_file() else None
        if tok is None:
            raise TokenizerError("tokenizer.model alone is not enough for this tokenizer; tokenizer.json is needed.")
        if tok.get("model", {}).get("type") not in ("BPE", None):
            raise TokenizerError(
                f"Tokenizer type {tok['model']['type']} is not supported yet (only BPE and SentencePiece BPE)."
            )
        if _is_spm_json(tok):
            if not spm_json:
                raise TokenizerError("This SentencePiece tokenizer comes without tokenizer.model, which this "
                                     "model family needs for its GGUF.")
            vocab = _spm_vocab_from_json(tok)
        else:
            vocab = _bpe_vocab(tok, vocab_size)
    _pad(vocab, n_vocab)
    # gguf warns about template shapes it does not parse (pair templates); the parts we need are read fine.
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        # llama.cpp's byte-level reader checks special ids against no vocabulary size, SentencePiece's does.
        vocab.special = SpecialTokens(model_dir, load_merges=vocab.model == "gpt2",
                                      n_vocab=None if vocab.model == "gpt2" else len(vocab.tokens))
    finally:
        log.setLevel(level)
    return vocab
