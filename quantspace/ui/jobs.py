"""One quantization job from the page or the API: its own temp folder, a worker thread, progress events,
cancel and cleanup. No Gradio here, so it is testable on its own.
"""

from __future__ import annotations

import contextvars
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import AuthError
from ..formats import run_directly
from ..preflight import gpu_seconds, on_space, on_zero_gpu
from .gpu import gpu_runner

# Gradio's mocked sign-in (off a Space) hands out this placeholder instead of a real token.
MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"
Step = tuple[str, int, int]   # (stage, done, total)


def jobs_root() -> Path:
    """Where per-job folders live; QUANTSPACE_JOBS_DIR moves them (tests check that they are gone)."""
    root = Path(os.environ.get("QUANTSPACE_JOBS_DIR") or Path(tempfile.gettempdir()) / "quantspace-jobs")
    root.mkdir(parents=True, exist_ok=True)
    return root


def user_token(hf_token: str | None, oauth_token: str | None) -> str | bool | None:
    """The token to act with: an explicit one (API callers), else the signed-in user's.

    Locally, Gradio's mocked sign-in stands for this machine's own login, so its token is used. On a Space a
    visitor who is not signed in acts anonymously (False): the Space's own token (HF_TOKEN, a saved login) must
    never read or write for them, and huggingface_hub would fall back to it for a token of None.
    """
    if hf_token and hf_token.strip():
        return hf_token.strip()
    if oauth_token == MOCK_OAUTH_TOKEN and not on_space():
        from ..hub import resolve_token

        return resolve_token(None)
    if oauth_token and oauth_token != MOCK_OAUTH_TOKEN:
        return oauth_token
    return False if on_space() else None


class Cancelled(Exception):
    """Raised inside the pipeline at its next progress step after the user pressed Cancel."""


@dataclass
class JobSpec:
    model: str
    method: str = "gguf"
    variants: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None         # push here when set
    private: bool = False
    evaluate: bool = True


@dataclass
class JobResult:
    report: dict[str, Any]
    card: str                         # the model card's markdown
    folder: Path                      # the output folder (inside the job folder, removed by close())


class Job:
    """Runs `pipeline.quantize` in a worker thread; `follow()` yields its progress, `close()` cleans up."""

    def __init__(self, spec: JobSpec, token: str | None):
        if spec.target and not token:
            raise AuthError("Sign in with Hugging Face (or pass hf_token) to push; without signing in you can "
                            "still quantize and download the files.")
        self.spec, self.token = spec, token
        self.dir = Path(tempfile.mkdtemp(prefix="job-", dir=jobs_root()))
        self.result: JobResult | None = None
        self.error: BaseException | None = None
        self._events: queue.Queue[Step | None] = queue.Queue()
        self._cancel = threading.Event()
        # The caller's context (Gradio's request) goes with the thread: ZeroGPU reads it to bill the visitor.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="quantspace-job", daemon=True)
        self._thread.start()

    def _tick(self, stage: str, done: int, total: int) -> None:
        # The upload is one commit: once it has started, stopping could not take it back, so it finishes.
        if self._cancel.is_set() and stage != "upload":
            raise Cancelled("Cancelled; nothing was pushed and the job's files were removed.")
        self._events.put((stage, done, total))

    def _run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as exc:  # handed to the caller's thread by follow()/wait()
            self.error = exc
        finally:
            self._events.put(None)

    def _work(self) -> JobResult:
        from ..pipeline import quantize

        spec, out = self.spec, self.dir / "out"
        params = self._parameters() if on_zero_gpu() else None
        window = gpu_seconds(params) if params is not None else None
        runner = gpu_runner(params) if params is not None else run_directly
        report = quantize(spec.model, method=spec.method, variants=spec.variants or None, out=out,
                          push=spec.target or None, private=spec.private, no_eval=not spec.evaluate,
                          token=self.token, progress=self._tick, options=spec.options, device="auto",
                          run_gpu=runner, gpu_window_s=window)
        return JobResult(report.to_dict(), (out / "README.md").read_text(encoding="utf-8"), out)

    def _parameters(self) -> int:
        """The model's size, for the ZeroGPU window (read from safetensors headers, no download)."""
        from ..estimate import estimate

        return estimate(self.spec.model, self.spec.method, self.spec.variants or None, token=self.token).parameters

    def follow(self, poll: float = 0.25) -> Iterator[Step | None]:
        """Progress events as they come; None every `poll` seconds while nothing happens (to refresh timers)."""
        while True:
            try:
                event = self._events.get(timeout=poll)
            except queue.Empty:
                yield None
                continue
            if event is None:
                return
            yield event

    def wait(self) -> JobResult:
        """The result once the job has finished, or its error raised here."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Cancel if still running, wait for the pipeline's own cleanup, then remove the job folder."""
        self._cancel.set()
        self._thread.join()
        shutil.rmtree(self.dir, ignore_errors=True)


class JobBoard:
    """The running job of each browser session or API client, so Cancel (or closing the tab) reaches it."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def add(self, key: str, job: Job) -> None:
        with self._lock:
            self._jobs[key] = job

    def remove(self, key: str, job: Job) -> None:
        with self._lock:
            if self._jobs.get(key) is job:
                del self._jobs[key]

    def cancel(self, key: str) -> bool:
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            return False
        job.cancel()
        return True
