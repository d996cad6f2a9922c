"""One big model through the whole pipeline on a small machine: peak memory, peak disk against the plan, time per stage.

    python bench/bench_large.py                      # a random Llama-3.1-8B-shaped model (bf16), built once
    python bench/bench_large.py --shape 2048x16      # a smaller one (hidden x layers) to try the script
    python bench/bench_large.py --json /tmp/large.json

The model is random (accuracy numbers mean nothing; memory, disk and time do) and written one decoder layer per
safetensors shard, so building it never holds more than one layer. Its vocabulary is SmolLM2's (49152 tokens: a
real BPE tokenizer llama.cpp knows) instead of Llama 3's 128256, so it has 7.5B parameters, not 8.0B.
The job is `python -m quantspace quantize MODEL --variants Q4_K_M --imatrix off --ctx 512 --chunks 4` in a child
process under GNU time (peak RSS), while this process samples the disk use of the job's folders every half
second (peak disk); the plan is the preflight's figure for the same settings (quantspace.diskplan). The imatrix
is off: 64 × 512 tokens through 7.5B parameters would take hours on two cores, and it is measured in
bench_imatrix.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CACHE = BENCH / ".cache"
sys.path.insert(0, str(REPO))

from bench.bench_convert import GNU_TIME, child_env, default_model, gnu_time_works, run_measured  # noqa: E402

GIB = 1 << 30
# Llama-3.1-8B: hidden 4096, 32 layers, FFN 14336, 32 heads of 128, 8 KV heads.
SHAPE = {"hidden": 4096, "layers": 32, "ffn": 14336, "heads": 32, "kv_heads": 8}


def build(hidden: int, layers: int) -> Path:
    """A random bf16 Llama of this shape, one shard per decoder layer (plus one for embeddings and head)."""
    import torch
    import transformers
    from safetensors.torch import save_file

    out = CACHE / f"synthetic-llama-{hidden}x{layers}-sharded"
    if (out / "config.json").is_file():
        return out
    scale = hidden / SHAPE["hidden"]
    ffn = int(SHAPE["ffn"] * scale) // 256 * 256
    heads = max(1, int(SHAPE["heads"] * scale))
    smollm2 = default_model()
    config = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads, vocab_size=49152, rms_norm_eps=1e-5,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        dtype="bfloat16")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = f"layer-{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append(name)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=CACHE))
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, (key, names) in enumerate(sorted(groups.items()), start=1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = shapes[n]
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            tensors[n] = t.to(torch.bfloat16)
            del t
            weight_map[n] = fname
            total += tensors[n].numel() * 2
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        print(f"built {fname} ({key})", flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, tmp / name)
    tmp.rename(out)
    return out


def folder_bytes(roots: list[Path]) -> int:
    total = 0
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(folder, f)).st_size
                except FileNotFoundError:
                    pass
    return total


def current_stage(log: Path) -> str | None:
    """The stage the job's progress bar shows last ("quantize Q4_K_M", "evaluate source"...)."""
    try:
        tail = log.read_bytes()[-400:].decode(errors="replace")
    except FileNotFoundError:
        return None
    found = re.findall(r"([a-zA-Z][\w ]*?)\s+\d+%\|", tail)
    return found[-1].strip() if found else None


def job_rss() -> float:
    """GiB resident in `python -m quantspace quantize` (the job), from /proc."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"quantspace\x00quantize" in cmd and b"time" not in cmd.split(b"\x00")[0]:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):   # the process ended meanwhile
            continue
    return total / GIB


def plan(model: Path, ctx: int, chunks: int) -> dict[str, int]:
    """The preflight's disk plan for the job's own settings, and its memory figure for the evaluation."""
    from quantspace.diskplan import plan as disk_plan
    from quantspace.estimate import estimate
    from quantspace.preflight import eval_memory, eval_scratch_bytes
    from quantspace.source import resolve

    info = resolve(str(model))
    est = estimate(str(model), "gguf", ["Q4_K_M"], info=info, options={"imatrix": "off"})
    disk = disk_plan(info, est.sizes, est.work_bytes, eval_scratch_bytes(info.config, ctx, chunks))
    memory, layered = eval_memory(info.config, est.parameters)
    return {"parameters": est.parameters, "q4_k_m_bytes": est.sizes["Q4_K_M"], "disk_peak_bytes": disk.peak,
            "eval_memory_bytes": memory, "layered": layered}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=f"{SHAPE['hidden']}x{SHAPE['layers']}", help="HIDDENxLAYERS (default 8B's)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    hidden, layers = (int(x) for x in args.shape.lower().split("x"))
    model = build(hidden, layers)
    planned = plan(model, args.ctx, args.chunks)
    work = Path(tempfile.mkdtemp(prefix="large-", dir=CACHE))
    out, tmp = work / "out", work / "tmp"
    tmp.mkdir()
    env = {**child_env(REPO), "TMPDIR": str(tmp)}
    peak = [0]
    rss_by_stage: dict[str, float] = {}   # GiB, the job's resident memory sampled twice a second, per stage
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], folder_bytes([work]))
            stage, rss = current_stage(work / "job.log"), job_rss()
            if stage and rss:
                rss_by_stage[stage] = max(rss_by_stage.get(stage, 0.0), rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cmd = [sys.executable, "-m", "quantspace", "quantize", str(model), "--variants", "Q4_K_M", "--imatrix", "off",
           "--ctx", str(args.ctx), "--chunks", str(args.chunks), "--out", str(out)]
    try:
        run = run_measured("quantspace", cmd, env, REPO, work / "job.log", "time" if gnu_time_works() else "helper")
    finally:
        done.set()
        sampler.join()
    report = json.loads((out / "quantspace.json").read_text())
    timings = report.get("timings") or {}
    evaluation = sum(s for k, s in timings.items() if k.startswith("evaluate"))
    result = {
        "model": str(model), "shape": args.shape, "machine": f"{os.cpu_count()} CPUs", **planned,
        "peak_rss_gib": run.max_rss_mib / 1024, "wall_s": run.wall_s, "disk_peak_measured_bytes": peak[0],
        "disk_plan_vs_measured": planned["disk_peak_bytes"] / max(1, peak[0]), "timings_s": timings,
        "evaluation_share": evaluation / max(1e-9, sum(timings.values())), "file_bytes": report["files"][0]["size_bytes"],
        "sampled_rss_gib_by_stage": rss_by_stage,
        "gnu_time": str(GNU_TIME) if gnu_time_works() else None,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
