"""GPU windows: on a ZeroGPU Space each GPU stage runs inside `spaces.GPU`; anywhere else it runs directly.

`app.py` imports `spaces` before anything imports torch (ZeroGPU patches torch at import). Off a Space the
decorator returns the function unchanged, so a local CUDA GPU (or the CPU) is used as the format decides.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any, Callable

from ..errors import QuantSpaceError
from ..formats import GpuRunner, run_directly
from ..preflight import gpu_seconds, on_zero_gpu

try:
    import spaces
except ImportError:  # not installed: no ZeroGPU, every stage runs directly
    spaces = None


def _window_seconds(seconds: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """The duration ZeroGPU is asked for; computed from the model size by `gpu_runner`."""
    return seconds


def _in_window(seconds: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Runs in the ZeroGPU worker process. Only gr.Error crosses back readably, so our errors become one."""
    import gradio as gr

    try:
        result = fn(*args, **kwargs)
    except QuantSpaceError as exc:
        raise gr.Error(str(exc)) from None
    except Exception as exc:  # anything else would reach the user as a bare class name
        raise gr.Error(f"The GPU stage failed: {type(exc).__name__}: {exc}") from None
    try:
        pickle.dumps(result)   # ZeroGPU would report a result that cannot leave the worker as "PicklingError"
    except Exception as exc:
        name = getattr(fn, "__name__", repr(fn))
        raise gr.Error(f"{name} ran, but its result cannot leave the ZeroGPU window: it must pickle ({exc}).") from None
    return result


# Decorated once at import (ZeroGPU registers GPU functions before launch); a no-op off ZeroGPU.
_gpu_call = spaces.GPU(duration=_window_seconds)(_in_window) if spaces is not None else _in_window


def _run_in_window(seconds: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    import gradio as gr

    try:
        return _gpu_call(seconds, fn, *args, **kwargs)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        # Raised here, in the app's process, only while sending the call to the ZeroGPU worker.
        name = getattr(fn, "__name__", repr(fn))
        raise gr.Error(f"{name} cannot run in a ZeroGPU window: its arguments must pickle ({exc}).") from None


def gpu_runner(parameters: int) -> GpuRunner:
    """The `run_gpu` to hand the pipeline: a ZeroGPU window sized for this model, or a direct call."""
    if not on_zero_gpu():
        return run_directly
    return functools.partial(_run_in_window, gpu_seconds(parameters))
