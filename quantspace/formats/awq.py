"""AWQ: 4-bit weights with activation-aware scales, as the standard AWQ GEMM checkpoint (transformers, vLLM, TGI)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadOptionError, QuantizeError, UnsupportedArchitectureError
from ..awq.layers import is_quantized_name
from . import Context, Option, Output, TensorStats, Tick, pick_variants, run_directly

if TYPE_CHECKING:
    from ..evaluate import Metrics, Reference
    from ..report import Report

VARIANTS = {"W4G128": 128, "W4G64": 64, "W4G32": 32}   # 4-bit weights, group size


class AWQ:
    name = "awq"
    library_name = "transformers"
    suffix = "AWQ"
    title = "AWQ 4-bit"
    variants = tuple(VARIANTS)
    default_variants = ("W4G128",)
    options: tuple[Option, ...] = (
        Option("calib_samples", 128, "AWQ calibration samples", minimum=1, label="Calibration samples"),
        Option("calib_seqlen", 512, "tokens per AWQ calibration sample", minimum=16,
               label="Calibration tokens per sample"),
        Option("calib_dataset", "", "Hub dataset id[:file] for AWQ calibration (empty: the shipped text)",
               label="Calibration dataset (Hub id)"),
        Option("rtn_baseline", True, "also measure plain round-to-nearest int4 for comparison",
               label="Also measure plain round-to-nearest (RTN)"),
    )
    needs_gpu = False

    def __init__(self) -> None:
        self._sources: dict[str, Path] = {}   # variant → source folder, for the RTN baseline

    def unavailable(self) -> str | None:
        return None

    def check_architecture(self, config: dict[str, Any]) -> str | None:
        from ..awq.layers import spec_for

        spec_for(config)
        if config.get("use_bidirectional_attention"):   # the engine and the measurement run layers causally
            raise UnsupportedArchitectureError("AWQ supports causal language models; this one attends both ways.")
        return None

    def check_source(self, config: dict[str, Any], variants: list[str]) -> None:
        self.check_architecture(config)
        refuse_misfit(config_shapes(config), VARIANTS[variants[0]])

    def check_variants(self, variants: list[str]) -> list[str]:
        return pick_variants("AWQ", variants, VARIANTS, one_per_run=True)

    def work_bytes(self, stats: TensorStats, variants: list[str], sizes: dict[str, int]) -> int:
        """The engine's packed layers, about the checkpoint's size, until the checkpoint is written from them."""
        return sum(sizes.values())

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        sizes = {}
        for v in variants:
            g = VARIANTS[v]
            bits = stats.vector_params * 16.0
            for name, n in stats.matrix_params.items():
                # 4-bit weights, an fp16 scale and a 4-bit zero per group; the rest stays fp16.
                bits += n * (4 + 20 / g) if is_quantized_name(name) else n * 16
            sizes[v] = int(bits / 8)
        return sizes

    def produce(self, model_dir: Path, out_dir: Path, name: str, variants: list[str], ctx: Context) -> list[Output]:
        from ..awq import engine
        from ..calib import calibration_blocks
        from ..archs import load_config

        variant = variants[0]
        group = VARIANTS[variant]
        config = load_config(model_dir)
        check_shapes(model_dir, config, group)
        opts = ctx.options
        tick = ctx.stage("calibration")
        calib_source, samples = calibration_blocks(model_dir, int(opts["calib_samples"]), int(opts["calib_seqlen"]),
                                                   opts["calib_dataset"], ctx.token)
        tick(1, 1)
        settings = engine.Settings(group_size=group, n_samples=len(samples), seqlen=len(samples[0]),
                                   device=ctx.device)
        # The state folder lives as long as the job's scratch space (resumable across GPU windows within it).
        state = (ctx.workdir or Path(tempfile.gettempdir())) / f"quantspace-awq-state-{model_dir.name}-{variant}"
        engine.prepare(state, settings, samples)
        try:
            weights, extra = self._quantize(model_dir, out_dir, state, variant, int(config["num_hidden_layers"]), ctx)
        finally:
            if ctx.workdir is None:
                shutil.rmtree(state, ignore_errors=True)
        self._sources[variant] = model_dir
        details: dict[str, Any] = {"group_size": group, "calibration": calib_source,
                                   "calib_samples": len(samples), "calib_seqlen": settings.seqlen}
        return [Output(variant, tuple(weights), tuple(extra), details)]

    def _quantize(self, model_dir: Path, out_dir: Path, state: Path, variant: str, n_layers: int,
                  ctx: Context) -> tuple[list[Path], list[Path]]:
        from ..awq import engine
        from ..awq.checkpoint import write_checkpoint

        tick = ctx.stage(f"AWQ {variant}")
        if ctx.run_gpu is run_directly:
            engine.run(model_dir, state, progress=tick)
        else:   # bounded GPU windows: each call does what fits and leaves the rest in the state folder
            budget = ctx.window_budget_s
            while True:
                before = engine.next_layer(state)
                if ctx.run_gpu(engine.run, model_dir, state, budget):
                    break
                if engine.next_layer(state) <= before:
                    raise QuantizeError(f"AWQ made no progress at layer {before}; the GPU window is too short.")
                tick(engine.next_layer(state), n_layers)
        tick = ctx.stage(f"save {variant}")
        files = write_checkpoint(model_dir, state, out_dir)
        tick(1, 1)
        return files

    def runtime(self, ctx: Context) -> str:
        where = ctx.layer_walk()[2]
        return f"the AWQ checkpoint dequantized, (q − z)·s (transformers fp32, layer by layer, {where})"

    def evaluate(self, output: Output, ref: "Reference", ctx: Context, tick: Tick) -> "Metrics":
        """The checkpoint's exact weights, dequantized one decoder layer at a time where the source reference
        walks (Context.layer_walk); the round-to-nearest baseline likewise from the source."""
        from ..awq.checkpoint import CheckpointWeights, RoundedWeights
        from ..evaluate import evaluate_layers

        ckpt = output.path.parent
        device, windows, _ = ctx.layer_walk()
        metrics = evaluate_layers(ckpt, CheckpointWeights(ckpt), ref, progress=tick, device=device, windows=windows)
        source = self._sources.get(output.variant)
        if ctx.options.get("rtn_baseline", True) and source is not None:
            rounded = RoundedWeights(source, VARIANTS[output.variant])
            rtn = evaluate_layers(source, rounded, ref, device=device, windows=windows)
            output.details["rtn"] = rtn.to_dict()
        return metrics

    def tags(self, variants: list[str]) -> list[str]:
        return ["awq", "4-bit", "int4", "quantized", *[v.lower() for v in variants]]

    def usage(self, repo_id: str | None, report: "Report") -> str:
        where = repo_id or "path/to/this/folder"
        return "\n".join([
            "### vLLM",
            "```sh",
            f"vllm serve {where} --quantization awq",
            "```",
            "",
            "### Text Generation Inference",
            "```sh",
            "docker run --gpus all -p 8080:80 -v $PWD/data:/data ghcr.io/huggingface/text-generation-inference "
            f"--model-id {where} --quantize awq",
            "```",
            "",
            "### transformers (needs `gptqmodel` for the AWQ kernels; runs on CUDA and CPU)",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}", device_map="auto")',
            'inputs = tokenizer("Hello!", return_tensors="pt").to(model.device)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
            "```",
        ])

    def card_notes(self, report: "Report") -> str:
        lines = []
        for f in report.files:
            d = f.details or {}
            if "group_size" in d:
                lines.append(f"## AWQ\n\n4-bit weights with a zero point, group size {d['group_size']}, "
                             f"AWQ GEMM layout; lm_head and embeddings stay fp16. Scales and clipping were searched "
                             f"on {d['calib_samples']} samples × {d['calib_seqlen']} tokens of {d['calibration']}.")
            rtn, awq = d.get("rtn"), f.metrics
            if rtn and awq:
                lines += ["", "### AWQ vs RTN", "",
                          "Plain round-to-nearest int4 with the same group size (no activation-aware search), "
                          "measured the same way:", "",
                          "| Method | PPL | ΔPPL | KLD | Top-1 |", "|---|---:|---:|---:|---:|"]
                for label, m in (("AWQ", awq), ("RTN", rtn)):
                    lines.append(f"| {label} | {m['perplexity']:.4f} | {m['delta_ppl']:+.4f} | {m['kld_mean']:.5f} "
                                 f"| {100 * m['top1_agreement']:.2f}% |")
        return "\n".join(lines)


def config_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of a decoder layer's linears, from config.json alone (before any download). Fused q/k/v and
    gate/up fit whenever their parts do; experts are moe_intermediate_size wide where the config has it."""
    hidden = int(config["hidden_size"])
    inter = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    return {"q_proj": (heads * head_dim, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
            "o_proj": (hidden, heads * head_dim), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def check_shapes(model_dir: Path, config: dict[str, Any], group: int) -> None:
    """Every linear AWQ replaces must split into whole groups and int32 columns; else a clear refusal."""
    from ..awq.layers import quantized_tensor_names, spec_for
    from ..weights import all_entries

    names = set(quantized_tensor_names(spec_for(config), config))
    refuse_misfit({e.name: e.shape for e in all_entries(model_dir) if e.name in names}, group)


def refuse_misfit(shapes: dict[str, tuple[int, ...]], group: int) -> None:
    bad = [(n, s) for n, s in shapes.items() if s[1] % group or s[0] % 8]
    if bad:
        name, (out_f, in_f) = bad[0]
        fits = [v for v, g in VARIANTS.items() if all(s[1] % g == 0 and s[0] % 8 == 0 for s in shapes.values())]
        raise BadOptionError(
            f"{name} has {in_f} inputs and {out_f} outputs; AWQ group size {group} needs inputs in whole groups "
            f"and outputs in multiples of 8. Variants that fit this model: {', '.join(fits) or 'none'}."
        )
