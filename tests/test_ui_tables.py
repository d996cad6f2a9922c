"""The page's tables in a real browser (Debian's chromium): numbers never wrap inside their cells, even in a
narrow window with long file names beside them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_ui_browser import CHROMIUM, browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")

REPORT = {"files": [
    {"filename": f"Meta-Llama-3.1-8B-Instruct-abliterated-v2-{v}.gguf", "variant": v, "size_bytes": size,
     "bits_per_weight": bpw, "metrics": {"delta_ppl": dppl, "kld_mean": kld, "top1_agreement": top1}}
    for v, size, bpw, dppl, kld, top1 in [("Q4_K_M", 4_920_000_000, 4.89, 1.0846, 0.03412, 0.9312),
                                          ("Q2_K", 3_180_000_000, 3.16, 12.3456, 0.41234, 0.7123)]]}

# Lines per cell: the distinct tops of the line boxes of the cell's text.
LINES_PER_CELL = """cells => cells.map(td => {
  const r = document.createRange(); r.selectNodeContents(td);
  return new Set([...r.getClientRects()].map(b => Math.round(b.top))).size; })"""


def test_numbers_never_wrap_in_the_result_table(browser):  # noqa: F811
    import gradio as gr

    from quantspace.ui.page import launch_kwargs
    from quantspace.ui.views import result_markdown

    with gr.Blocks() as demo:
        with gr.Row():
            with gr.Column(scale=5):
                gr.Markdown("left")
            with gr.Column(scale=6):
                gr.Markdown(result_markdown(REPORT), elem_id="result")
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                            **{k: v for k, v in launch_kwargs().items() if k in ("css", "theme")})
    try:
        page = browser.new_page(viewport={"width": 700, "height": 900})
        page.goto(url)
        table = page.locator("#result table")
        table.wait_for()
        numbers = table.locator("td:not(:first-child)")
        assert numbers.count() == 2 * 5
        lines = numbers.evaluate_all(LINES_PER_CELL)
        texts = numbers.all_inner_texts()
        assert "+1.0846" in texts and "0.03412" in texts
        assert lines == [1] * len(lines), list(zip(texts, lines))
        # The file names may wrap: the numbers took the room they need.
        names = table.locator("td:first-child").evaluate_all(LINES_PER_CELL)
        assert max(names) > 1
        page.close()
    finally:
        demo.close()
