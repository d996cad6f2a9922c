"""Typed errors. Each carries one line a user can act on; the CLI prints it without a traceback."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class QuantSpaceError(Exception):
    """Base class: the message is a complete, actionable sentence."""


class SourceNotFoundError(QuantSpaceError):
    """The model repo, revision or local folder does not exist or is not visible with this token."""


class GatedRepoError(QuantSpaceError):
    """The source repo is gated and this account has not been granted access."""


class UnsupportedArchitectureError(QuantSpaceError):
    """The model's architecture has no converter (yet)."""


class MissingFileError(QuantSpaceError):
    """A file the conversion needs (config, tokenizer, weights) is missing from the source."""


class TokenizerError(QuantSpaceError):
    """The tokenizer is missing or of a kind the converter cannot reproduce faithfully."""


class PickleRefusedError(QuantSpaceError):
    """The weights are pickled (.bin/.pt) and the user did not opt in to loading them."""


class CorruptWeightsError(QuantSpaceError):
    """A safetensors file cannot be read or does not match the config."""


class BadOptionError(QuantSpaceError):
    """An option value (variant name, method, path) is not valid."""


class EvalTextError(QuantSpaceError):
    """The evaluation text is missing, empty or too short."""


class HubUnreachableError(QuantSpaceError):
    """The Hub (or HF_ENDPOINT) could not be reached at all."""


class AuthError(QuantSpaceError):
    """No usable Hub token, or the token may not write to the target namespace."""


class PushError(QuantSpaceError):
    """The upload to the Hub failed; nothing was committed."""


class QuantizeError(QuantSpaceError):
    """llama.cpp (or another backend) failed to produce or load a file."""


class CalibrationError(QuantSpaceError):
    """The calibration data set is missing, unreadable or too short."""


class DiskFullError(QuantSpaceError):
    """A disk (the output folder's or the temp folder's) filled up, or a file-size limit was hit."""


class DownloadError(QuantSpaceError):
    """The source's files could not be downloaded intact, even after retrying."""
