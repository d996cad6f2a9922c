"""Benchmark: quantspace's importance matrix against llama.cpp's own `llama-imatrix`.

On one model, in one run:
  1. the HF model is converted to F16 GGUF once (quantspace's converter);
  2. the same calibration text goes to both tools: our calibration blocks (the shipped text, shuffled and cut as
     the pipeline does) are decoded into a text file; llama-imatrix tokenizes that file itself (-f, -c, --chunks),
     and ours gets the very same chunks, tokenized by llama.cpp's tokenizer and cut as llama-imatrix cuts them
     (BOS first where the vocabulary adds it). The agreement with the pipeline's own chunks is printed;
  3. both are timed the same way: each in a child process, wall time from spawn to exit and peak RSS, repeated
     N times in alternating order (llama-imatrix is built once from the llama-cpp-python sdist, into bench/.cache);
  4. IQ4_XS, Q4_K_M and IQ2_M are quantized with each imatrix (and IQ4_XS, Q4_K_M without one, for scale);
  5. every file is evaluated against the source with quantspace.evaluate (what the model card shows: PPL, KLD,
     top-1), and the two matrices are compared entry by entry.

    python bench/bench_imatrix.py                       # SmolLM2-135M-Instruct from tests/models.py, 64 x 512
    python bench/bench_imatrix.py --model PATH --chunks 32 --ctx 512 --repeats 3 --json out.json
    python bench/bench_imatrix.py --model bench/.cache/synthetic-llama-1024x24 --no-eval   # time only

See bench/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import difflib
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
SDIST = CACHE / "llama_cpp_python-0.3.36.tar.gz"
SRC_DIR = CACHE / "imatrix-src"          # vendor/llama.cpp unpacked from the sdist
BUILD_DIR = CACHE / "imatrix-build"
THREADS = 2

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

from bench_convert import (  # noqa: E402  (same measuring as the converter benchmark)
    Run, _machine, child_env, default_model, gnu_time_works, output_flags, run_measured,
)

QUANTS = ("IQ4_XS", "Q4_K_M", "IQ2_M")
PLAIN = ("IQ4_XS", "Q4_K_M")    # also quantized without an imatrix (IQ2_M needs one)


# ---------------------------------------------------------------- building llama-imatrix

def llama_imatrix() -> Path:
    """bench/.cache/imatrix-build/bin/llama-imatrix, built from the sdist's vendor/llama.cpp on first use."""
    binary = BUILD_DIR / "bin" / "llama-imatrix"
    if binary.is_file():
        return binary
    src = SRC_DIR / "vendor" / "llama.cpp"
    if not (src / "tools" / "imatrix" / "imatrix.cpp").is_file():
        if not SDIST.is_file():
            raise SystemExit(f"need {SDIST} (pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36)")
        print(f"unpacking vendor/llama.cpp from {SDIST.name}", flush=True)
        with tarfile.open(SDIST) as tar:
            top = tar.getmembers()[0].name.split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/vendor/llama.cpp/")]
            for m in members:
                m.name = m.name[len(top) + 1:]
            tar.extractall(SRC_DIR, members=members, filter="data")
    # Only what llama-imatrix needs: no tests, examples, server or openssl (no network here; this version's
    # CMakeLists deprecates LLAMA_CURL), static libraries.
    configure = ["cmake", "-S", str(src), "-B", str(BUILD_DIR), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                 "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DBUILD_SHARED_LIBS=OFF"]
    log = CACHE / "imatrix-build.log"
    print(f"building llama-imatrix (log {log}); minutes on 2 cores", flush=True)
    with open(log, "wb") as out:
        for cmd in (configure, ["cmake", "--build", str(BUILD_DIR), "--target", "llama-imatrix",
                                f"-j{os.cpu_count() or 2}"]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"building llama-imatrix failed; see {log}")
    return binary


# ---------------------------------------------------------------- the same tokens for both tools

def calibration_file(model: Path, f16: Path, n_chunks: int, ctx: int, work: Path) -> dict[str, Any]:
    """Write calib.txt (our calibration blocks, decoded) and chunks.json (the chunks llama-imatrix will cut from
    it: llama.cpp's tokenizer, BOS first per chunk where the vocabulary adds BOS). Returns the agreement figures."""
    import llama_cpp
    from transformers import AutoTokenizer

    from quantspace.calib import calibration_samples, load_calibration_text
    from quantspace.imatrix_compute import calibration_chunks

    calib = load_calibration_text(None)
    tokenizer = AutoTokenizer.from_pretrained(model)
    # One block more than needed: re-tokenizing the decoded text may give a few tokens fewer.
    blocks = calibration_samples(tokenizer, calib, n_chunks + 1, ctx)
    text = tokenizer.decode([t for b in blocks for t in b])
    (work / "calib.txt").write_text(text, encoding="utf-8")

    vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab.model)))
    stream = vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)   # common_tokenize(.., true, false)
    bos = vocab.token_bos()
    del vocab
    if len(stream) < n_chunks * ctx:
        raise SystemExit(f"calib.txt gives {len(stream)} tokens, fewer than {n_chunks} x {ctx}")
    chunks = [list(stream[i * ctx:(i + 1) * ctx]) for i in range(n_chunks)]
    if add_bos:
        for c in chunks:
            c[0] = bos
    (work / "chunks.json").write_text(json.dumps(chunks))

    # The pipeline tokenizes each document alone; the decoded text joins them, so a few tokens at document
    # boundaries merge differently and later ones shift: count tokens matched in order, not by position.
    _, pipeline = calibration_chunks(model, n_chunks, ctx)
    ours_stream, file_stream = [t for c in pipeline for t in c], [t for c in chunks for t in c]
    matcher = difflib.SequenceMatcher(None, ours_stream, file_stream, autojunk=False)
    same = sum(block.size for block in matcher.get_matching_blocks())
    return {"add_bos": add_bos, "file_tokens": len(stream), "chunks": len(chunks), "ctx": ctx,
            "text_chars": len(text), "source": calib.source,
            "matched_in_order_vs_pipeline": same / len(ours_stream),
            "first_tokens_pipeline": pipeline[0][:8], "first_tokens_llama_cpp": chunks[0][:8]}


# ---------------------------------------------------------------- the two tools

def child_ours(args: argparse.Namespace) -> None:
    """In the child process: compute our imatrix from chunks.json and write it; print the inner time."""
    import torch

    from quantspace.imatrix import write_imatrix
    from quantspace.imatrix_compute import Settings, compute

    torch.set_num_threads(THREADS)
    chunks = json.loads(Path(args.chunks_file).read_text())
    state = Path(args.state)
    shutil.rmtree(state, ignore_errors=True)   # a state folder left over would resume instead of compute
    settings = Settings(ctx=len(chunks[0]), n_chunks=len(chunks))
    start = time.perf_counter()
    if args.profile:
        prof = cProfile.Profile()
        im = prof.runcall(compute, Path(args.model), Path(args.f16), state, settings, chunks, "calib.txt")
        prof.dump_stats(args.profile)
    else:
        im = compute(Path(args.model), Path(args.f16), state, settings, chunks, "calib.txt")
    inner = time.perf_counter() - start
    write_imatrix(im, Path(args.out))
    shutil.rmtree(state, ignore_errors=True)
    print(json.dumps({"inner_s": inner}), flush=True)


def ours_cmd(model: Path, f16: Path, work: Path, out: Path, profile: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child_ours", "--model", str(model), "--f16", str(f16),
           "--chunks-file", str(work / "chunks.json"), "--state", str(work / "ours-state"), "--out", str(out)]
    return cmd + (["--profile", str(profile)] if profile else [])


def theirs_cmd(binary: Path, f16: Path, work: Path, out: Path, n_chunks: int, ctx: int) -> list[str]:
    # Defaults otherwise (batch 2048, so 4 chunks of 512 per decode; its perplexity printout stays on,
    # as a user would run it; logits are computed for every token either way).
    return [str(binary), "-m", str(f16), "-f", str(work / "calib.txt"), "-c", str(ctx), "--chunks", str(n_chunks),
            "-t", str(THREADS), "-o", str(out)]


def cpu_seconds(report: Path) -> float | None:
    """User + system CPU seconds from GNU time's report: on a shared VM far steadier than wall time."""
    if not report.is_file():
        return None
    found = dict(line.strip().split(": ", 1) for line in report.read_text().splitlines() if ": " in line)
    try:
        return float(found["User time (seconds)"]) + float(found["System time (seconds)"])
    except (KeyError, ValueError):
        return None   # the Python helper reports RSS only


def bench_tools(model: Path, f16: Path, binary: Path, work: Path, n_chunks: int, ctx: int, repeats: int,
                via: str) -> list[Run]:
    env = child_env(REPO)
    env["OMP_NUM_THREADS"] = str(THREADS)
    runs: list[Run] = []
    for i in range(repeats):
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        for tool in order:
            out = work / f"imatrix-{tool}.gguf"
            cmd = ours_cmd(model, f16, work, out) if tool == "ours" else \
                theirs_cmd(binary, f16, work, out, n_chunks, ctx)
            r = run_measured(tool, cmd, env, work, work / f"{tool}-{i}.log", via)
            r.cpu_s = cpu_seconds(work / f"{tool}-{i}.rusage")   # type: ignore[attr-defined]
            print(f"  {tool:6s} run {i + 1}: {r.wall_s:7.1f} s wall, {r.cpu_s or float('nan'):7.1f} s CPU"
                  + (f" ({r.inner_s:.1f} s in compute)" if r.inner_s else "")
                  + f", peak RSS {r.max_rss_mib:.0f} MiB", flush=True)
            runs.append(r)
    return runs


# ---------------------------------------------------------------- comparing the matrices

def compare_matrices(ours_path: Path, theirs_path: Path) -> dict[str, Any]:
    """Per-entry agreement of the mean squares (sums / counts) llama-quantize uses."""
    from quantspace.imatrix import read_imatrix

    a, b = read_imatrix(ours_path), read_imatrix(theirs_path)
    common = sorted(set(a.entries) & set(b.entries))
    rel, corr, logcorr, count_ratio = [], [], [], []
    worst: list[tuple[float, str]] = []
    for name in common:
        x, y = a.entries[name].values().astype(np.float64), b.entries[name].values().astype(np.float64)
        r = float(np.mean(np.abs(x - y) / np.maximum(np.abs(y), 1e-30)))
        rel.append(r)
        worst.append((r, name))
        corr.append(float(np.corrcoef(x, y)[0, 1]))
        logcorr.append(float(np.corrcoef(np.log(x + 1e-12), np.log(y + 1e-12))[0, 1]))
        count_ratio.append(float(a.entries[name].counts.sum() / max(b.entries[name].counts.sum(), 1)))
    return {"entries_ours": len(a.entries), "entries_theirs": len(b.entries), "common": len(common),
            "only_ours": sorted(set(a.entries) - set(b.entries)), "only_theirs": sorted(set(b.entries) - set(a.entries)),
            "mean_rel_diff": float(np.mean(rel)), "max_rel_diff": float(np.max(rel)),
            "pearson_min": float(np.min(corr)), "pearson_mean": float(np.mean(corr)),
            "log_pearson_min": float(np.min(logcorr)),
            "count_ratio_min": float(np.min(count_ratio)), "count_ratio_max": float(np.max(count_ratio)),
            "chunks": [a.chunk_count, b.chunk_count], "chunk_size": [a.chunk_size, b.chunk_size],
            "worst": [f"{n} {r:.3g}" for r, n in sorted(worst, reverse=True)[:5]]}


# ---------------------------------------------------------------- quantize and evaluate

def jittered(imatrix: Any, rel: float, seed: int) -> Any:
    """`imatrix` with every sum multiplied by (1 + e), e normal with mean |e| = rel: a matrix as far from it as
    ours is, but with no systematic difference."""
    from quantspace.imatrix import Entry, Imatrix

    rng = np.random.default_rng(seed)
    sigma = rel * np.sqrt(np.pi / 2)
    entries = {n: Entry((e.sums * (1 + sigma * rng.standard_normal(e.sums.shape))).astype(np.float32), e.counts)
               for n, e in imatrix.entries.items()}
    return Imatrix(entries, imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size)


def quantize_all(f16: Path, work: Path, noise: int = 0, rel: float = 0.0) -> dict[str, Path]:
    """Each type with ours and theirs (and none where llama.cpp allows); with `noise`, also PLAIN types with that
    many jittered copies of theirs (how much KLD moves from differences as small as ours and theirs have)."""
    from quantspace.formats.gguf import VARIANTS, llama_quantize
    from quantspace.imatrix import read_imatrix

    mats = {"ours": read_imatrix(work / "imatrix-ours.gguf"), "theirs": read_imatrix(work / "imatrix-theirs.gguf")}
    for seed in range(noise):
        mats[f"jitter{seed}"] = jittered(mats["theirs"], rel, seed)
    files: dict[str, Path] = {}
    for q in QUANTS:
        for who in (("ours", "theirs", "none") if q in PLAIN else ("ours", "theirs")):
            dst = work / f"{who}-{q}.gguf"
            llama_quantize(f16, dst, VARIANTS[q].ftype, threads=THREADS, imatrix=mats.get(who))
            files[f"{who}-{q}"] = dst
        for seed in range(noise if q in PLAIN else 0):
            dst = work / f"jitter{seed}-{q}.gguf"
            llama_quantize(f16, dst, VARIANTS[q].ftype, threads=THREADS, imatrix=mats[f"jitter{seed}"])
            files[f"jitter{seed}-{q}"] = dst
    return files


def evaluate_all(model: Path, files: dict[str, Path], work: Path, eval_chunks: int) -> dict[str, Any]:
    """The pipeline's own evaluation: source once (transformers fp32), every GGUF with llama.cpp on the same ids."""
    from quantspace.evaluate import EvalSettings, evaluate_gguf, evaluate_source, load_eval_text, tokenize_for_eval

    settings = EvalSettings(ctx=512, max_chunks=eval_chunks, threads=THREADS)
    text = load_eval_text()
    chunks = tokenize_for_eval(model, text, settings)
    out: dict[str, Any] = {}
    with evaluate_source(model, chunks, settings, work, text.source) as ref:
        out["source"] = ref.metrics.to_dict()
        for key, path in files.items():
            out[key] = evaluate_gguf(path, ref).to_dict()
            out[key]["bytes"] = path.stat().st_size
            m = out[key]
            print(f"  {key:14s} PPL {m['perplexity']:8.3f}  KLD {m['kld_mean']:.5f}  top-1 {m['top1_agreement']:.4f}",
                  flush=True)
    return out


# ---------------------------------------------------------------- report

def summarise(runs: list[Run], tool: str) -> dict[str, float]:
    mine = [r for r in runs if r.tool == tool]
    return {"wall_s_median": statistics.median(r.wall_s for r in mine),
            "wall_s_min": min(r.wall_s for r in mine), "wall_s_max": max(r.wall_s for r in mine),
            "max_rss_mib": max(r.max_rss_mib for r in mine),
            **({"cpu_s_median": statistics.median(r.cpu_s for r in mine)} if all(getattr(r, "cpu_s", None)
                                                                              for r in mine) else {}),
            **({"inner_s_median": statistics.median(r.inner_s for r in mine if r.inner_s)} if tool == "ours" else {})}


def print_table(time_ours: dict[str, float], time_theirs: dict[str, float], quality: dict[str, Any] | None,
                agree: dict[str, Any]) -> None:
    print("\n== time (median wall of a child process, spawn to exit) ==")
    t_o, t_t = time_ours["wall_s_median"], time_theirs["wall_s_median"]
    print(f"ours   {t_o:7.1f} s (compute() alone {time_ours['inner_s_median']:.1f} s), peak RSS "
          f"{time_ours['max_rss_mib']:.0f} MiB")
    print(f"theirs {t_t:7.1f} s, peak RSS {time_theirs['max_rss_mib']:.0f} MiB")
    if "cpu_s_median" in time_ours and "cpu_s_median" in time_theirs:
        c_o, c_t = time_ours["cpu_s_median"], time_theirs["cpu_s_median"]
        print(f"CPU time (user + sys): ours {c_o:.1f} s, theirs {c_t:.1f} s, ratio {c_o / c_t:.2f}x")
    print(f"ratio ours/theirs: time {t_o / t_t:.2f}x (target <= 1.0), RSS "
          f"{time_ours['max_rss_mib'] / time_theirs['max_rss_mib']:.2f}x")
    print("\n== matrices ==")
    print(f"entries ours/theirs/common {agree['entries_ours']}/{agree['entries_theirs']}/{agree['common']}; "
          f"mean rel. diff of the per-column means {agree['mean_rel_diff']:.2e} (max {agree['max_rel_diff']:.2e}); "
          f"Pearson min {agree['pearson_min']:.6f}; token counts ours/theirs {agree['count_ratio_min']:.3f}.."
          f"{agree['count_ratio_max']:.3f}")
    if quality is None:
        return
    print("\n== accuracy vs the source (quantspace.evaluate) ==")
    src = quality["source"]
    print(f"source PPL {src['perplexity']:.3f}")
    print(f"{'type':8s} {'KLD ours':>10s} {'KLD theirs':>10s} {'ratio':>6s} {'KLD none':>9s} "
          f"{'PPL ours':>9s} {'PPL theirs':>10s} {'top1 ours':>9s} {'top1 theirs':>11s}")
    for q in QUANTS:
        o, t, n = quality[f"ours-{q}"], quality[f"theirs-{q}"], quality.get(f"none-{q}")
        ratio = o["kld_mean"] / t["kld_mean"]
        flag = "" if ratio <= 1.02 else "  over 1.02x"
        none = f"{n['kld_mean']:.5f}" if n else "-"
        print(f"{q:8s} {o['kld_mean']:10.5f} {t['kld_mean']:10.5f} {ratio:6.3f} {none:>9s} "
              f"{o['perplexity']:9.3f} {t['perplexity']:10.3f} {o['top1_agreement']:9.4f} "
              f"{t['top1_agreement']:11.4f}{flag}")
    for q in PLAIN:
        jit = [v["kld_mean"] / quality[f"theirs-{q}"]["kld_mean"] for k, v in quality.items()
               if k.startswith("jitter") and k.endswith(f"-{q}")]
        if jit:
            print(f"{q}: theirs jittered by ours' mean rel. difference, KLD / theirs: "
                  + ", ".join(f"{r:.3f}" for r in jit))


def print_profile(path: Path, n: int = 25) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(n)
    stats.sort_stats("tottime").print_stats(n)


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model folder (default: SmolLM2-135M-Instruct via tests/models.py)")
    ap.add_argument("--chunks", type=int, default=64, help="calibration chunks (default 64, the pipeline's)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, the pipeline's)")
    ap.add_argument("--repeats", type=int, default=1, help="imatrix runs per tool, alternating (default 1)")
    ap.add_argument("--eval-chunks", type=int, default=16, help="evaluation chunks of 512 (default 16, the pipeline's)")
    ap.add_argument("--no-eval", action="store_true", help="time and compare the matrices only (e.g. random models)")
    ap.add_argument("--noise", type=int, default=0, metavar="N",
                    help="also quantize IQ4_XS and Q4_K_M with N copies of theirs jittered as far as ours differs")
    ap.add_argument("--profile", action="store_true", help="also run ours once under cProfile and print the top")
    output_flags(ap, "bench/.cache/imatrix-MODEL")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.chunks < 1:
        ap.error("--repeats and --chunks must be at least 1")
    return args


def parse_child(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench_imatrix.py _child_ours")
    for name in ("--model", "--f16", "--chunks-file", "--state", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--profile")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child_ours"]:
        return child_ours(parse_child(argv[1:]))
    args = parse_args(argv)
    binary = llama_imatrix()
    model = args.model.resolve() if args.model else default_model()
    work = (args.work_dir or CACHE / f"imatrix-{model.name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    via = args.rss_via if args.rss_via != "auto" else ("time" if gnu_time_works() else "helper")
    print(f"model {model}\nllama-imatrix {binary}\nwork dir {work}\npeak RSS via {via}", flush=True)
    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        print(f"note: 1-min load average is {load_start:.1f} on {os.cpu_count()} CPUs; timings will be noisy",
              flush=True)

    from quantspace.converter.streaming import convert

    f16 = work / "F16.gguf"
    if not f16.is_file():
        print("converting to F16", flush=True)
        convert(model, f16, out_type="F16")
    tokens = calibration_file(model, f16, args.chunks, args.ctx, work)
    print(f"calibration: {tokens['chunks']} x {tokens['ctx']} tokens (BOS first: {tokens['add_bos']}); "
          f"{tokens['matched_in_order_vs_pipeline']:.2%} of the pipeline's own chunk tokens matched in order", flush=True)

    print("computing the imatrix:", flush=True)
    runs = bench_tools(model, f16, binary, work, args.chunks, args.ctx, args.repeats, via)
    time_ours, time_theirs = summarise(runs, "ours"), summarise(runs, "theirs")
    agree = compare_matrices(work / "imatrix-ours.gguf", work / "imatrix-theirs.gguf")

    quality = None
    if not args.no_eval:
        print("quantizing:", flush=True)
        files = quantize_all(f16, work, args.noise, agree["mean_rel_diff"])
        print("evaluating:", flush=True)
        quality = evaluate_all(model, files, work, args.eval_chunks)
    print_table(time_ours, time_theirs, quality, agree)

    prof = None
    if args.profile:
        prof = work / "ours.pstats"
        env = child_env(REPO)
        subprocess.run(ours_cmd(model, f16, work, work / "imatrix-profiled.gguf", prof), env=env, check=True,
                       stdout=subprocess.DEVNULL)
        print_profile(prof)

    if args.json:
        payload = {"model": str(model), "chunks": args.chunks, "ctx": args.ctx, "repeats": args.repeats,
                   "threads": THREADS, "tokens": tokens, "time": {"ours": time_ours, "theirs": time_theirs,
                   "ratio": time_ours["wall_s_median"] / time_theirs["wall_s_median"]},
                   "runs": [{**asdict(r), "cpu_s": getattr(r, "cpu_s", None)} for r in runs], "matrices": agree, "quality": quality,
                   "profile": str(prof) if prof else None, "machine": _machine(),
                   "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]}}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nJSON written to {args.json}")
    if not args.keep:
        for p in work.glob("*.gguf"):
            if p != f16:
                p.unlink()


if __name__ == "__main__":
    main()
