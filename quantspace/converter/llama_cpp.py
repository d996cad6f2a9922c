"""llama.cpp's own HF → GGUF converter, for the architectures our streaming converter does not have.

It is `convert_hf_to_gguf.py` (with its `conversion/` package and its own `gguf-py`) of exactly the llama.cpp
that llama-cpp-python was built from: taken from that release's source distribution, fetched with pip once and
cached (scripts/setup.sh does it ahead of time), and run as a subprocess so its gguf-py never meets ours.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

from ..archs import first_known, shown
from ..errors import QuantizeError, TokenizerError, UnsupportedArchitectureError

SCRIPT = "convert_hf_to_gguf.py"
# What the script needs beside itself, inside the source distribution's vendor/llama.cpp/.
PARTS = (SCRIPT, "conversion/", "gguf-py/")
REGISTER = re.compile(r"register\(([^)]*)\)")
NAME = re.compile(r"[\"']([A-Za-z0-9_]+)[\"']")
_FETCHING = threading.Lock()


def llama_cpp_version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def cache_dir() -> Path:
    """Where the converter of this llama-cpp-python version is kept (QUANTSPACE_LLAMA_CPP_DIR moves it)."""
    root = os.environ.get("QUANTSPACE_LLAMA_CPP_DIR") or Path.home() / ".cache" / "quantspace"
    return Path(root) / f"llama.cpp-convert-{llama_cpp_version()}"


def converter_dir(fetch: bool = True) -> Path:
    """The folder holding convert_hf_to_gguf.py; fetched (pip download of the sdist) and cached when missing."""
    folder = cache_dir()
    if (folder / SCRIPT).is_file():
        return folder
    if not fetch:
        raise QuantizeError(f"llama.cpp's converter is not in {folder}; run scripts/setup.sh (it fetches it).")
    with _FETCHING:   # the app's background fetch and a first preflight may both ask
        if (folder / SCRIPT).is_file():
            return folder
        _fetch(folder)
    return folder


def _fetch(folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="quantspace-sdist-") as tmp:
        spec = f"llama-cpp-python=={llama_cpp_version()}"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               "-d", tmp, spec], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            last = (done.stderr.strip().splitlines() or ["no source distribution"])[-1]
            raise QuantizeError(f"Could not fetch llama.cpp's converter ({spec} source): {last}")
        extract(sdists[0], folder)


def prefetch() -> None:
    """Fetch the converter now if it is missing (the app does this in the background at start); a failure is
    left for the first conversion that needs it to report."""
    try:
        converter_dir()
    except QuantizeError:
        pass


def extract(sdist: Path, dest: Path) -> Path:
    """Copy the converter's parts out of a llama-cpp-python source distribution into `dest` (atomically)."""
    staging = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    found = set()
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            part = next((p for p in PARTS if inner == p or (p.endswith("/") and inner.startswith(p))), None)
            if part is None or not member.isfile() or ".." in Path(inner).parts:
                continue
            found.add(part)
            target = staging / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, target.open("wb") as out:   # type: ignore[union-attr]
                shutil.copyfileobj(src, out)
    if found != set(PARTS):
        shutil.rmtree(staging, ignore_errors=True)
        raise QuantizeError(f"{sdist.name} has no llama.cpp converter ({', '.join(sorted(set(PARTS) - found))} "
                            "missing).")
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest


@lru_cache(maxsize=4)
def _architectures(folder: Path) -> frozenset[str]:
    names = set()
    for path in [folder / SCRIPT, *sorted((folder / "conversion").glob("*.py"))]:
        for args in REGISTER.findall(path.read_text(encoding="utf-8")):
            names.update(NAME.findall(args))
    return frozenset(names)


def architectures() -> frozenset[str]:
    """The HF architecture names llama.cpp's converter registers (read from its source, not imported)."""
    return _architectures(converter_dir())


def check(config: dict) -> str:
    """The architecture llama.cpp's converter takes for this config, or UnsupportedArchitectureError."""
    known = architectures()
    found = first_known(config, known)
    if found:
        return found
    raise UnsupportedArchitectureError(
        f"Architecture {shown(config)} is not supported for GGUF: neither our converter nor llama.cpp's "
        f"(llama.cpp of llama-cpp-python {llama_cpp_version()}, {len(known)} architectures) knows it; "
        "`python -m quantspace architectures` lists them.")


def convert(model_dir: Path, out_path: Path, out_type: str = "F16", mmproj: bool = False) -> Path:
    """Run llama.cpp's converter on `model_dir` into `out_path` (written under a temporary name first)."""
    folder = converter_dir()
    partial = out_path.with_name(out_path.name + ".partial")
    args = [sys.executable, str(Path(__file__).with_name("llama_cpp_run.py")), str(folder),
            str(Path(model_dir).absolute()), "--outfile", str(partial), "--outtype", out_type.lower()]
    if mmproj:
        args.append("--mmproj")
    # Its own gguf-py (next to the script) must win over the gguf package installed here; the script puts it
    # first on its path unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k not in ("NO_LOCAL_GGUF", "QUANTSPACE_BPE_PRE")}
    env["PYTHONPATH"] = str(folder / "gguf-py")
    pre = recognised_pre(Path(model_dir))
    if pre:
        env["QUANTSPACE_BPE_PRE"] = pre
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"llama.cpp's converter failed: {failure_line(done.stderr)}")
    os.replace(partial, out_path)
    return out_path


def recognised_pre(model_dir: Path) -> str | None:
    """The llama.cpp pre-tokenizer our probe recognises in a byte-level BPE tokenizer.json, if any: llama.cpp's
    converter knows tokenizers only by a hash of their token ids on its probe text, so a new or retrained
    vocabulary with a well-known pre-tokenizer would be refused without it."""
    from .vocab import detect_pre, effective_tokenizer_json, is_byte_level_bpe

    if not (model_dir / "tokenizer.json").is_file():
        return None
    try:
        tok = effective_tokenizer_json(model_dir)
        return detect_pre(tok) if tok is not None and is_byte_level_bpe(tok) else None
    except TokenizerError:
        return None   # left to llama.cpp's own identification, and its one-line failure


def failure_line(stderr: str) -> str:
    """The one line of a converter failure a user can act on: the exception it ended with."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b", line)]
    line = (errors or lines or ["no output"])[-1]
    if "pre-tokenizer" in line or "BPE pre-tokenizer" in stderr:
        return ("its BPE pre-tokenizer is not one llama.cpp recognises (neither by llama.cpp's table of known "
                f"vocabularies nor by how it splits QuantSpace's probe text): {line[:300]}")
    return line[:400]


# --- the vision/audio projector (mmproj) of multimodal checkpoints ---

# conversion/__init__.py maps each architecture with a projector to the module of its `--mmproj` class.
MMPROJ_MAP = re.compile(r"^MMPROJ_MODEL_MAP\b[^{]*\{(.*?)^\}", re.S | re.M)
KEY = re.compile(r"^\s*[\"']([A-Za-z0-9_]+)[\"']\s*:", re.M)


@lru_cache(maxsize=4)
def _mmproj_architectures(folder: Path) -> frozenset[str]:
    found = MMPROJ_MAP.search((folder / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    return frozenset(KEY.findall(found.group(1))) if found else frozenset()


def check_mmproj(config: dict) -> str:
    """The architecture llama.cpp's converter writes a projector (mmproj) for, or UnsupportedArchitectureError."""
    found = first_known(config, _mmproj_architectures(converter_dir()))
    if found:
        return found
    raise UnsupportedArchitectureError(
        f"{shown(config)} is multimodal, but llama.cpp's converter (llama-cpp-python {llama_cpp_version()}) cannot write "
        "its vision/audio projector (mmproj); its GGUF would not see images.")


def convert_mmproj(model_dir: Path, out_path: Path) -> Path:
    """The projector file llama-mtmd-cli / llama-server take with --mmproj, in F16 (converted once; the towers
    are small next to the language model and are not quantized per variant)."""
    return convert(model_dir, out_path, out_type="F16", mmproj=True)
