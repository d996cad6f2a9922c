"""QuantSpace — the Gradio app (a Hugging Face Space, or `python app.py` locally)."""

from quantspace.ui import build_demo

demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch()
