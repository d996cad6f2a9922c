"""The Gradio Space: the page (page.py), its named API (api.py), jobs (jobs.py) and ZeroGPU windows (gpu.py)."""

from .page import build_demo, launch_kwargs

__all__ = ["build_demo", "launch_kwargs"]
