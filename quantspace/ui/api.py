"""The named API endpoints (/search_models, /preflight, /quantize, /cancel): typed inputs, JSON results.

The page's own handlers call the same functions; `gradio_client` users call these by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import QuantSpaceError
from ..preflight import on_space, preflight
from .jobs import Cancelled, Job, JobBoard, JobSpec, user_token

BOARD = JobBoard()
SEARCH_LIMIT = 8


def readable(exc: BaseException) -> gr.Error:
    """Our one-sentence errors as Gradio errors (shown as a toast on the page, raised by gradio_client)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, Cancelled):
        return gr.Error(str(exc), title="Cancelled")
    if isinstance(exc, QuantSpaceError):
        return gr.Error(str(exc))
    return gr.Error(f"Unexpected failure: {type(exc).__name__}: {exc}")


def token_for(hf_token: str, oauth_token: gr.OAuthToken | None) -> str | None:
    return user_token(hf_token, oauth_token.token if oauth_token is not None else None)


def search_models(query: str, hf_token: str = "", oauth_token: gr.OAuthToken | None = None) -> list[str]:
    """Hub model repos whose id contains `query` (text-generation models, most downloaded first)."""
    query = (query or "").strip()
    if len(query) < 2 or query.startswith(("/", ".", "~")) or (not on_space() and Path(query).expanduser().exists()):
        return []
    from huggingface_hub import HfApi

    try:
        models = HfApi().list_models(search=query, pipeline_tag="text-generation", sort="downloads",
                                     limit=SEARCH_LIMIT, token=token_for(hf_token, oauth_token))
        return [m.id for m in models]
    except Exception:  # suggestions are a convenience; the preflight reports real problems
        return []


def preflight_api(model: str, method: str = "gguf", variants: list[str] | None = None, target: str = "",
                  evaluate: bool = True, hf_token: str = "",
                  oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """Check a model before any download: architecture, access, parameter count, the size of every variant,
    disk needed and hardware fit. `problems` lists, one sentence each, what would make a run fail."""
    return preflight(model, method, variants or None, token=token_for(hf_token, oauth_token), evaluate=evaluate,
                     target=target.strip() or None).to_dict()


def quantize_api(model: str, method: str = "gguf", variants: list[str] | None = None,
                 options: dict[str, Any] | None = None, target: str = "", private: bool = False,
                 evaluate: bool = True, hf_token: str = "", oauth_token: gr.OAuthToken | None = None,
                 request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
    """Quantize `model` with `method`; push to `target` (owner/name) when given. Returns the report
    (quantspace.json) with `repo_url` when pushed. Progress is reported per stage."""
    progress = gr.Progress()
    spec = JobSpec(model=model, method=method, variants=list(variants or []), options=dict(options or {}),
                   target=target.strip() or None, private=private, evaluate=evaluate)
    job = start_job(spec, token_for(hf_token, oauth_token), request)
    try:
        for event in job.follow():
            if event is not None:
                stage, done, total = event
                progress((done, total), desc=stage)
        return job.wait().report
    except BaseException as exc:
        raise readable(exc) from None
    finally:
        finish_job(job, request)


def cancel_api(request: gr.Request = None) -> bool:  # type: ignore[assignment]
    """Cancel this session's running job (the same browser tab, or the same gradio_client Client).
    Returns whether there was one. The job stops at its next step and removes everything it wrote."""
    return BOARD.cancel(session_key(request))


def session_key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def start_job(spec: JobSpec, token: str | None, request: gr.Request | None) -> Job:
    try:
        job = Job(spec, token)
    except QuantSpaceError as exc:
        raise readable(exc) from None
    BOARD.add(session_key(request), job)
    return job


def finish_job(job: Job, request: gr.Request | None) -> None:
    BOARD.remove(session_key(request), job)
    job.close()
