"""Child process for bench_convert.py: runs one quantspace step and prints its inner time as JSON.

It runs in its own process so that peak RSS is measured exactly as for llama.cpp's converter
(the parent reads it from wait4), and so that one step's memory never inflates the next one's.

    python bench/run_ours.py convert  MODEL_DIR OUT.gguf [--profile OUT.pstats]
    python bench/run_ours.py quantize SRC_F16.gguf DST.gguf [--variant Q4_K_M]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/; the package lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _note_rss_after_vocab(marks: dict[str, float]) -> None:
    """Record the peak RSS once the tokenizer is loaded (imports included), before any tensor is read.

    convert() looks load_vocab up in its module at call time, so wrapping the module attribute is enough.
    """
    import quantspace.converter.streaming as qc

    original = qc.load_vocab

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        vocab = original(*args, **kwargs)
        marks["rss_after_vocab_mib"] = _peak_rss_mib()
        return vocab

    qc.load_vocab = wrapped


def run_convert(model_dir: Path, out: Path, profile: Path | None, marks: dict[str, float]) -> float:
    from quantspace.converter.streaming import convert

    _note_rss_after_vocab(marks)
    start = time.perf_counter()
    if profile is None:
        convert(model_dir, out, out_type="F16")
    else:
        prof = cProfile.Profile()
        prof.runcall(convert, model_dir, out, out_type="F16")
        prof.dump_stats(str(profile))
    return time.perf_counter() - start


def run_quantize(src: Path, dst: Path, variant: str) -> float:
    from quantspace.formats.gguf import VARIANTS, llama_quantize

    start = time.perf_counter()
    llama_quantize(src, dst, VARIANTS[variant].ftype)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("convert", "quantize"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--profile", type=Path, help="convert only: write cProfile stats here")
    ap.add_argument("--variant", default="Q4_K_M", help="quantize only: a quantspace GGUF variant")
    args = ap.parse_args()
    marks: dict[str, float] = {}
    if args.step == "convert":
        inner = run_convert(args.src, args.dst, args.profile, marks)
    else:
        inner = run_quantize(args.src, args.dst, args.variant)
    # Last stdout line, parsed by the parent.
    print(json.dumps({"inner_s": inner, **marks}))


if __name__ == "__main__":
    main()
