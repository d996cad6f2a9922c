"""The named API endpoints: typed inputs, JSON results. The page's own handlers call the same functions;
`gradio_client` users call these by name.

/search_models, /preflight: look before any work. /quantize: start a job and wait for its report.
/start_job, /job_status, /cancel_job: the same job by id, for clients that must survive a dropped connection
(a job runs to its end whether or not anyone watches). /cancel: the jobs this client started.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from ..errors import CalibrationError, QuantSpaceError
from ..preflight import on_space, preflight
from .jobs import REGISTRY, Cancelled, Job, JobSpec, Snapshot, account_of, user_token

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


def caller(hf_token: str, oauth_token: gr.OAuthToken | None) -> str | None:
    """The Hub account of whoever calls (None when they pass no token): the owner of the jobs they start."""
    try:
        return account_of(token_for(hf_token, oauth_token))
    except QuantSpaceError as exc:
        raise readable(exc) from None


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
                  evaluate: bool = True, hf_token: str = "", options: dict[str, Any] | None = None,
                  oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """Check a model before any download: architecture, access, parameter count, the size of every variant
    (with the method's `options`, e.g. GGUF's per-tensor types), disk needed and hardware fit. `problems` lists,
    one sentence each, what would make a run fail."""
    return preflight(model, method, variants or None, token=token_for(hf_token, oauth_token), evaluate=evaluate,
                     target=target.strip() or None, options=options).to_dict()


def where_choices(token: str | bool | None, listed: bool = True) -> list[tuple[str, str]]:
    """The page's "Run on" choices: here, Hugging Face Jobs' cheapest fit, and (listed) each flavor with its
    price, as the Hub lists them."""
    from .. import hf_jobs

    choices = [("This Space" if on_space() else "This machine", ""),
               ("Hugging Face Jobs: the cheapest machine that fits", "auto")]
    if not listed:
        return choices
    try:
        return choices + [(f"Hugging Face Jobs: {f.label}", f.name) for f in hf_jobs.flavors(token or None)]
    except QuantSpaceError:   # the list is a convenience: "auto" still picks from it when the job starts
        return choices


def jobs_plan_markdown(model: str, method: str, variants: list[str] | None, target: str, evaluate: bool,
                       options: dict[str, Any], token: str | bool | None, flavor: str) -> tuple[str, bool]:
    """The preflight of a run on Hugging Face Jobs, for the page: (markdown, whether it can start)."""
    from .. import hf_jobs

    try:
        plan = hf_jobs.make_plan(model, method, variants, target or None, no_eval=not evaluate, options=options,
                                 token=token or None, flavor=flavor)
    except QuantSpaceError as exc:
        return f"❌ {exc}", False
    return (f"✅ {plan.summary()}\n\nResult: **{plan.push}**. The job is checked like a run here (model, "
            "options, your right to push and to start Jobs); nothing starts until you press Quantize."), True


def _spec(model: str, method: str, variants: list[str] | None, options: dict[str, Any] | None, target: str,
          private: bool, evaluate: bool, calib_file: Any = None, hf_jobs: str = "") -> JobSpec:
    upload = uploaded(calib_file)
    return JobSpec(model=model, method=method, variants=list(variants or []), options=dict(options or {}),
                   target=(target or "").strip() or None, private=private, evaluate=evaluate,
                   calib_file=upload[0] if upload else None, calib_name=upload[1] if upload else None,
                   hf_jobs=(hf_jobs or "").strip() or None)


def uploaded(value: Any) -> tuple[str, str] | None:
    """(path, the visitor's file name) of a file uploaded to this app (the page's gr.File gives a path, an API
    call a FileData), or None for none. Only a file inside Gradio's upload folder: an API call's FileData is the
    caller's own JSON, and Gradio checks its path only when it carries FileData's `meta` marker."""
    from gradio.utils import get_upload_folder

    if not value:
        return None
    if isinstance(value, FileData):
        value = value.model_dump()
    path, name = (value.get("path"), value.get("orig_name")) if isinstance(value, dict) else (value, None)
    if not isinstance(path, (str, Path)) or not str(path):
        raise readable(CalibrationError("calib_file is not a file: pass handle_file(PATH) with gradio_client."))
    real = Path(path).resolve()
    if not (real.is_relative_to(Path(get_upload_folder()).resolve()) and real.is_file()):
        raise readable(CalibrationError("calib_file must be a file uploaded with the call (gradio_client: "
                                        "handle_file(PATH)), not a path on this app's disk."))
    return str(real), Path(str(name or real.name)).name


async def quantize_api(model: str, method: str = "gguf", variants: list[str] | None = None,
                       options: dict[str, Any] | None = None, target: str = "", private: bool = False,
                       evaluate: bool = True, hf_token: str = "", calib_file: FileData | None = None,
                       hf_jobs: str = "", oauth_token: gr.OAuthToken | None = None,
                       request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
    """Quantize `model` with `method`; push to `target` (owner/name) when given. Returns the report
    (quantspace.json) with `repo_url` when pushed. Progress is reported per stage. The job runs to its end even
    if the connection drops; use /start_job and /job_status to follow it by id instead. `calib_file`: your own
    calibration text (.txt, .jsonl, .json or .parquet; gradio_client: handle_file(PATH)), which replaces
    options["calib_dataset"]. `hf_jobs`: run it on Hugging Face Jobs instead, billed to you (needs your token
    with the Jobs permission): a flavor (cpu-upgrade, l4x1, a100-large...) or "auto" for the cheapest that fits;
    the result is pushed (to `target`, default you/<model>-<SUFFIX>)."""
    progress = gr.Progress()
    token = token_for(hf_token, oauth_token)
    owner = await asyncio.to_thread(caller, hf_token, oauth_token)    # asks the Hub: not on the event loop
    spec = _spec(model, method, variants, options, target, private, evaluate, calib_file, hf_jobs)
    # Starting copies and reads an uploaded calibration file: not on the event loop either.
    job = await asyncio.to_thread(start_job, spec, token, owner, request)
    # Waiting holds no thread; if the connection drops, Gradio cancels this coroutine and the job goes on.
    async for snap in job.watch():
        show_progress(progress, snap)
    try:
        return job.wait().report
    except BaseException as exc:
        raise readable(exc) from None


def show_progress(progress: gr.Progress, snap: Snapshot) -> None:
    """A job's place in the queue, or its stage and step, as Gradio's progress (the page's bar, the client's
    status)."""
    if snap.state == "queued" and snap.ahead is not None:
        progress(None, desc=f"queued: {snap.ahead} ahead")
    elif snap.stage:
        progress((snap.done, snap.total), desc=snap.stage)


def start_job_api(model: str, method: str = "gguf", variants: list[str] | None = None,
                  options: dict[str, Any] | None = None, target: str = "", private: bool = False,
                  evaluate: bool = True, hf_token: str = "", calib_file: FileData | None = None,
                  hf_jobs: str = "", oauth_token: gr.OAuthToken | None = None,
                  request: gr.Request = None) -> dict[str, Any]:  # type: ignore[assignment]
    """Start the same job as /quantize and return at once with its status (`job_id`, `state`...): follow it
    with /job_status, stop it with /cancel_job. Started with a token, it is visible to that account only.
    `hf_jobs` as in /quantize."""
    token = token_for(hf_token, oauth_token)
    job = start_job(_spec(model, method, variants, options, target, private, evaluate, calib_file, hf_jobs), token,
                    caller(hf_token, oauth_token), request)
    return job.status()


def job_status_api(job_id: str, hf_token: str = "", oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """A job's `state` (queued, running, finished, failed, cancelled), `stage`, `done`/`total`, `jobs_ahead`
    while queued, `log` (lines), `report` once finished, `error` (one line) once failed, and `removed_in_s`
    once ended; for a job on Hugging Face Jobs, `hf_job`: its `id`, `url`, `flavor`, `stage` and log `tail`.
    Only for the account that started it (same token), or anyone with the id of an anonymous job."""
    try:
        return REGISTRY.get(job_id, caller(hf_token, oauth_token)).status()
    except QuantSpaceError as exc:
        raise readable(exc) from None


def cancel_job_api(job_id: str, hf_token: str = "", oauth_token: gr.OAuthToken | None = None) -> dict[str, Any]:
    """Cancel a job by id (same rule as /job_status). It stops at its next step and removes everything it
    wrote; returns its status (`cancel_requested` true; `state` becomes cancelled shortly)."""
    try:
        return REGISTRY.cancel(job_id, caller(hf_token, oauth_token)).status()
    except QuantSpaceError as exc:
        raise readable(exc) from None


def cancel_api(request: gr.Request = None) -> bool:  # type: ignore[assignment]
    """Cancel the jobs this client started (the same browser tab, or the same gradio_client Client) that are
    still going. Returns whether there was one. A job stops at its next step and removes everything it wrote."""
    return REGISTRY.cancel_session(session_key(request))


def session_key(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) or None


def start_job(spec: JobSpec, token: str | None, owner: str | None, request: gr.Request | None) -> Job:
    try:
        return REGISTRY.start(spec, token, owner, session_key(request))
    except QuantSpaceError as exc:
        raise readable(exc) from None
