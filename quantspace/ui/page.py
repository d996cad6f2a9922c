"""The page: sign in, pick a model, see the preflight, choose a method, run, see the result.

Built from `quantspace.formats.REGISTRY`: every format gets a tab with its variants and its own options (each
`Option` becomes a control), so a new format appears here without edits. Handlers are thin over `api.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator

import gradio as gr
import pandas as pd

from ..errors import QuantSpaceError
from ..retry import status_of
from ..formats import REGISTRY, Format, Option, get_format
from ..preflight import on_space, on_zero_gpu, preflight
from . import api
from .jobs import MAX_UPLOAD_BYTES, Job, JobSpec, retention_s
from .views import card_body, job_link, plot_rows, preflight_markdown, result_markdown

INTRO = """# 🧮 QuantSpace
Turn a Hugging Face model into files your hardware can run, and see what each file costs in accuracy:
quantize, **measure** (perplexity, KL divergence, top-1 agreement against the source), publish with a model card."""
SIGNED_OUT = ("**Not signed in.** Sign in with Hugging Face to quantize your private models and the gated ones "
              "whose licence you accepted, and to push the results to your account or one of your organisations "
              "(the Space asks to read your private repos and the gated repos you were granted, to create repos "
              "and write to yours, and to start Hugging Face Jobs you ask for, billed to you; nothing else). "
              "Without signing in you can still quantize public models, measure and download the files.")
NO_LOCAL_LOGIN = ("**Running locally without a Hub login**, so sign-in is off: run `hf auth login` (or set "
                  "`HF_TOKEN`) and restart to push. You can still quantize local folders or public models.")
SIGN_IN_OFF = ("**Sign-in is off**: {}. Local folders and models in the local Hub cache still work; "
               "pushing does not.")
CSS = """
.gradio-container { max-width: 1200px !important; margin: auto; }
#preflight { min-height: 3em; }
#log textarea { font-family: ui-monospace, monospace; font-size: 0.85em; }
/* Numbers (the right-aligned columns of every table) never wrap inside their cells. */
.prose td[align="right"], .prose th[align="right"], .prose td[style*="right"], .prose th[style*="right"] {
  white-space: nowrap; font-variant-numeric: tabular-nums; }
footer { display: none !important; }
"""
CALIB_FILE_TYPES = (".txt", ".jsonl", ".json", ".parquet")
CALIB_FILE_INFO = ("<small>Your own calibration text: .txt (paragraphs), or .jsonl / .json / .parquet with a "
                   "'text' column or chat messages. An uploaded file wins over the box above; the card names "
                   "it by its file name.</small>")
JOBS_HINT = ("**Too big for this machine?** Pick *Hugging Face Jobs* under *Run on*: the same job on a machine "
             "that fits, billed to your account (the price and time are shown before it starts).")
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald",
                       font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch_kwargs() -> dict[str, Any]:
    """What `launch()` needs beside the server address (the theme and CSS are launch options in Gradio 6).

    No `allowed_paths`: the job folders are never served by path. Files a handler returns to its visitor are
    copied by Gradio into its cache under content-hash paths, which only that visitor is told."""
    # Gradio refuses a larger upload while it arrives, so a visitor cannot fill the Space's disk with one.
    return {"theme": THEME, "css": CSS, "show_error": True, "max_file_size": MAX_UPLOAD_BYTES}


def sign_in_off_reason() -> str | None:
    """None when the page can offer sign-in; else why not, in one line for the page.

    On a Space, OAuth is real. Locally Gradio mocks it with this machine's login and asks the Hub who that is while
    the app starts (a failure there would stop the app), so the login is checked here first.
    """
    if on_space():
        return None
    from huggingface_hub import HfApi, constants, get_token

    token = get_token()
    if token is None:
        return NO_LOCAL_LOGIN
    if constants.HF_HUB_OFFLINE:
        return SIGN_IN_OFF.format("HF_HUB_OFFLINE=1 is set")
    try:
        me = HfApi().whoami(token=token)
    except Exception as exc:  # any failure only turns sign-in off; the reason is shown on the page
        if status_of(exc) in (401, 403):
            return SIGN_IN_OFF.format("this machine's Hub token was rejected (expired or revoked? run "
                                      "`hf auth login` again and restart)")
        return SIGN_IN_OFF.format(f"the Hub at {constants.ENDPOINT} could not be reached ({type(exc).__name__})")
    if me.get("type") != "user":
        return SIGN_IN_OFF.format("this machine's Hub token is not a personal account's")
    return None


@dataclass
class MethodTab:
    """One format's tab and controls; `reason` says why it is disabled, if it is."""
    name: str
    fmt: Format
    reason: str | None
    tab: gr.Tab
    variants: gr.CheckboxGroup
    options: list[tuple[Option, gr.Component]]
    calib_file: gr.File | None = None     # for formats with a calib_dataset option


def _reason(fmt: Format) -> str | None:
    """Why this method cannot run here: a missing package, or no GPU for a GPU-only format."""
    reason = fmt.unavailable()
    if reason is None and fmt.needs_gpu and not on_zero_gpu():
        import torch

        if not torch.cuda.is_available():
            reason = "needs a CUDA GPU and this machine has none."
    return reason


def _control(opt: Option, enabled: bool) -> gr.Component:
    """A control for one format option, chosen by the option's type."""
    label = opt.title
    if opt.choices is not None:
        return gr.Dropdown(list(opt.choices), value=opt.default, label=label, info=opt.help, interactive=enabled)
    if opt.suggestions:
        return gr.Dropdown([opt.default, *opt.suggestions], value=opt.default, label=label, info=opt.help,
                           allow_custom_value=True, interactive=enabled)
    if isinstance(opt.default, bool):
        return gr.Checkbox(value=opt.default, label=label, info=opt.help, interactive=enabled)
    if isinstance(opt.default, (int, float)):
        return gr.Number(value=opt.default, label=label, info=opt.help, minimum=opt.minimum,
                         precision=0 if isinstance(opt.default, int) else None, interactive=enabled)
    return gr.Textbox(value=opt.default or "", label=label, info=opt.help, interactive=enabled)


def _method_tabs() -> list[MethodTab]:
    tabs = []
    for name in REGISTRY:
        fmt = get_format(name)
        reason = _reason(fmt)
        label = name.upper() if reason is None else f"{name.upper()} (unavailable)"
        with gr.Tab(label, id=name, interactive=reason is None, elem_id=f"tab-{name}") as tab:
            if reason:
                gr.Markdown(f"⚠️ {name.upper()} {reason}")
            summaries = getattr(fmt, "summaries", {})
            choices = [(f"{v} · {summaries[v]}" if summaries.get(v) else v, v) for v in fmt.variants]
            variants = gr.CheckboxGroup(choices, value=list(fmt.default_variants),
                                        label=f"{name.upper()} variants", interactive=reason is None,
                                        elem_id=f"variants-{name}")
            uploads: list[gr.File] = []
            options = _controls(name, [o for o in fmt.options if not o.advanced], reason is None, uploads)
            advanced = [opt for opt in fmt.options if opt.advanced]
            if advanced:
                with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{name}"):
                    options += _controls(name, advanced, reason is None, uploads)
        tabs.append(MethodTab(name, fmt, reason, tab, variants, options, uploads[0] if uploads else None))
    return tabs


def _controls(method: str, opts: list[Option], enabled: bool,
              uploads: list[gr.File]) -> list[tuple[Option, gr.Component]]:
    """Controls for these options; the calibration text option gets a file upload next to it."""
    controls = []
    for opt in opts:
        controls.append((opt, _control(opt, enabled)))
        if opt.name == "calib_dataset":
            uploads.append(gr.File(label="Calibration file", file_types=list(CALIB_FILE_TYPES), interactive=enabled,
                                   elem_id=f"calib-file-{method}", height=140))
            gr.Markdown(CALIB_FILE_INFO, elem_classes=["calib-file-info"])
    return controls


def _plot_update(rows: list[dict[str, Any]]) -> dict:
    """The plot with some room around its points (Vega fits the axes tightly to the data otherwise)."""
    if not rows:
        return gr.update(visible=False)
    size = max(r["size_mb"] for r in rows)
    kld = max(r["kld"] for r in rows)
    return gr.update(value=pd.DataFrame(rows), visible=True, x_lim=[0, round(size * 1.15, 2)],
                     y_lim=[0, round(kld * 1.2, 4) or 1])


def _unavailable_note(tabs: list[MethodTab]) -> str:
    return "\n".join(f"- **{t.name.upper()}** is unavailable: {t.reason}" for t in tabs if t.reason)


def build_demo() -> gr.Blocks:
    off_reason = sign_in_off_reason()
    can_sign_in = off_reason is None
    with gr.Blocks(title="QuantSpace", delete_cache=(3600, 3600)) as demo:
        method = gr.State("gguf" if "gguf" in REGISTRY else next(iter(REGISTRY)))
        auto_target = gr.State("")          # the last target we filled in; a user's own edit is kept
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                gr.Markdown(INTRO)
            with gr.Column(scale=1, min_width=220):
                if can_sign_in:
                    gr.LoginButton(size="md")
        account = gr.Markdown(off_reason or SIGNED_OUT, elem_id="account")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                gr.Markdown("### 1 · Model")
                local = "" if on_space() else " or a local folder"
                model = gr.Textbox(label="Model", placeholder="HuggingFaceTB/SmolLM2-135M-Instruct",
                                   info=f"A Hub repo id (owner/name[@revision]){local}; press Enter to check it.",
                                   elem_id="model")
                matches = gr.Radio([], label="Matches on the Hub", visible=False, elem_id="matches")
                pre_md = gr.Markdown("Pick a model: the preflight checks it before anything is downloaded.",
                                     elem_id="preflight")
                gr.Markdown("### 2 · Method")
                with gr.Tabs(selected=method.value):
                    tabs = _method_tabs()
                note = _unavailable_note(tabs)
                if note:
                    gr.Markdown(note)
                gr.Markdown("### 3 · Publish")
                target = gr.Textbox(label="Target repo", placeholder="you/Model-GGUF", elem_id="target",
                                    info="Created in your namespace (or an organisation you can write to).")
                with gr.Row():
                    push = gr.Checkbox(value=False, label="Push to the Hub", interactive=False, elem_id="push")
                    private = gr.Checkbox(value=False, label="Private repo")
                    evaluate = gr.Checkbox(value=True, label="Measure accuracy", elem_id="evaluate")
                where = gr.Dropdown(api.where_choices(None, listed=False), value="", label="Run on", interactive=False,
                                    elem_id="where", info="Hugging Face Jobs run the same job on a machine billed to "
                                    "your account (sign in); the result is pushed.")
                with gr.Row():
                    run = gr.Button("Quantize", variant="primary", elem_id="run")
                    cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="cancel")
            with gr.Column(scale=6):
                gr.Markdown("### Progress")
                current = gr.State("")         # the id of the job this page shows
                link = gr.Markdown(elem_id="job-link")
                log = gr.Textbox(label="Live log", lines=12, max_lines=16, autoscroll=True, interactive=False,
                                 placeholder="Each stage of the run appears here as it happens.",
                                 elem_id="log")
                result = gr.Markdown(elem_id="result")
                plot = gr.ScatterPlot(pd.DataFrame({"size_mb": [], "kld": [], "variant": []}), x="size_mb", y="kld",
                                      color="variant", title="Size vs accuracy (one point per file)",
                                      x_title="File size (MB)", y_title="KL divergence (lower is better)",
                                      tooltip=["file", "size_mb", "kld", "delta_ppl", "top1"], height=300,
                                      visible=False, elem_id="plot")
                files = gr.File(label="Downloads (report JSON, and the files when not pushed)", file_count="multiple",
                                interactive=False, visible=False, elem_id="files")
                with gr.Accordion("Model card", open=False, visible=False, elem_id="card-box") as card_box:
                    card = gr.Markdown(elem_id="card")

        variants_of = {t.name: t.variants for t in tabs}
        option_controls = [c for t in tabs for _, c in t.options]
        pre_inputs = {model, method, target, push, evaluate, where, *variants_of.values(), *option_controls}

        # -- sign-in: who is here decides whether pushing is possible, and the default target -------------
        def on_load(profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> dict:
            if profile is None:
                return {account: off_reason or SIGNED_OUT,
                        push: gr.update(value=False, interactive=False), where: gr.update(value="", interactive=False)}
            return {account: f"Signed in as **{profile.username}**: results can be pushed to your account "
                             "or your organisations.",
                    push: gr.update(value=True, interactive=True),
                    where: gr.update(choices=api.where_choices(api.token_for("", oauth_token)), interactive=True)}

        demo.load(on_load, None, [account, push, where], api_visibility="private")

        # -- model search --------------------------------------------------------------------------------
        def on_type(text: str, oauth_token: gr.OAuthToken | None) -> dict:
            ids = api.search_models(text, "", oauth_token)
            ids = [i for i in ids if i != text.strip()]
            return gr.update(choices=ids, value=None, visible=bool(ids))

        model.input(on_type, model, matches, api_visibility="private", trigger_mode="always_last",
                    show_progress="hidden", queue=False)

        # -- preflight -----------------------------------------------------------------------------------
        def on_preflight(data: dict, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None) -> dict:
            source = (data[model] or "").strip()
            if not source:
                return {pre_md: "Pick a model: the preflight checks it before anything is downloaded.",
                        run: gr.update(interactive=True)}
            name = data[method]
            want_push = data[push] and profile is not None
            tab = next(t for t in tabs if t.name == name)
            token = api.token_for("", oauth_token)
            options = {o.name: data[c] for o, c in tab.options}
            if data[where]:
                text, ok = api.jobs_plan_markdown(source, name, data[variants_of[name]] or None,
                                                  (data[target] or "").strip(), data[evaluate], options, token,
                                                  data[where])
                return {pre_md: text, run: gr.update(interactive=ok)}
            pre = preflight(source, name, data[variants_of[name]] or None, token=token, evaluate=data[evaluate],
                            target=((data[target] or "").strip() or None) if want_push else None, options=options)
            text = preflight_markdown(pre)
            if profile is not None and pre.too_big:
                text += f"\n\n{JOBS_HINT}"
            return {pre_md: text, run: gr.update(interactive=pre.ok)}

        def suggest_target(data: dict, profile: gr.OAuthProfile | None) -> dict:
            """Fill the target with <user>/<model>-<SUFFIX> unless the user typed their own."""
            source, current = (data[model] or "").strip(), (data[target] or "").strip()
            if profile is None or not source or current not in ("", data[auto_target]):
                return {target: gr.skip()}   # an empty dict would read as one missing output
            fmt = get_format(data[method])
            stem = source.split("@")[0].rstrip("/").split("/")[-1]
            value = f"{profile.username}/{stem}-{fmt.suffix}"
            if value == current:
                return {target: gr.skip()}   # unchanged: writing it again could undo what the user is typing
            return {target: value, auto_target: value}

        def pick(choice: str | None) -> str:
            return choice or ""

        # Every trigger bumps one counter and one listener runs the preflight: "always_last" then runs them
        # in order and skips stale ones, so the panel always shows the latest inputs (no races).
        pre_seq = gr.Number(0, visible=False)
        pre_seq.change(on_preflight, pre_inputs, [pre_md, run], api_visibility="private", concurrency_limit=4,
                       concurrency_id="preflight", trigger_mode="always_last")
        checks = dict(fn=lambda n: (n or 0) + 1, inputs=pre_seq, outputs=pre_seq, api_visibility="private",
                      queue=False, show_progress="hidden")
        naming = dict(fn=suggest_target, inputs={model, method, target, auto_target},
                      outputs=[target, auto_target], api_visibility="private", queue=False)
        model.submit(**naming).then(**checks)
        model.blur(**naming).then(**checks)
        matches.select(pick, matches, model, api_visibility="private", queue=False).then(**naming).then(**checks)
        for t in tabs:
            if t.reason is None:
                t.variants.change(**checks)
                for _, control in t.options:   # options may change sizes (GGUF's per-tensor types) or be refused
                    (control.blur if isinstance(control, gr.Textbox) else control.change)(**checks)
                # Switching tabs switches the method (and the default target's suffix).
                t.tab.select(lambda n=t.name: n, None, method, api_visibility="private",
                             queue=False).then(**naming).then(**checks)
        evaluate.change(**checks)
        where.change(**checks)
        push.change(**checks)
        target.blur(**checks)

        # -- run -----------------------------------------------------------------------------------------
        outputs = [log, result, plot, files, card, card_box, run, cancel, current, link]

        async def on_run(data: dict, profile: gr.OAuthProfile | None, oauth_token: gr.OAuthToken | None,
                         request: gr.Request, progress: gr.Progress = gr.Progress()) -> AsyncIterator[dict]:
            name = data[method]
            tab = next(t for t in tabs if t.name == name)
            if tab.reason:
                raise gr.Error(f"{name.upper()} {tab.reason}")
            want_push = bool(data[push])
            if want_push and profile is None:
                raise gr.Error("Sign in with Hugging Face to push; without signing in, untick 'Push to the Hub'.")
            if data[where] and not want_push:
                raise gr.Error("A Hugging Face Job pushes its result: tick 'Push to the Hub' (signed in).")
            spec = JobSpec(model=(data[model] or "").strip(), method=name, variants=list(data[tab.variants] or []),
                           options={o.name: data[c] for o, c in tab.options},
                           target=((data[target] or "").strip() or None) if want_push else None,
                           private=bool(data[private]), evaluate=bool(data[evaluate]),
                           hf_jobs=data[where] or None)
            upload = api.uploaded(data[tab.calib_file]) if tab.calib_file is not None else None
            if upload is not None:
                spec.calib_file, spec.calib_name = upload
            if want_push and not spec.target:
                raise gr.Error("Enter a target repo (owner/name), or untick 'Push to the Hub'.")
            owner = profile.username if profile is not None else None
            # Refusals leave the page; starting copies (and reads) an upload, so not on the event loop.
            job = await asyncio.to_thread(api.start_job, spec, api.token_for("", oauth_token), owner, request)
            async for update in _watch(job, progress):
                yield update

        async def _watch(job: Job, progress: gr.Progress) -> AsyncIterator[dict]:
            """Stream a job's log to the page, then its result; the job itself goes on if the page goes."""
            snap = job.snapshot()
            yield {current: job.id, link: job_link(job.id, job.owner, retention_s()), log: snap.log, result: "",
                   plot: gr.update(visible=False), files: gr.update(visible=False),
                   card_box: gr.update(visible=False), run: gr.update(interactive=False),
                   cancel: gr.update(interactive=not job.over)}
            shown = None
            async for snap in job.watch():
                api.show_progress(progress, snap)
                update = {log: snap.log}
                if job.hf_job and shown is None:   # the Hugging Face Job has started: its link too
                    shown = job.hf_job["id"]
                    update[link] = (job_link(job.id, job.owner, retention_s()) + " · **Hugging Face Job** "
                                    f"[`{shown[:8]}…`]({job.hf_job['url']}) on {job.hf_job['flavor']}")
                yield update
            ended = {log: job.snapshot().log, run: gr.update(interactive=True), cancel: gr.update(interactive=False)}
            res = job.result
            if res is None:
                yield ended
                raise api.readable(job.error or RuntimeError("the job ended without a result")) from None
            # Gradio copies these files into its cache for this visitor only; the job folder keeps them until
            # the job's retention ends, so reopening the job later offers them again.
            yield {**ended, result: result_markdown(res.report), plot: _plot_update(plot_rows(res.report)),
                   files: gr.update(value=[str(p) for p in res.files if p.is_file()], visible=True),
                   card: card_body(res.card), card_box: gr.update(visible=True, open=False)}

        async def on_open(profile: gr.OAuthProfile | None, request: gr.Request,
                          progress: gr.Progress = gr.Progress()) -> AsyncIterator[dict]:
            """Opened as ?job=<id>: show that job (its owner only), live until it ends, then its result."""
            wanted = (request.query_params.get("job") or "").strip() if request is not None else ""
            if not wanted:
                yield {link: gr.skip()}
                return
            try:
                job = api.REGISTRY.get(wanted, profile.username if profile is not None else None)
            except QuantSpaceError as exc:
                yield {link: f"⚠️ {exc}"}
                return
            async for update in _watch(job, progress):
                yield update

        def on_cancel(job_id: str, profile: gr.OAuthProfile | None) -> None:
            try:
                api.REGISTRY.cancel(job_id, profile.username if profile is not None else None)
            except QuantSpaceError:
                pass   # already removed: nothing to stop

        uploads = [t.calib_file for t in tabs if t.calib_file is not None]
        run_inputs = {model, method, target, push, private, evaluate, where, *variants_of.values(),
                      *option_controls, *uploads}
        # The job waits for its turn in jobs.LANE (one heavy job at a time, its place shown in the log), so
        # starting and watching it need no Gradio slot: the visitor gets the job's link at once.
        run.click(on_run, run_inputs, outputs, api_visibility="private", concurrency_limit=None,
                  concurrency_id="watch")
        cancel.click(on_cancel, current, None, api_visibility="private", queue=False)
        # Closing the tab leaves the job running (its link reopens it); only Cancel stops it. Watching holds no
        # thread (it polls asynchronously), so any number of tabs may watch.
        demo.load(on_open, None, outputs, api_visibility="private", concurrency_limit=None, concurrency_id="watch")

        # -- the named API -------------------------------------------------------------------------------
        gr.api(api.search_models, api_name="search_models", concurrency_limit=4, concurrency_id="preflight")
        gr.api(api.preflight_api, api_name="preflight", concurrency_limit=4, concurrency_id="preflight")
        gr.api(api.quantize_api, api_name="quantize", concurrency_limit=None,
               concurrency_id="watch")   # jobs.LANE keeps one heavy job at a time
        gr.api(api.start_job_api, api_name="start_job", concurrency_limit=4, concurrency_id="preflight")
        gr.api(api.job_status_api, api_name="job_status", queue=False)
        gr.api(api.cancel_job_api, api_name="cancel_job", queue=False)
        gr.api(api.cancel_api, api_name="cancel", queue=False)
    return demo
