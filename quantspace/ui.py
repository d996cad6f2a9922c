"""The Gradio page: a thin shell over `quantspace.pipeline.quantize` (the full Space UI is a later step)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from .errors import QuantSpaceError
from .formats.gguf import VARIANTS


def run_quantize(model_id: str, variants: list[str], target: str, private: bool, evaluate: bool,
                 progress: gr.Progress = gr.Progress()) -> tuple[str, dict[str, Any]]:
    """Quantize `model_id` to GGUF; push to `target` when given. Returns (model card markdown, report)."""
    from .pipeline import quantize

    def on_progress(stage: str, done: int, total: int) -> None:
        progress(done / max(total, 1), desc=stage)

    with tempfile.TemporaryDirectory(prefix="quantspace-ui-") as out:
        try:
            report = quantize(model_id, variants=variants or None, out=out, push=target.strip() or None,
                              private=private, no_eval=not evaluate, progress=on_progress)
        except QuantSpaceError as exc:
            raise gr.Error(str(exc)) from None
        card = (Path(out) / "README.md").read_text(encoding="utf-8")
    return card, json.loads(report.to_json())


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="QuantSpace") as demo:
        gr.Markdown("# QuantSpace\nQuantize a Hugging Face model to GGUF and see what each file keeps, measured.")
        with gr.Row():
            model = gr.Textbox(label="Model (Hub repo id or local folder)",
                               placeholder="HuggingFaceTB/SmolLM2-135M-Instruct")
            target = gr.Textbox(label="Push to (optional, owner/name)", placeholder="you/SmolLM2-135M-Instruct-GGUF")
        variants = gr.CheckboxGroup(list(VARIANTS), value=["Q4_K_M", "Q8_0"], label="GGUF variants")
        with gr.Row():
            private = gr.Checkbox(label="Private repo")
            evaluate = gr.Checkbox(value=True, label="Measure accuracy (PPL, KLD, top-1)")
        go = gr.Button("Quantize", variant="primary")
        card = gr.Markdown()
        report = gr.JSON(label="quantspace.json")
        go.click(run_quantize, [model, variants, target, private, evaluate], [card, report], api_name="quantize")
    return demo
