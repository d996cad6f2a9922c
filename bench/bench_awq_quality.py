"""AWQ quality on a real model: our AWQ against llm-compressor's, scored by our evaluator; JSON on stdout.

    python bench/bench_awq_quality.py                                # ours + RTN (no llm-compressor)
    python bench/bench_awq_quality.py --llmc-python LLMC_VENV/bin/python   # also llm-compressor's AWQ

Run from the repository root with our venv (`.venv/bin/python`). llm-compressor pins another transformers, so it
runs in its own venv as a child process (`bench/llmc_awq.py`), on the very token blocks ours calibrates on
(written to JSON here), and writes a dense dequantized HF folder. Then one reference from the source model
scores every model on the same eval text, tokens and method: ours (`dequantized_model`), llm-compressor's, and
plain round-to-nearest int4 (`rtn_model`). Default model: the real SmolLM2-135M-Instruct test folder (its
linears are 576 wide, so group 64). Everything runs on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def calibration_blocks(model_dir: Path, samples: int, seqlen: int) -> list[list[int]]:
    """The blocks our AWQ format calibrates on (shipped text, shuffled, cut) — the same call as produce()."""
    from transformers import AutoTokenizer

    from quantspace.calib import calibration_samples, load_calibration_text

    return calibration_samples(AutoTokenizer.from_pretrained(model_dir), load_calibration_text(), samples, seqlen)


def run_ours(model_dir: Path, out: Path, group: int, samples: int, seqlen: int, ctx: int,
             chunks: int) -> dict[str, Any]:
    from quantspace.pipeline import quantize

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = quantize(str(model_dir), method="awq", variants=f"W4G{group}", out=out, device="cpu", ctx=ctx,
                      max_chunks=chunks, options={"calib_samples": samples, "calib_seqlen": seqlen,
                                                  "rtn_baseline": True})
    total = time.perf_counter() - t0
    file = report.files[0]
    return {"pipeline_s": round(total, 2), "timings_s": {k: round(v, 2) for k, v in report.timings.items()},
            "report_metrics": file.metrics, "report_rtn": (file.details or {}).get("rtn")}


def score(model_dir: Path, models: dict[str, Any], work: Path, ctx: int, chunks: int) -> dict[str, Any]:
    """One reference from the source; each entry of `models` is a loader of a float32 transformers model."""
    from quantspace.evaluate import (EvalSettings, evaluate_source, evaluate_torch_model, load_eval_text,
                                     tokenize_for_eval)

    settings = EvalSettings(ctx=ctx, max_chunks=chunks)
    text = load_eval_text()
    work.mkdir(parents=True, exist_ok=True)
    ref = evaluate_source(model_dir, tokenize_for_eval(model_dir, text, settings), settings, work, text.source)
    result: dict[str, Any] = {"eval": {"text": text.source, "ctx": ctx, "chunks": len(ref.tokens),
                                       "scored_tokens": ref.metrics.n_tokens},
                              "source": ref.metrics.to_dict()}
    try:
        for name, load in models.items():
            result[name] = evaluate_torch_model(load(), ref).to_dict()
    finally:
        ref.close()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description="Perplexity of our AWQ vs llm-compressor's AWQ on a real model (CPU).")
    p.add_argument("--model", type=Path, default=ROOT / "tests" / ".cache" / "smollm2-135m-instruct-v2")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8, help="eval chunks (the pipeline's default is 16)")
    p.add_argument("--llmc-python", type=Path, default=None, help="python of a venv with llmcompressor")
    p.add_argument("--llmc-reuse", action="store_true",
                   help="score the folder an earlier llm-compressor run left in --work instead of running it")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".cache" / "awq-quality")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    from quantspace.awq.checkpoint import dequantized_model, rtn_model

    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"model": str(args.model), "group_size": args.group, "device": "cpu",
                              "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "calibration": f"{args.samples} x {args.seqlen} tokens of the shipped text"}
    tokens_json = args.work / "calib_tokens.json"
    tokens = calibration_blocks(args.model, args.samples, args.seqlen)
    tokens_json.write_text(json.dumps(tokens))
    ours_dir = args.work / "ours"
    result["ours"] = run_ours(args.model, ours_dir, args.group, args.samples, args.seqlen, args.ctx, args.chunks)
    models = {"ours": lambda: dequantized_model(ours_dir), "rtn": lambda: rtn_model(args.model, args.group)}
    llmc_dir = args.work / "llmc-dequantized"
    if args.llmc_python and not args.llmc_reuse:
        cmd = [str(args.llmc_python), str(ROOT / "bench" / "llmc_awq.py"), "--model", str(args.model),
               "--tokens", str(tokens_json), "--out", str(llmc_dir), "--group", str(args.group)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)   # its log goes to stderr
    if args.llmc_python or args.llmc_reuse:
        result["llmcompressor"] = json.loads((llmc_dir / "llmc_awq.json").read_text())

        def load_llmc() -> Any:
            from transformers import AutoModelForCausalLM
            return AutoModelForCausalLM.from_pretrained(llmc_dir, dtype=torch.float32)
        models["llmcompressor"] = load_llmc
    result["metrics"] = score(args.model, models, args.work / "eval", args.ctx, args.chunks)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
