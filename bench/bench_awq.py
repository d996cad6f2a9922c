"""AWQ end to end (search + pack + save) on a random-weight model of Llama-3.2-1B's shape; JSON on stdout.

    python bench/bench_awq.py                 # CUDA, 64 x 512 calibration, group 128 (the issue's setting)
    python bench/bench_awq.py --small         # a 2-layer model of hidden 256: a smoke check on the CPU
    python bench/bench_awq.py --engine llmcompressor --against ours.json   # theirs, in its own environment

llm-compressor pins an older transformers than ours, so each engine can run in its own environment, one after
the other on the same machine: `--engine ours --json ours.json`, then `--engine llmcompressor --against
ours.json` prints the ratio ours / theirs (same cached model, same seeded tokens).

Nothing is downloaded: the model is made here (cached under --cache) and calibration is random token ids,
the same for every engine. When llm-compressor is importable, its AWQ runs on the same model and tokens and
the ratio is printed; otherwise the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=8192,
                rms_norm_eps=1e-5, rope_theta=500000.0, head_dim=64)
SMALL = dict(LLAMA_1B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, head_dim=64)


def build_model(folder: Path, shape: dict[str, Any], device: str) -> Path:
    """A random bf16 Llama of the given shape as an HF folder (config + safetensors), made once."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = LlamaConfig(**shape, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, p in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if p.dim() == 1:   # norms
            t = 1 + 0.1 * torch.randn(p.shape, generator=gen, device=device)
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen, device=device)
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def run_ours(model_dir: Path, work: Path, tokens: list[list[int]], group: int, device: str) -> dict[str, Any]:
    from quantspace.awq import engine
    from quantspace.awq.checkpoint import write_checkpoint

    state, out = work / "state", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.prepare(state, engine.Settings(group_size=group, n_samples=len(tokens), seqlen=len(tokens[0]),
                                          device=device), tokens)
    assert engine.run(model_dir, state)
    t1 = time.perf_counter()
    weights, _ = write_checkpoint(model_dir, state, out)
    t2 = time.perf_counter()
    result = {"search_and_pack_s": round(t1 - t0, 2), "save_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
              "checkpoint_bytes": sum(p.stat().st_size for p in weights)}
    if device == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def quality(model_dir: Path, ckpt: Path, group: int, device: str, ids: torch.Tensor) -> dict[str, float]:
    """Mean KL divergence from the source's next-token distribution: our checkpoint vs plain RTN int4."""
    from transformers import AutoModelForCausalLM

    from quantspace.awq.checkpoint import dequantized_model, rtn_model

    def logprobs(model: Any) -> torch.Tensor:
        with torch.no_grad():
            out = model.to(device)(ids.to(device)).logits.float().log_softmax(-1)
        model.to("meta")
        return out

    ref = logprobs(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    result = {}
    for name, model in (("awq", lambda: dequantized_model(ckpt)), ("rtn", lambda: rtn_model(model_dir, group))):
        lp = logprobs(model())
        result[f"kld_{name}"] = round(float((ref.exp() * (ref - lp)).sum(-1).mean()), 6)
    return result


def _placeholder_tokenizer() -> Any:
    """oneshot insists on a processor even for pre-tokenized data; the random model has no tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                   unk_token="<unk>")


def run_llmcompressor(model_dir: Path, work: Path, tokens: list[list[int]], group: int) -> dict[str, Any]:
    """llm-compressor's AWQ (W4A16 asymmetric, same group size) on the same model and token ids."""
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.awq import AWQModifier
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        return {"skipped": f"llm-compressor is not importable here ({exc.name})"}
    shutil.rmtree(work, ignore_errors=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    data = Dataset.from_dict({"input_ids": tokens, "attention_mask": [[1] * len(t) for t in tokens]})
    if group != 128:
        return {"skipped": "llm-compressor's W4A16_ASYM preset uses group 128"}
    recipe = [AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"])]
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(tokens[0]),
            num_calibration_samples=len(tokens), processor=_placeholder_tokenizer())
    model.save_pretrained(work, save_compressed=True)
    torch.cuda.synchronize()
    return {"total_s": round(time.perf_counter() - t0, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description="AWQ end to end on a random Llama-3.2-1B-shaped model.")
    p.add_argument("--small", action="store_true", help="tiny 2-layer model (CPU smoke check)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--engine", default="both", choices=("both", "ours", "llmcompressor"))
    p.add_argument("--against", type=Path, default=None, help="JSON of an `--engine ours` run, for the ratio")
    args = p.parse_args()
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    shape = SMALL if args.small else LLAMA_1B
    t0 = time.perf_counter()
    model_dir = build_model(args.cache / ("llama-small-random" if args.small else "llama-3.2-1b-shape-random"),
                            shape, device)
    build_s = round(time.perf_counter() - t0, 2)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape["vocab_size"], (args.samples, args.seqlen), generator=gen).tolist()
    work = args.cache / "work"
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "model": "random Llama " + ("(small)" if args.small else "3.2-1B shape"), "build_model_s": build_s,
        "calibration": f"{args.samples} x {args.seqlen} random token ids", "group_size": args.group,
        "torch": torch.__version__,
    }
    if args.engine in ("both", "ours"):
        result["quantspace"] = run_ours(model_dir, work / "ours", tokens, args.group, device)
        held_out = torch.randint(0, shape["vocab_size"], (2, args.seqlen), generator=gen)
        result["quality"] = quality(model_dir, work / "ours" / "out", args.group, device, held_out)
    elif args.against is not None:
        result["quantspace"] = json.loads(args.against.read_text())["quantspace"]
    if device == "cuda" and args.engine in ("both", "llmcompressor"):
        other = run_llmcompressor(model_dir, work / "llmc", tokens, args.group)
        result["llmcompressor"] = other
        if "total_s" in other and "quantspace" in result:
            result["ratio_vs_llmcompressor"] = round(result["quantspace"]["total_s"] / other["total_s"], 3)
    shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
