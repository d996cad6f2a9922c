"""Resolve and validate a source model (Hub repo or local folder) before any weights are downloaded."""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError as HfGatedRepoError
from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                    RevisionNotFoundError)

try:  # huggingface_hub 2 talks through httpx2; connection failures are its transport errors
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import TransportError

from .errors import (AuthError, BadOptionError, DownloadError, GatedRepoError, HubUnreachableError,
                     MissingFileError, PickleRefusedError, QuantSpaceError, SourceNotFoundError, TokenizerError,
                     first_line)
from .converter.vocab import TOKENIZER_FILES, check_tokenizer_files
from .multimodal import PROCESSOR_FILES

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[\w.\-]{1,96})?$")
CONFIG_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class SourceInfo:
    spec: str                          # what the user typed
    repo_id: str | None                # Hub repo, or None for a local folder
    revision: str | None               # resolved commit sha (Hub only)
    local_dir: Path | None
    config: dict[str, Any]
    architecture: str
    files: dict[str, int | None] = field(default_factory=dict)   # name → size in bytes (None if unknown)
    license: str | None = None
    pickled: bool = False              # weights are .bin/.pt only (opted in)
    # name → (LFS sha256, git blob id) from the Hub's file metadata: what fetch checks each download against
    hashes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Short model name used for output files: the last part of the repo id or folder."""
        return self.repo_id.split("/")[-1] if self.repo_id else Path(self.local_dir or self.spec).name

    @property
    def cached(self) -> bool:
        """A Hub repo read from the local Hub cache because the Hub could not be asked."""
        return self.repo_id is not None and self.local_dir is not None

    @property
    def display(self) -> str:
        return self.repo_id or str(self.local_dir)

    @property
    def fetched_files(self) -> list[str]:
        """What `fetch` downloads: config, processor and tokenizer files, the weights, the card."""
        wanted = {*CONFIG_FILES, *PROCESSOR_FILES, *TOKENIZER_FILES, *self.weight_files, "README.md"}
        return sorted(f for f in self.files if f in wanted)

    @property
    def weight_files(self) -> list[str]:
        suffixes = PICKLE_SUFFIXES if self.pickled else (".safetensors",)
        return sorted(f for f in self.files if f.endswith(suffixes))

    @property
    def weight_bytes(self) -> int:
        return sum(self.files.get(f) or 0 for f in self.weight_files)


def parse_spec(spec: str) -> tuple[str, str | None] | Path:
    """A local folder, or (repo_id, revision) from 'owner/name[@revision]'.

    On a Space the text comes from a visitor: it names a Hub repo, never a folder on the Space's disk, unless the
    operator listed folders in QUANTSPACE_ALLOWED_FOLDERS (see `folder_allowed`).
    """
    spec = (spec or "").strip()
    if not spec:
        raise BadOptionError("No model given: pass a Hub repo id like 'HuggingFaceTB/SmolLM2-135M-Instruct' or a folder.")
    path = Path(spec).expanduser()
    if folder_allowed(path) and path.is_dir():
        return path.resolve()
    repo, _, revision = spec.partition("@")
    if spec.startswith((".", "/", "~")) or not REPO_ID.match(repo):
        if on_space():
            raise SourceNotFoundError(f"'{spec}' is not a Hub repo id; on this Space, name a model on the Hub "
                                      "(owner/name), not a folder.")
        raise SourceNotFoundError(f"'{spec}' is neither an existing folder nor a valid Hub repo id (owner/name).")
    return repo, (revision or None)


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def allowed_folders() -> list[Path]:
    """Folders a Space's operator lets visitors name (QUANTSPACE_ALLOWED_FOLDERS, separated by os.pathsep)."""
    value = os.environ.get("QUANTSPACE_ALLOWED_FOLDERS", "")
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]


# Files the running job put in place itself (a visitor's upload, copied into that job's folder), by the name the
# job passes as an option. Set only by code, around one job's work, in that job's own context: no text a visitor
# types can add to it, and another job (another thread, another context) never sees it.
_trusted_files: contextvars.ContextVar[dict[str, Path]] = contextvars.ContextVar("quantspace_trusted_files",
                                                                                 default={})


@contextmanager
def allowed_files(files: dict[str, Path]) -> Iterator[None]:
    """While inside, `trusted_file(name)` gives these files (calib.local_file reads them on a Space too). Only
    by that exact name: `folder_allowed` is unchanged, so neither their folder nor their path opens to anyone."""
    token = _trusted_files.set({**_trusted_files.get(), **{n: Path(p).resolve() for n, p in files.items()}})
    try:
        yield
    finally:
        _trusted_files.reset(token)


def trusted_file(name: str) -> Path | None:
    """The file the current job put in place under this name, if any."""
    return _trusted_files.get().get(name.strip())


def folder_allowed(path: Path) -> bool:
    """Any folder off a Space; on a Space only one inside an operator's allowed folder (links resolved first)."""
    if not on_space():
        return True
    real = path.resolve()
    return any(real == root or real.is_relative_to(root) for root in allowed_folders())


def _check_config(config: dict[str, Any]) -> str:
    """The model's architecture name, from config.json (whether a format can make it is that format's call)."""
    names = config.get("architectures") or []
    if names and isinstance(names[0], str):
        return names[0]
    if isinstance(config.get("model_type"), str):
        return f"model_type={config['model_type']}"
    raise MissingFileError("config.json names neither an architecture nor a model_type; it is not a "
                           "transformers model config.")


def _check_files(names: set[str], allow_pickle: bool) -> bool:
    """Validate the file list; returns True when the weights are pickled (and allowed)."""
    check_tokenizer_files(names)
    if any(n.endswith(".safetensors") for n in names):
        return False
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        if not allow_pickle:
            raise PickleRefusedError(
                "This model only has pickled weights (.bin/.pt), which can run code when loaded. "
                "Pass --allow-pickle if you trust the repo (they are loaded with torch's weights_only mode)."
            )
        return True
    raise MissingFileError("The model has no weights (.safetensors files); nothing to convert.")


def _license(card: Any) -> str | None:
    value = getattr(card, "license", None) if card is not None else None
    return value if isinstance(value, str) else None


def resolve(spec: str, token: str | None = None, allow_pickle: bool = False) -> SourceInfo:
    """Check that the source exists, is readable, has a supported architecture, tokenizer and weights."""
    parsed = parse_spec(spec)
    if isinstance(parsed, Path):
        return _resolve_local(spec, parsed, allow_pickle)
    return _resolve_hub(spec, parsed[0], parsed[1], token, allow_pickle)


def _resolve_local(spec: str, folder: Path, allow_pickle: bool) -> SourceInfo:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{folder} has no config.json; it is not a Hugging Face model folder.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MissingFileError(f"{config_path} is not valid JSON: {exc}") from None
    arch = _check_config(config)
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    pickled = _check_files(set(files), allow_pickle)
    license_ = card_license(folder / "README.md")
    return SourceInfo(spec, None, None, folder, config, arch, files, license_, pickled)


def card_license(readme: Path) -> str | None:
    """The license in a model card's metadata, if any."""
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return _license(ModelCard.load(readme).data)
    except Exception:  # a malformed card should not stop a conversion; the license is just unknown
        return None


HUB_ERRORS = (HfHubHTTPError, TransportError)


def unreachable(exc: Exception) -> HubUnreachableError:
    return HubUnreachableError(
        f"Could not reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}); check the network or HF_ENDPOINT."
    )


def gated_error(exc: HfGatedRepoError, repo_id: str) -> GatedRepoError:
    """A gated repo's files were refused: say where the licence is accepted, and to sign in when anonymous
    (the Hub answers 401 without a token, 403 to an account not granted access)."""
    page = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    if getattr(exc.response, "status_code", None) == 401:
        return GatedRepoError(f"{repo_id} is gated: sign in with Hugging Face (CLI: HF_TOKEN or `hf auth login`), "
                              f"accept its licence at {page} with that account, then try again.")
    return GatedRepoError(f"{repo_id} is gated and this account has not been granted access: accept its licence "
                          f"at {page} (some authors also review requests), then try again.")


def hub_error(exc: Exception, repo_id: str, revision: str | None) -> QuantSpaceError:
    """Our typed, one-line error for a Hub client error about the source repo."""
    if isinstance(exc, TransportError):
        return unreachable(exc)
    if isinstance(exc, HfGatedRepoError):
        return gated_error(exc, repo_id)
    if isinstance(exc, RevisionNotFoundError):
        return SourceNotFoundError(f"Revision '{revision}' does not exist in {repo_id}.")
    if isinstance(exc, RepositoryNotFoundError):
        return SourceNotFoundError(
            f"Model repo {repo_id} was not found (or it is private and this token cannot see it)."
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return AuthError(f"The Hub refused access to {repo_id} (HTTP {status}); check your token.")
    return SourceNotFoundError(f"Could not reach {repo_id} on the Hub: {str(exc).splitlines()[0]}")


def _resolve_hub(spec: str, repo_id: str, revision: str | None, token: str | None,
                 allow_pickle: bool) -> SourceInfo:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token)
        files = {s.rfilename: s.size for s in info.siblings or []}
        if "config.json" not in files:
            raise MissingFileError(f"{repo_id} has no config.json; it is not a transformers model repo.")
        config_path = hf_hub_download(repo_id, "config.json", revision=info.sha, token=token)
    except OfflineModeIsEnabled:
        return _resolve_cached(spec, repo_id, revision, allow_pickle, offline(repo_id))
    except TransportError as exc:
        return _resolve_cached(spec, repo_id, revision, allow_pickle, unreachable(exc))
    except HUB_ERRORS as exc:
        raise hub_error(exc, repo_id, revision) from None
    try:
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise MissingFileError(f"config.json of {repo_id} is not valid JSON: {exc}") from None
    arch = _check_config(config)
    pickled = _check_files(set(files), allow_pickle)
    hashes = {s.rfilename: (s.lfs.sha256 if s.lfs else None, s.blob_id) for s in info.siblings or []}
    return SourceInfo(spec, repo_id, info.sha, None, config, arch, files, _license(info.card_data), pickled, hashes)


def offline(repo_id: str) -> HubUnreachableError:
    return HubUnreachableError(f"{repo_id} is not in the local Hub cache and HF_HUB_OFFLINE=1 is set; unset it to "
                               "download the model, or give a local folder.")


def _resolve_cached(spec: str, repo_id: str, revision: str | None, allow_pickle: bool,
                    why: QuantSpaceError) -> SourceInfo:
    """The repo's copy in the local Hub cache, for when the Hub cannot be asked; raises `why` without one.

    Never on a Space: its cache holds what other visitors were allowed to read, and only the Hub can say whether
    this visitor may."""
    from huggingface_hub import try_to_load_from_cache

    if on_space():
        raise why
    config_path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(config_path, str):
        raise why
    folder = Path(config_path).parent     # snapshots/<commit sha>
    try:
        info = _resolve_local(spec, folder, allow_pickle)
        missing = sorted(set(_indexed_weights(folder)) - set(info.files))
        if missing:
            raise MissingFileError(f"{missing[0]} is missing")
    except (MissingFileError, TokenizerError) as exc:
        raise MissingFileError(f"Only part of {repo_id} is in the local Hub cache ({exc}); {why}") from None
    return replace(info, repo_id=repo_id, revision=folder.name)


def _indexed_weights(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        return sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError):
        raise MissingFileError(f"{index} is not a valid safetensors index.") from None


def fetch(info: SourceInfo, token: str | None = None, cache_dir: Path | None = None,
          tqdm_class: Callable[..., Any] | None = None) -> Path:
    """Download config, tokenizer and weights (nothing else), check every file against the Hub's size and
    hash, and return the local folder. A transient failure (HTTP 429/5xx, a dropped connection, a file cut
    short) is retried with backoff; a file that does not match is deleted from the cache, never used."""
    if info.local_dir is not None:
        return info.local_dir
    from . import retry

    assert info.repo_id is not None
    repo_id = info.repo_id
    patterns = [*CONFIG_FILES, *PROCESSOR_FILES, *TOKENIZER_FILES, *info.weight_files, "README.md"]
    drop_abandoned_downloads(repo_id, cache_dir)
    failure = ""
    for attempt in range(retry.ATTEMPTS):
        exc: Exception | None = None
        try:
            folder = Path(_snapshot(info, patterns, token, cache_dir, tqdm_class))
            bad = _check_download(folder, info)
            if not bad:
                return folder
            failure = f"{', '.join(bad)} did not match the Hub's size/sha256 (a download cut short?)"
        except HUB_ERRORS as err:
            if not retry.transient(err):
                raise hub_error(err, repo_id, info.revision) from None
            exc, failure = err, _short(err)
        except OSError as err:
            # huggingface_hub's "Consistency check failed" (fewer bytes than announced) has no errno; one
            # with an errno is a local disk problem, not the network: the pipeline names it.
            if err.errno is not None and not retry.transient(err):
                raise
            exc, failure = err, _short(err)
        if attempt + 1 < retry.ATTEMPTS:
            retry.sleep(retry.wait_before(attempt, exc))
    raise DownloadError(f"Downloading {repo_id} failed after {retry.ATTEMPTS} tries ({failure}); "
                        "try again later.")


def drop_abandoned_downloads(repo_id: str, cache_dir: Path | None = None) -> list[Path]:
    """Remove what a killed download left in the Hub cache: huggingface_hub downloads each file to a unique
    `<etag>.<random>.incomplete` name that no later download reuses, holding `<etag>.lock` meanwhile; a
    partial file whose lock is free belongs to no running download."""
    from filelock import FileLock, Timeout
    from huggingface_hub.file_download import repo_folder_name

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    removed = []
    for partial in (cache / folder / "blobs").glob("*.incomplete"):
        etag = partial.name.split(".")[0]
        lock_path = cache / ".locks" / folder / f"{etag}.lock"
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock_path), timeout=0):
                partial.unlink(missing_ok=True)
                removed.append(partial)
        except (Timeout, OSError):
            continue   # a download in progress (another job), or a lock we cannot take: leave it
    return removed


def _snapshot(info: SourceInfo, patterns: list[str], token: str | None, cache_dir: Path | None,
              tqdm_class: Callable[..., Any] | None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(info.repo_id, revision=info.revision, allow_patterns=patterns, token=token,
                             cache_dir=cache_dir, tqdm_class=tqdm_class)


def _short(exc: BaseException) -> str:
    from .retry import status_of

    status = status_of(exc)
    return f"HTTP {status}" if status else f"{type(exc).__name__}: {first_line(exc)[:160]}"


def _check_download(folder: Path, info: SourceInfo) -> list[str]:
    """Names of downloaded files whose size or hash differs from the Hub's (as `resolve` read them); those are
    removed from the cache (the link and the blob it points to), so the next try downloads them again."""
    bad = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in info.hashes:
            continue
        if not same_as_hub(path, info.files.get(name), *info.hashes[name]):
            bad.append(name)
            blob = path.resolve()
            path.unlink(missing_ok=True)
            if blob != path:
                blob.unlink(missing_ok=True)
    return bad


def same_as_hub(path: Path, size: int | None, sha256: str | None, blob_id: str | None) -> bool:
    """Whether a local file is the Hub's: its size, then its LFS sha256 or, for a plain git file, its blob id
    (sha1 of the git blob); with neither hash known, the size alone."""
    if size is not None and path.stat().st_size != size:
        return False
    if sha256:
        return _digest(path, hashlib.sha256()) == sha256
    if blob_id:
        return _digest(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size)) == blob_id
    return True


def _digest(path: Path, h: Any) -> str:
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
