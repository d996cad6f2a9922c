"""GGUF: our converter writes F16 (or BF16) once; llama.cpp's quantizer makes every other variant from it."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import gguf

from ..converter import llama_cpp as lcpp_convert
from ..archs import load_config
from ..converter.streaming import HParams, convert
from ..errors import QuantizeError, UnsupportedArchitectureError
from ..fit import PRESETS, budget_label, check_budget
from ..imatrix import IMATRIX_NAME
from ..multimodal import is_multimodal, text_config, tower_of
from ..converter.tensor_types import (Overrides, choose_types, f16_tensors, file_bytes, generic_f16_tensors,
                                     generic_model_facts, kv_bytes, model_facts)
from . import Context, Option, Output, TensorStats, Tick, pick_variants, run_directly
from .gguf_fit import fit_file, fit_note, fit_size
from . import gguf_split
from .gguf_types import (TYPE_OPTIONS, apply_overrides, check_fit, check_imatrix, check_ternary, overrides_of,
                         recipe)

if TYPE_CHECKING:
    from ..evaluate import Metrics, Reference
    from ..imatrix import Imatrix
    from ..report import Report

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Variant:
    """A llama.cpp file type; which tensor gets which type is in converter.tensor_types (for size estimates)."""
    ftype: gguf.LlamaFileType
    summary: str = ""
    needs_imatrix: bool = False   # llama.cpp refuses to write it without an importance matrix
    ternary: bool = False         # weights stored as {-1, 0, +1} × scale: only BitNet-style models survive it


F = gguf.LlamaFileType
# Largest first. Sizes in the summaries are llama.cpp's own figures (quantize's help, Llama-3-8B) in bits/weight.
VARIANTS: dict[str, Variant] = {
    "F16": Variant(F.MOSTLY_F16, "16-bit, reference quality"),
    "BF16": Variant(F.MOSTLY_BF16, "bfloat16, lossless for bf16 models"),
    "Q8_0": Variant(F.MOSTLY_Q8_0, "8-bit, near lossless"),
    "Q6_K": Variant(F.MOSTLY_Q6_K, "6-bit, very close to F16"),
    "Q5_1": Variant(F.MOSTLY_Q5_1, "5-bit legacy with offsets; Q5_K_M is smaller and better"),
    "Q5_K_M": Variant(F.MOSTLY_Q5_K_M, "5-bit, high quality"),
    "Q5_K_S": Variant(F.MOSTLY_Q5_K_S, "5-bit, a little smaller"),
    "Q5_0": Variant(F.MOSTLY_Q5_0, "5-bit legacy"),
    "Q4_1": Variant(F.MOSTLY_Q4_1, "4-bit legacy with offsets"),
    "Q4_K_M": Variant(F.MOSTLY_Q4_K_M, "4-bit, the usual choice"),
    "IQ4_NL": Variant(F.MOSTLY_IQ4_NL, "4.5-bit non-linear, 32-weight blocks"),
    "Q4_K_S": Variant(F.MOSTLY_Q4_K_S, "4-bit, smaller"),
    "Q4_0": Variant(F.MOSTLY_Q4_0, "4-bit legacy, fast on ARM"),
    "IQ4_XS": Variant(F.MOSTLY_IQ4_XS, "4.25-bit non-linear, near Q4_K_S quality, smaller"),
    "Q3_K_L": Variant(F.MOSTLY_Q3_K_L, "3-bit with 5-bit attn_v/ffn_down, the best 3-bit K-quant"),
    "Q3_K_M": Variant(F.MOSTLY_Q3_K_M, "3-bit, noticeable loss"),
    "IQ3_M": Variant(F.MOSTLY_IQ3_M, "3.66-bit IQ mix"),
    "IQ3_S": Variant(F.MOSTLY_IQ3_S, "3.44-bit IQ"),
    "Q3_K_S": Variant(F.MOSTLY_Q3_K_S, "3-bit, smaller, more loss"),
    "IQ3_XS": Variant(F.MOSTLY_IQ3_XS, "3.3-bit IQ", needs_imatrix=True),
    "IQ3_XXS": Variant(F.MOSTLY_IQ3_XXS, "3.06-bit IQ", needs_imatrix=True),
    "Q2_K": Variant(F.MOSTLY_Q2_K, "2-bit, large loss"),
    "IQ2_M": Variant(F.MOSTLY_IQ2_M, "2.7-bit IQ", needs_imatrix=True),
    "IQ2_S": Variant(F.MOSTLY_IQ2_S, "2.5-bit IQ", needs_imatrix=True),
    "IQ2_XS": Variant(F.MOSTLY_IQ2_XS, "2.31-bit IQ", needs_imatrix=True),
    "IQ2_XXS": Variant(F.MOSTLY_IQ2_XXS, "2.06-bit IQ, very large loss", needs_imatrix=True),
    "TQ2_0": Variant(F.MOSTLY_TQ2_0, "2.06-bit ternary, for BitNet b1.58 models only", ternary=True),
    "IQ1_M": Variant(F.MOSTLY_IQ1_M, "1.75-bit IQ, extreme loss", needs_imatrix=True),
    "TQ1_0": Variant(F.MOSTLY_TQ1_0, "1.69-bit ternary, for BitNet b1.58 models only", ternary=True),
    "IQ1_S": Variant(F.MOSTLY_IQ1_S, "1.56-bit IQ, extreme loss", needs_imatrix=True),
}
DIRECT = {"F16": "F16", "BF16": "BF16"}   # variants our converter writes itself


@contextlib.contextmanager
def captured_stderr(log: Path) -> Iterator[None]:
    """Send C-level stderr (llama.cpp's chatter) to a file; the file's tail explains failures."""
    fd = os.dup(2)
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


@contextlib.contextmanager
def _llama_cpp_logs() -> Iterator[None]:
    """llama.cpp's own logger meanwhile, which writes to file descriptor 2: llama-cpp-python's callback prints
    to Python's sys.stderr (replaced under a test runner or a web server) and, after a Llama(verbose=False),
    drops the lines that say why quantizing failed."""
    import llama_cpp
    from llama_cpp import _logger

    llama_cpp.llama_log_set(llama_cpp.llama_log_callback(), ctypes.c_void_p(0))   # NULL: llama.cpp's default
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int | None = None,
                   imatrix: "Imatrix | None" = None, overrides: Overrides = Overrides()) -> None:
    """Run llama.cpp's quantizer; writes dst atomically or raises QuantizeError with llama.cpp's reason.
    With an importance matrix, llama.cpp weighs each column's rounding error by it (as llama-quantize
    --imatrix) and records where it came from in the file's quantize.imatrix.* keys; `overrides` are the
    user's per-tensor types."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads or os.cpu_count() or 1)
    keep_alive = [apply_overrides(params, overrides),   # llama.cpp reads these during the call
                  _with_imatrix(params, imatrix) if imatrix is not None else None]
    tmp = dst.with_name(dst.name + ".partial")
    # Next to the output (a job's staging folder), so a killed run leaves nothing elsewhere.
    log = dst.with_name(f".{dst.name}.quantize.log")
    log.unlink(missing_ok=True)
    try:
        with captured_stderr(log), _llama_cpp_logs():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            tail = _tail(log)
            for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                if os.strerror(code) in tail:   # the C library's own words for a full disk / size limit
                    raise OSError(code, os.strerror(code), str(tmp))
            if "requires an imatrix" in tail or "Missing importance matrix" in tail:
                raise QuantizeError(f"llama.cpp needs an importance matrix for {dst.name}: use --imatrix auto "
                                    f"(or a file) for this variant. ({tail})")
            raise QuantizeError(f"llama.cpp could not quantize {src.name} (code {rc}): {tail}")
        os.replace(tmp, dst)
    finally:
        del keep_alive
        tmp.unlink(missing_ok=True)
        log.unlink(missing_ok=True)


# quantize.imatrix.* keys, as llama-quantize (tools/quantize/quantize.cpp) writes them into the file
KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"


def _with_imatrix(params: Any, imatrix: "Imatrix") -> list[Any]:
    """Point params.imatrix at a null-terminated array of {name, values, size} and params.kv_overrides at
    the quantize.imatrix.* keys; returns the buffers, which must outlive the quantize call."""
    import llama_cpp

    names = {name: name.encode() for name in imatrix.entries}
    values = {name: e.values() for name, e in imatrix.entries.items()}
    data = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()   # zeroed: the last one ends the list
    for i, name in enumerate(names):
        data[i].name = names[name]
        data[i].data = values[name].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        data[i].size = values[name].size
    params.imatrix = data
    kvs: list[tuple[str, str | int]] = [(KV_IMATRIX_FILE, imatrix.path.name if imatrix.path else IMATRIX_NAME)]
    if imatrix.dataset:
        kvs.append((KV_IMATRIX_DATASET, imatrix.dataset))
    kvs.append((KV_IMATRIX_ENTRIES, len(imatrix.entries)))
    if imatrix.chunk_count > 0:
        kvs.append((KV_IMATRIX_CHUNKS, imatrix.chunk_count))
    overrides = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()   # an empty key ends the list
    for o, (key, value) in zip(overrides, kvs):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = value
        else:
            o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = value.encode()[:127]   # 128 bytes with the terminator, as llama-quantize cuts it
    params.kv_overrides = overrides
    return [names, values, data, overrides]


def uses_imatrix(options: dict[str, Any], variant: str) -> bool:
    """Whether llama.cpp gets an importance matrix for this variant (a few of its type rules depend on it): a
    variant under 8 bits, unless the imatrix option is "off" ("auto", the default, makes one; a path gives one)."""
    if variant in DIRECT or variant in WITHOUT_IMATRIX:
        return False
    return str(options.get("imatrix") or "auto").strip().lower() != "off"


def file_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], Any]]:
    """GGUF name → (shape with the row last, type), from a file's header."""
    from ..gguf_header import read_header

    return {name: (tuple(reversed(shape)), Q(t)) for name, (shape, t) in read_header(path).tensors.items()}


def type_counts(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds: the recipe llama.cpp really applied (from the header)."""
    counts: dict[str, int] = {}
    for _, t in file_tensors(path).values():
        counts[t.name] = counts.get(t.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


OURS, LLAMA_CPP = "QuantSpace's streaming converter", "llama.cpp's convert_hf_to_gguf.py"


def converter_for(config: dict[str, Any]) -> str:
    """Which converter makes the F16 file: ours for the families it has (measured faster, same bytes), else
    llama.cpp's own; UnsupportedArchitectureError when neither knows the model. A multimodal model is always
    llama.cpp's (it also writes the projector, mmproj)."""
    if is_multimodal(config):
        lcpp_convert.check(config)
        lcpp_convert.check_mmproj(config)
        return LLAMA_CPP
    try:
        HParams.from_config(config)   # the family, and any setting ours does not reproduce (e.g. YaRN RoPE)
    except UnsupportedArchitectureError:
        lcpp_convert.check(config)
        return LLAMA_CPP
    return OURS


class GGUF:
    name = "gguf"
    library_name = "gguf"
    suffix = "GGUF"
    title = "GGUF"
    variants = tuple(VARIANTS)
    summaries = {name: v.summary for name, v in VARIANTS.items()}   # the page shows them beside the names
    default_variants = ("Q4_K_M", "Q8_0")
    options: tuple[Option, ...] = (
        Option("imatrix", "auto", "importance matrix for the variants below 8 bits: auto (computed from the "
               "calibration text), off, or the path of an imatrix GGUF (ours or llama-imatrix's)",
               label="Importance matrix (auto, off or a file)"),
        Option("calib_dataset", "", "calibration text (GGUF imatrix, AWQ): a Hub dataset id[:file] or a local "
               ".txt/.jsonl/.json/.parquet file (empty: the shipped text)",
               label="Calibration dataset (Hub id or file)"),
        Option("imatrix_chunks", 64, "imatrix calibration chunks", minimum=1, label="Imatrix chunks",
               advanced=True),
        Option("imatrix_ctx", 512, "tokens per imatrix chunk", minimum=16, label="Imatrix tokens per chunk",
               advanced=True),
        Option("fit", "", "a size budget (4.5GB) or a device (8GB-GPU-8k, 16GB-Mac-8k: its memory less the KV "
               "cache for that context): also write <name>-FIT-<budget>.gguf, the per-tensor types (Q2_K to Q8_0) "
               "with the least imatrix-weighted error that fit it (empty: off)",
               label="Best file for a size or a device", suggestions=PRESETS),
        Option("split_max_size", gguf_split.DEFAULT, "files above this size (decimal: 48G, 2M; the Hub refuses "
               "files over 50 GB) are written as llama.cpp shards, <name>-<VARIANT>-00001-of-0000N.gguf, loaded "
               "from the first; 0 or off: never split", label="Split files above", advanced=True),
    ) + TYPE_OPTIONS
    needs_gpu = False

    _walkable: Path | None = None   # the source, when the files can be measured dequantized (_dequantized_walk)

    def unavailable(self) -> str | None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return "llama-cpp-python is not installed (pip install llama-cpp-python)."
        return None

    def check_architecture(self, config: dict[str, Any]) -> str:
        converter = converter_for(config)
        if is_multimodal(config):
            return (f"Converted by {converter}: the language model as GGUF, its vision/audio towers as one "
                    "mmproj file (F16) for llama-mtmd-cli / llama-server --mmproj.")
        return f"Converted by {converter}."

    def check_source(self, config: dict[str, Any], variants: list[str]) -> None:
        self.check_architecture(config)
        check_ternary(config, [v for v in variants if v in VARIANTS and VARIANTS[v].ternary])

    def check_variants(self, variants: list[str]) -> list[str]:
        return pick_variants("GGUF", variants, VARIANTS)

    def check_choice(self, options: dict[str, Any], variants: list[str]) -> None:
        """Before any download: per-tensor types that parse, and no variant that needs the imatrix turned off."""
        check_imatrix(options, [v for v in variants if v in VARIANTS and VARIANTS[v].needs_imatrix],
                      overrides_of(options))
        if str(options.get("fit") or "").strip():
            check_budget(str(options["fit"]))
        gguf_split.parse_size(options.get("split_max_size", gguf_split.DEFAULT))

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        """The file each variant will be: llama.cpp's own per-tensor type choice, header and padding included."""
        if converter_for(stats.config) == OURS:
            tensors, facts = f16_tensors(stats.shapes, stats.config), model_facts(stats.config)
        else:
            # A multimodal model's GGUF is its language model; the towers go to the mmproj file.
            config = text_config(stats.config)
            text = {n: s for n, s in stats.shapes.items() if tower_of(n) is None}
            tensors, facts = generic_f16_tensors(text, config), generic_model_facts(config)
        kv = kv_bytes(text_config(stats.config), stats.files)
        overrides = overrides_of(stats.options)
        check_fit(tensors, overrides)
        sizes = {}
        for v in variants:
            if v in DIRECT:   # our converter: 2-D weights in the 16-bit type, the rest F32
                wide = Q.BF16 if v == "BF16" else Q.F16
                types = {n: wide if t == Q.F16 else t for n, (_, t) in tensors.items()}
            else:
                types = choose_types(tensors, VARIANTS[v].ftype, facts, uses_imatrix(stats.options, v), overrides)
            sizes[v] = file_bytes(tensors, types, kv)
        fit = str(stats.options.get("fit") or "").strip()
        if fit:
            sizes[budget_label(fit)] = fit_size(fit, stats.config, tensors, facts, uses_imatrix(stats.options, "FIT"),
                                                overrides, kv)
        if is_multimodal(stats.config):
            sizes[MMPROJ] = mmproj_bytes(stats.shapes)
        return sizes

    def work_bytes(self, stats: TensorStats, variants: list[str], sizes: dict[str, int]) -> int:
        """The F16 file quantized from, unless it is an output, and one --fit candidate (at most an all-Q8_0
        file) until the fitted file replaces it."""
        fit = str(stats.options.get("fit") or "").strip()
        if not fit and all(v in DIRECT for v in variants):
            return 0
        plain = replace(stats, options={k: v for k, v in stats.options.items() if k != "fit"})
        f16 = 0 if "F16" in variants else self.estimate(plain, ["F16"])["F16"]
        candidate = self.estimate(plain, ["Q8_0"])["Q8_0"] - sizes.get(budget_label(fit), 0) if fit else 0
        return f16 + max(0, candidate)

    def produce(self, model_dir: Path, out_dir: Path, name: str, variants: list[str], ctx: Context) -> list[Output]:
        from ..reference import streamable

        stage = ctx.stage
        overrides = overrides_of(ctx.options)
        outputs: list[Output] = []
        quantized = [v for v in variants if v not in DIRECT]
        fit = str(ctx.options.get("fit") or "").strip()
        fit_variant = budget_label(fit) if fit else None
        needs_f16 = "F16" in variants or bool(quantized) or bool(fit)
        # Not a deliverable unless asked for: a hidden name, so an F16 file already in out_dir is left alone.
        base = out_dir / (f"{name}-F16.gguf" if "F16" in variants else f".{name}-F16.intermediate.gguf")
        config = load_config(model_dir)
        converter = converter_for(config)
        self._walkable = model_dir if converter == OURS and streamable(config) else None
        # a bad file or calibration text fails before any work
        plan = imatrix_plan(model_dir, variants + ([fit_variant] if fit_variant else []), ctx)
        wide = [("F16", base)] if needs_f16 else []
        if "BF16" in variants:
            wide.append(("BF16", out_dir / f"{name}-BF16.gguf"))
        for out_type, path in wide:
            if converter == OURS:
                convert(model_dir, path, out_type=out_type, name=name, progress=stage(f"convert {out_type}"))
            else:
                tick = stage(f"convert {out_type} (llama.cpp's converter)")
                tick(0, 1)
                lcpp_convert.convert(model_dir, path, out_type=out_type)
                tick(1, 1)
        if quantized and (overrides.output or overrides.embedding):
            check_fit(file_tensors(base), overrides)   # llama.cpp would write a misfit type as it is
        imatrix = plan.finish(model_dir, base, out_dir, ctx) if plan.users else None
        for v in variants:
            path = out_dir / f"{name}-{v}.gguf"
            details: dict[str, Any] = {"converter": converter}
            extra: tuple[Path, ...] = ()
            if v not in DIRECT:
                used = imatrix if v in plan.users else None
                tick = stage(f"quantize {v}")
                tick(0, 1)
                llama_quantize(base, path, VARIANTS[v].ftype, imatrix=used, overrides=overrides)
                tick(1, 1)
                details.update(plan.details(v))
                details.update(recipe(overrides))
                details["tensor_type_counts"] = type_counts(path)
                if used is not None and used.path is not None and not plan.published:
                    extra, plan.published = (used.path,), True   # pushed with the first variant that used it
            outputs.append(Output(v, (path,), extra, details=details))
        if fit_variant:
            used = imatrix if fit_variant in plan.users else None
            path = out_dir / f"{name}-{fit_variant}.gguf"
            details = {"converter": converter, **plan.details(fit_variant),
                       **fit_file(base, path, fit, config, used, overrides, ctx.workdir or out_dir, stage)}
            details["tensor_type_counts"] = type_counts(path)
            extra = ()
            if used is not None and used.path is not None and not plan.published:
                extra, plan.published = (used.path,), True
            outputs.append(Output(fit_variant, (path,), extra, details=details))
        if needs_f16 and "F16" not in variants:
            base.unlink(missing_ok=True)   # the intermediate is not a deliverable
        outputs = split_outputs(outputs, gguf_split.parse_size(ctx.options.get("split_max_size", gguf_split.DEFAULT)),
                                stage)
        if is_multimodal(config):
            outputs = with_mmproj(outputs, model_dir, out_dir / mmproj_name(name), stage)
        return outputs

    def evaluate(self, output: Output, ref: "Reference", ctx: Context, tick: Tick) -> "Metrics":
        """llama.cpp runs the file (on the GPU when its build has CUDA), unless a GPU is there that this
        llama.cpp cannot use: then the file's weights, dequantized, walk the layers in PyTorch on the GPU."""
        from ..evaluate import evaluate_gguf, evaluate_layers
        from ..gguf_weights import GGUFWeights

        if self._dequantized_walk(ctx):
            assert self._walkable is not None
            weights = GGUFWeights(output.weights, self._walkable)
            device, windows, _ = ctx.layer_walk()
            return evaluate_layers(self._walkable, weights, ref, progress=tick, device=device, windows=windows)
        return evaluate_gguf(output.path, ref, progress=tick, device=ctx.local_device)

    def runtime(self, ctx: Context) -> str:
        from ..evaluate import on_gpu

        if self._dequantized_walk(ctx):
            return (f"GGUF weights dequantized by gguf-py (PyTorch fp32, layer by layer, {ctx.layer_walk()[2]}; "
                    "llama.cpp here has no CUDA)")
        return f"GGUF (llama.cpp, {'CUDA' if on_gpu(ctx.local_device) else 'CPU'})"

    def _dequantized_walk(self, ctx: Context) -> bool:
        """Whether the files are measured by the dequantized walk: a GPU this llama.cpp cannot use, and files our
        converter made from a source the walk can run."""
        from ..evaluate import on_gpu

        device, _, _ = ctx.layer_walk()
        return device == "cuda" and not on_gpu(ctx.local_device) and self._walkable is not None

    def tags(self, variants: list[str]) -> list[str]:
        return ["gguf", "quantized", "llama.cpp", *[v.lower() for v in variants]]

    def usage(self, repo_id: str | None, report: "Report") -> str:
        pick = next((f for f in report.files if f.variant == "Q4_K_M"), report.files[0])
        shards = pick.files or [pick.filename]
        mmproj = mmproj_of(report)
        if mmproj:
            return mmproj_usage(repo_id, pick.filename, pick.variant, mmproj, shards)
        # llama.cpp loads a split file from its first shard and finds the others beside it.
        fetch = "; `-hf` fetches them all" if repo_id else ""
        split_note = ([f"{pick.variant} is split in {len(shards)} shards: keep them in one folder and give the "
                       f"first (llama.cpp opens the others itself{fetch}).", ""] if len(shards) > 1 else [])
        if repo_id is None:  # not pushed: point at the local files
            return "\n".join(split_note + [
                "```sh",
                f"llama-cli -m {pick.filename}",
                f"llama-server -m {pick.filename}",
                "```",
            ])
        extra = ", additional_files=[" + ", ".join(f'"{n}"' for n in shards[1:]) + "]" if len(shards) > 1 else ""
        return "\n".join(split_note + [
            "### llama.cpp",
            "```sh",
            f"llama-cli -hf {repo_id}:{pick.variant}",
            f"llama-server -hf {repo_id}:{pick.variant}",
            "```",
            "",
            "### Ollama",
            "```sh",
            f"ollama run hf.co/{repo_id}:{pick.variant}",
            "```",
            "",
            "### LM Studio",
            f"Search for `{repo_id}` in LM Studio's model browser and pick a file, or run `lms get {repo_id}`.",
            "",
            "### Python (llama-cpp-python)",
            "```python",
            "from llama_cpp import Llama",
            f'llm = Llama.from_pretrained(repo_id="{repo_id}", filename="{pick.filename}"{extra})',
            'print(llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}]))',
            "```",
        ])

    def card_notes(self, report: "Report") -> str:
        converter = (report.files[0].details or {}).get("converter") if report.files else None
        notes = f"The 16-bit GGUF these files were quantized from was made by {converter}." if converter else ""
        imatrix = imatrix_note(report)
        if imatrix:
            notes += ("\n\n" if notes else "") + imatrix
        fitted = fit_note(report)
        if fitted:
            notes += ("\n\n" if notes else "") + fitted
        mmproj = mmproj_of(report)
        if mmproj:
            notes += (f"\n\n`{mmproj}` is the vision/audio projector (llama.cpp's `--mmproj` conversion, F16, "
                      "the same for every file above): give it with `--mmproj` to use images. The accuracy "
                      "numbers are the language model's, on text only, against the source's language model.")
        return notes


def split_outputs(outputs: list[Output], limit: int, stage: Any) -> list[Output]:
    """Each file above `limit` as llama.cpp shards. Files are made whole and split last: the imatrix, --fit and
    the quantizer read the F16 as one file, and a quantized variant gets the fewest shards its own size needs
    (llama.cpp's keep_split would copy the F16's cut, e.g. a 42 GB Q4_K_M of a 140 GB F16 in 3 files)."""
    out = []
    for o in outputs:
        if limit and o.path.stat().st_size > limit:
            tick = stage(f"split {o.variant}")
            tick(0, 1)
            o = Output(o.variant, gguf_split.split_file(o.path, limit), o.extra, o.details)
            tick(1, 1)
        out.append(o)
    return out


# --- multimodal checkpoints: the towers go to one projector file ---

MMPROJ = "mmproj"   # its key among the estimated sizes and in an output's details


def mmproj_name(name: str) -> str:
    return f"mmproj-{name}-F16.gguf"


def mmproj_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The projector file llama.cpp writes: the towers' weights in F16, their norms, biases and (as for Gemma 3)
    patch and position embeddings in F32; a close estimate, as each model's converter class may force others."""
    tensors = {n: (tuple(s), Q.F16 if len(s) >= 2 and ".embeddings." not in n else Q.F32)
               for n, s in shapes.items() if tower_of(n)}
    return file_bytes(tensors, {n: t for n, (_, t) in tensors.items()}, HPARAM_MMPROJ_KV_BYTES)


HPARAM_MMPROJ_KV_BYTES = 2048   # clip.* settings, image mean/std, projector type


def with_mmproj(outputs: list[Output], model_dir: Path, path: Path, stage: Any) -> list[Output]:
    """Convert the projector once; it goes with the first variant's files (pushed with them, not counted in its
    size) and every variant's details name it."""
    tick = stage("convert mmproj (llama.cpp's converter)")
    tick(0, 1)
    lcpp_convert.convert_mmproj(model_dir, path)
    tick(1, 1)
    facts = {MMPROJ: path.name, "mmproj_bytes": path.stat().st_size}
    return [Output(o.variant, o.weights, o.extra + ((path,) if i == 0 else ()), {**o.details, **facts})
            for i, o in enumerate(outputs)]


def mmproj_of(report: "Report") -> str | None:
    return next(((f.details or {}).get(MMPROJ) for f in report.files if (f.details or {}).get(MMPROJ)), None)


def mmproj_usage(repo_id: str | None, filename: str, variant: str, mmproj: str,
                 shards: list[str] | None = None) -> str:
    lines = []
    if repo_id is not None:
        lines += [
            "### llama.cpp (text and images)",
            "`-hf` fetches the projector with the model:",
            "```sh",
            f"llama-mtmd-cli -hf {repo_id}:{variant} --image photo.jpg -p \"Describe this image.\"",
            f"llama-server -hf {repo_id}:{variant}",
            "```",
            "",
            f"Or with the files downloaded (`hf download {repo_id} {' '.join(shards or [filename])} {mmproj} "
            "--local-dir .`):",
        ]
    lines += [
        "```sh",
        f"llama-mtmd-cli -m {filename} --mmproj {mmproj} --image photo.jpg -p \"Describe this image.\"",
        f"llama-server -m {filename} --mmproj {mmproj}",
        "```",
        "",
        f"Without `--mmproj` the model runs as a text-only LLM (`llama-cli -m {filename}`).",
    ]
    return "\n".join(lines)


# --- the importance matrix of the variants below 8 bits ---

# llama.cpp's quantizer makes no use of an importance matrix for these (8 bits and wider).
WITHOUT_IMATRIX = ("F32", "F16", "BF16", "Q8_0")


@dataclass
class ImatrixPlan:
    """What a run does about the importance matrix, decided (and checked) before the conversion."""
    users: list[str]                          # variants quantized with it
    mode: str                                 # "auto", "off" or "file"
    given: "Imatrix | None" = None            # the user's file
    chunks: list[list[int]] | None = None     # auto: the calibration chunks
    source: str = ""                          # auto: where the text came from
    skipped: str = ""                         # auto without a layer table: why none was computed
    published: bool = False
    imatrix: "Imatrix | None" = None

    def finish(self, model_dir: Path, f16: Path, out_dir: Path, ctx: Context) -> "Imatrix":
        """The imatrix the users are quantized with, written to out_dir/imatrix.gguf."""
        from ..imatrix import check_fits, write_imatrix

        if self.given is not None:
            check_fits(self.given, f16)
            assert self.given.path is not None
            copy = out_dir / IMATRIX_NAME   # published under the usual name, byte for byte
            shutil.copyfile(self.given.path, copy.with_name(copy.name + ".partial"))
            os.replace(copy.with_name(copy.name + ".partial"), copy)
            self.given.path = copy
            self.imatrix = self.given
            return self.given
        self.imatrix = compute_imatrix(model_dir, f16, self, ctx)
        write_imatrix(self.imatrix, out_dir / IMATRIX_NAME)
        return self.imatrix

    def details(self, variant: str) -> dict[str, Any]:
        if variant in self.users and self.imatrix is not None:
            im = self.imatrix
            out = {"imatrix": im.path.name if im.path else IMATRIX_NAME, "imatrix_dataset": im.dataset,
                   "imatrix_chunks": im.chunk_count, "imatrix_ctx": im.chunk_size}
            if self.mode == "file":
                out["imatrix_given"] = True
            return out
        if self.skipped and variant not in WITHOUT_IMATRIX:
            return {"imatrix_skipped": self.skipped}
        return {}


def imatrix_plan(model_dir: Path, variants: list[str], ctx: Context) -> ImatrixPlan:
    from ..archs import load_config
    from ..awq.layers import spec_for
    from ..imatrix import read_imatrix
    from ..imatrix_compute import calibration_chunks

    mode = str(ctx.options.get("imatrix") or "auto").strip()
    below = [v for v in variants if uses_imatrix(ctx.options, v)]
    if not below:
        return ImatrixPlan([], "off")
    if mode.lower() != "auto":
        return ImatrixPlan(below, "file", given=read_imatrix(mode))
    try:
        spec_for(load_config(model_dir))
    except UnsupportedArchitectureError:
        return ImatrixPlan([], "auto", skipped="QuantSpace has no layer table for this architecture to compute "
                                               "an importance matrix with; give one with --imatrix FILE")
    n, length = int(ctx.options.get("imatrix_chunks", 64)), int(ctx.options.get("imatrix_ctx", 512))
    tick = ctx.stage("imatrix calibration")
    source, chunks = calibration_chunks(model_dir, n, length, ctx.options.get("calib_dataset") or None, ctx.token)
    tick(1, 1)
    return ImatrixPlan(below, "auto", chunks=chunks, source=source)


def compute_imatrix(model_dir: Path, f16: Path, plan: ImatrixPlan, ctx: Context) -> "Imatrix":
    """Our importance matrix: in this process (CPU or a local GPU), or in bounded GPU windows (ZeroGPU) that
    each do what fits and leave the rest in a state folder, like AWQ."""
    import tempfile

    from .. import imatrix_compute as ic
    from ..archs import load_config

    assert plan.chunks is not None
    settings = ic.Settings(ctx=len(plan.chunks[0]), n_chunks=len(plan.chunks), device=ctx.device)
    state = (ctx.workdir or Path(tempfile.gettempdir())) / f"quantspace-imatrix-state-{model_dir.name}"
    ic.prepare(state, settings, plan.chunks)
    total = ic.steps(load_config(model_dir))
    tick = ctx.stage("imatrix")
    try:
        if ctx.run_gpu is run_directly:
            ic.run(model_dir, state, progress=tick)
        else:
            budget = ctx.window_budget_s
            while True:
                before = ic.engine.next_layer(state)
                if ctx.run_gpu(ic.run, model_dir, state, budget):
                    break
                if ic.engine.next_layer(state) <= before:
                    raise QuantizeError(f"The imatrix made no progress at layer {before}; the GPU window is too "
                                        "short.")
                tick(ic.engine.next_layer(state), total)
        return ic.assemble(model_dir, state, f16, plan.source)
    finally:
        if ctx.workdir is None:
            shutil.rmtree(state, ignore_errors=True)


def imatrix_note(report: "Report") -> str:
    """Card lines: which files used which importance matrix, computed from what."""
    used = [f for f in report.files if (f.details or {}).get("imatrix")]
    skipped = next(((f.details or {}).get("imatrix_skipped") for f in report.files
                    if (f.details or {}).get("imatrix_skipped")), None)
    if not used:
        return f"No importance matrix was used: {skipped}." if skipped else ""
    d = used[0].details or {}
    names = ", ".join(f.variant for f in used)
    if d.get("imatrix_given"):
        how = f"the importance matrix `{d['imatrix']}` given to QuantSpace"
        if d.get("imatrix_dataset"):
            how += f" (computed on {d['imatrix_dataset']})"
    else:
        how = (f"an importance matrix QuantSpace computed in PyTorch on {d['imatrix_chunks']} chunks of "
               f"{d['imatrix_ctx']} tokens of {d['imatrix_dataset']}")
    return (f"{names} {'was' if len(used) == 1 else 'were'} quantized with {how}. It is in this repo as "
            f"`{d['imatrix']}` (llama.cpp's imatrix GGUF): reuse it with `llama-quantize --imatrix {d['imatrix']}`.")
