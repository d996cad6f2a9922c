"""A small fake of the ZeroGPU device API, and a probe that runs app.py's GPU runner against it.

The `spaces` package (with SPACES_ZERO_GPU=true) talks over HTTP to SPACES_ZERO_DEVICE_API_URL:
POST /startup-report, POST /schedule (asks for a GPU window of `durationSeconds`, answers with an allow
token), POST /allow (the forked worker that will use the GPU), POST /release (window over, `fail` when the
task failed), GET /queue-size. `FakeZeroGPU` answers those and records every call.

`python -m tests.zerogpu_fake` (run by tests/test_ui_zerogpu.py in its own process group) imports app.py the way
a ZeroGPU Space does, runs functions through `quantspace.ui.gpu.gpu_runner` and prints what happened as JSON.
This machine's torch is a CPU build, so `cpu_shim()` stands in for the two CUDA calls ZeroGPU makes itself
(the CUDA version and init hook it reads at import, moving tensors to the GPU in the worker); everything else is the real package.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


class FakeZeroGPU:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self) -> None:
                url = urlsplit(self.path)
                params = dict(parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with fake._lock:
                    fake.calls.append((url.path, params))
                    n = len(fake.calls)
                if url.path == "/schedule":
                    self._answer(200, {"idle": True, "nvidiaIndex": 0, "nvidiaUUID": "GPU-fake-0",
                                       "allowToken": f"allow-{n}"})
                elif url.path in ("/startup-report", "/allow", "/release"):
                    self._answer(200, {})
                elif url.path == "/queue-size":
                    self._answer(200, 0)
                else:
                    self._answer(404, {"detail": "not part of the fake"})

            do_GET = do_POST = _route

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeZeroGPU":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [p for p, _ in self.calls]


def cpu_shim() -> None:
    """Let `spaces` run its ZeroGPU path on a CPU-only torch (call before importing app or spaces)."""
    import torch

    torch.version.cuda = "12.8"          # spaces reads it at import to pick its memory-stats table
    if not hasattr(torch._C, "_cuda_init"):
        torch._C._cuda_init = lambda: None   # spaces keeps a reference to restore it; CPU builds lack it
    torch.cuda._is_in_bad_fork = not_in_bad_fork   # spaces pickles it into a probe process (a lambda on CPU builds)
    import spaces.zero.torch as zero_torch

    zero_torch.init = lambda nvidia_uuid: None        # would run tensor.cuda() in the worker
    zero_torch.move = lambda callback=None: None      # would copy packed tensors to the GPU


def not_in_bad_fork() -> bool:
    return False


# Functions the probe runs in a GPU window: module-level, so they pickle into the ZeroGPU worker.
def worker_pid() -> int:
    return os.getpid()


def fail_readably() -> None:
    from quantspace.errors import QuantizeError

    raise QuantizeError("llama.cpp could not quantize the model (test).")


def main() -> None:
    cpu_shim()
    import app  # noqa: F401  (imports spaces first, builds the page on "ZeroGPU")

    import gradio as gr

    from quantspace.preflight import gpu_seconds
    from quantspace.ui.gpu import gpu_runner

    params = int(os.environ["PROBE_PARAMETERS"])
    run = gpu_runner(params)
    out: dict[str, Any] = {"parent_pid": os.getpid(), "expected_seconds": gpu_seconds(params)}
    out["worker_pid"] = run(worker_pid)
    cases = (("error", fail_readably, ()), ("unpicklable", worker_pid_of, (lambda: 0,)),
             ("unpicklable_result", unpicklable_result, ()))
    for name, fn, args in cases:
        try:
            run(fn, *args)
            out[name] = None
        except gr.Error as exc:
            out[name] = {"type": "gr.Error", "message": exc.message}
        except Exception as exc:  # reported, so the test shows what leaked instead of a readable error
            out[name] = {"type": type(exc).__name__, "message": str(exc)}
    print("PROBE " + json.dumps(out), flush=True)


def worker_pid_of(fn: Any) -> int:
    return os.getpid()


def unpicklable_result() -> Any:
    return lambda: os.getpid()


if __name__ == "__main__":
    main()
