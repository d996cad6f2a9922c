"""QuantSpace — the Gradio app (a Hugging Face Space, or `python app.py` locally)."""

# ZeroGPU patches torch when `spaces` is imported, so it must come before anything that imports torch.
import spaces  # noqa: F401  (no-op off a ZeroGPU Space)

import threading

from quantspace.converter.llama_cpp import prefetch
from quantspace.ui import build_demo, launch_kwargs

# llama.cpp's converter (for architectures ours does not have) is fetched once, in the background, on a fresh
# machine or Space; elsewhere it is already cached and this returns at once.
threading.Thread(target=prefetch, name="llama.cpp-converter", daemon=True).start()

demo = build_demo()
# One heavy job at a time per GPU (or CPU box); preflight and search have their own small limit.
demo.queue(default_concurrency_limit=1)

if __name__ == "__main__":
    demo.launch(**launch_kwargs())
