"""The GPU formats through the whole pipeline on CUDA, the way a ZeroGPU Space runs them; JSON on stdout.

    python bench/gpu_pipeline.py OUT_DIR

Each GPU stage goes through a runner that pickles the function, its arguments and its result (what a ZeroGPU
window does), and AWQ gets windows short enough to split its work. Tiny random models, built here: nothing is
downloaded. Checks that the NF4 checkpoint reloads on the GPU with 4-bit layers and the AWQ one dequantizes.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

calls = {"n": 0}


def pickling_runner(fn: Callable[..., Any], *args: Any) -> Any:
    calls["n"] += 1
    fn, args = pickle.loads(pickle.dumps((fn, args)))
    return pickle.loads(pickle.dumps(fn(*args)))


def main() -> int:
    import torch

    from quantspace import quantize
    from tests.tiny import build_tiny

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-out")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    model = build_tiny(Path("/tmp/quantspace-gpu/tiny-llama"), "bpe", "llama")
    runs = {
        "nf4": dict(method="nf4", variants="NF4", options={"qlora_steps": 4, "qlora_seqlen": 64}),
        "fp4-fp16": dict(method="nf4", variants="FP4", options={"compute_dtype": "float16", "qlora_check": False}),
        "awq": dict(method="awq", variants="W4G128", options={"calib_samples": 16, "calib_seqlen": 128},
                    gpu_window_s=0.5),
    }
    for name, kwargs in runs.items():
        calls["n"] = 0
        t0 = time.perf_counter()
        try:
            report = quantize(str(model), out=f"/tmp/quantspace-gpu/out-{name}", device="cuda", ctx=128,
                              max_chunks=4, run_gpu=pickling_runner, **kwargs)
            f = report.files[0]
            result[name] = {"seconds": round(time.perf_counter() - t0, 1), "gpu_calls": calls["n"],
                            "device": report.device, "metrics": f.metrics, "source": report.source_metrics,
                            "details": f.details, "timings": report.timings}
            if kwargs["method"] == "nf4":
                result[name]["reload"] = _reload_4bit(Path(f"/tmp/quantspace-gpu/out-{name}"))
        except Exception:
            result[name] = {"error": traceback.format_exc()}
        print(name, json.dumps(result[name], default=str)[:2000], flush=True)
    (out / "gpu_pipeline.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if all("error" not in v for k, v in result.items() if isinstance(v, dict)) else 1


def _reload_4bit(folder: Path) -> dict[str, Any]:
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cuda"})
    q = model.model.layers[0].self_attn.q_proj
    return {"type": type(q).__name__, "device": str(q.weight.device), "quant_type": q.weight.quant_state.quant_type,
            "n_4bit": sum(isinstance(m, Linear4bit) for m in model.modules())}


if __name__ == "__main__":
    sys.exit(main())
