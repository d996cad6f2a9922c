"""The same quantize job on Hugging Face Jobs: a machine picked from the preflight's needs, the CLI run there.

A Job runs `python -m quantspace quantize ...` (the same arguments, `--push` always) in an image that has this
version of QuantSpace: the Space's own image on a Space, else the one given (see README, "Hugging Face Jobs").
The user's token travels only as the Job's HF_TOKEN secret: never in the command, the environment, a log line or
the report. The Job pushes its result in one commit, as a local run does; progress comes back as log lines the
CLI prints in the Job (QUANTSPACE_PROGRESS=lines), which `follow` parses.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AuthError, BadOptionError, QuantSpaceError
from .report import Report, format_size

PROGRESS_ENV = "QUANTSPACE_PROGRESS"
PROGRESS_RE = re.compile(r"^\[quantspace\] stage=(?P<stage>.+?) done=(?P<done>\d+) total=(?P<total>\d+)$")
IMAGE_ENV = "QUANTSPACE_JOB_IMAGE"
# Beyond what the job measures it needs: the image, Python and llama.cpp in memory, the OS on disk.
BASE_RAM, BASE_DISK = 4 * 10**9, 10 * 10**9
MIN_TIMEOUT_S = 30 * 60
TAIL_LINES = 20
LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".gguf", ".dat")


class JobsError(QuantSpaceError):
    """A Hugging Face Job could not be planned, started, followed or finished."""


@dataclass(frozen=True)
class Flavor:
    """One Jobs hardware flavor, in numbers (from list_jobs_hardware)."""
    name: str
    title: str
    cpus: int
    ram: int                  # bytes
    disk: int                 # bytes
    gpus: int
    gpu_memory: int           # bytes per GPU (the pipeline uses one)
    gpu_model: str | None
    usd_per_minute: float

    @property
    def label(self) -> str:
        gpu = f", {self.gpus}× {self.gpu_model} {format_size(self.gpu_memory, 0)}" if self.gpus else ""
        return (f"{self.name} ({self.cpus} vCPU, {format_size(self.ram, 0)} RAM{gpu}, "
                f"{format_size(self.disk, 0)} disk; ${self.usd_per_minute * 60:.2f}/h)")


@dataclass(frozen=True)
class Needs:
    """What the job needs of a machine, from the preflight."""
    ram: int
    disk: int
    gpu_memory: int           # 0: runs on a CPU flavor
    parameters: int
    source_bytes: int


@dataclass
class Plan:
    """The Job about to start, for people to confirm: where, how long, what it costs (rough)."""
    flavor: Flavor
    needs: Needs
    minutes: float            # estimated running time
    timeout_s: int
    namespace: str
    image: str
    command: list[str]
    push: str                 # the repo the Job pushes to
    existed: bool             # whether it existed before (a repo the Job creates is removed if it fails)

    @property
    def cost_usd(self) -> float:
        return self.minutes * self.flavor.usd_per_minute

    def summary(self) -> str:
        return (f"Hugging Face Jobs: {self.flavor.label}, billed to {self.namespace}. About "
                f"{_minutes(self.minutes)} (≈ ${self.cost_usd:.2f}; stopped after {_minutes(self.timeout_s / 60)} at "
                f"most, ≤ ${self.timeout_s / 60 * self.flavor.usd_per_minute:.2f}). Needs about "
                f"{format_size(self.needs.ram)} RAM, {format_size(self.needs.disk)} disk"
                + (f", {format_size(self.needs.gpu_memory)} GPU memory." if self.needs.gpu_memory else "."))


@dataclass
class JobState:
    """A Job as the CLI, the page and /job_status show it."""
    job_id: str
    namespace: str
    url: str
    stage: str                                # SCHEDULING, RUNNING, COMPLETED, CANCELED, ERROR
    message: str | None = None
    progress: dict[str, Any] | None = None    # {"stage": ..., "done": ..., "total": ...}
    tail: list[str] = field(default_factory=list)
    repo_url: str | None = None


# --------------------------------------------------------------------------- flavors and the plan


def flavors(token: str | None = None) -> list[Flavor]:
    """The Jobs hardware, cheapest first."""
    from huggingface_hub import HfApi

    out = []
    for hw in _call(lambda: HfApi().list_jobs_hardware(token=token)):
        acc = hw.accelerator
        gpus = int(getattr(acc, "quantity", 0) or 0) if acc else 0
        vram = _bytes(getattr(acc, "vram", "")) if acc else 0
        out.append(Flavor(hw.name, hw.pretty_name, _count(hw.cpu), _bytes(hw.ram), _bytes(hw.ephemeral_storage),
                          gpus, vram // max(1, gpus), getattr(acc, "model", None) if acc else None,
                          _per_minute(float(hw.unit_cost_usd), hw.unit_label)))
    return sorted(out, key=lambda f: (f.usd_per_minute, f.name))


def needs_of(method: str, parameters: int, disk_needed: int, source_bytes: int, ram_needed: int,
             largest_file: int) -> Needs:
    """A machine for this job: memory for evaluation (or llama.cpp holding the largest file), the job's peak disk,
    and for AWQ and NF4 a GPU (the AWQ engine walks layers, so a few GB; NF4 holds the 4-bit model and trains)."""
    ram = BASE_RAM + max(ram_needed, int(1.1 * largest_file))
    disk = BASE_DISK + int(1.1 * disk_needed)
    if method == "awq":
        gpu = 8 * 10**9 + 2 * parameters // 64
    elif method == "nf4":
        gpu = 4 * 10**9 + int(0.7 * parameters)
    else:
        gpu = 0
    return Needs(ram, disk, gpu, parameters, source_bytes)


def pick(needs: Needs, available: Sequence[Flavor], name: str = "auto") -> Flavor:
    """The named flavor (refused when it is too small), or the cheapest that fits."""
    fits = [f for f in available if _fits(f, needs)]
    if name != "auto":
        chosen = next((f for f in available if f.name == name), None)
        if chosen is None:
            raise BadOptionError(f"Unknown Jobs flavor {name!r}; available: {', '.join(f.name for f in available)}.")
        if not _fits(chosen, needs):
            better = f" The cheapest that fits: {fits[0].name}." if fits else ""
            raise BadOptionError(f"{chosen.name} is too small for this job ({_short(needs)}).{better}")
        return chosen
    if not fits:
        raise BadOptionError(f"No Jobs flavor fits this job ({_short(needs)}).")
    return fits[0]


def estimate_minutes(needs: Needs, flavor: Flavor, method: str, n_variants: int, evaluate: bool,
                     tokens: int) -> float:
    """A rough running time, from this project's benchmarks (bench/README.md; 2-core figures scaled by cores):
    download, conversion and quantization by bytes, evaluation by parameters × tokens, all faster on a GPU."""
    cores = max(1, min(flavor.cpus, 16))
    seconds = 60 + needs.source_bytes / 150e6                              # start, download
    work = 2 * needs.parameters                                              # bytes of 16-bit weights
    if method == "gguf":
        seconds += work / 200e6 + n_variants * work / (16e6 * cores)        # convert; quantize each variant
    elif method == "awq":
        seconds += needs.parameters / 1e9 * (60 if flavor.gpus else 3600 / cores)
    else:
        seconds += work / (100e6 if flavor.gpus else 20e6)
    if evaluate:
        core_s = (1 + n_variants) * needs.parameters * tokens * 5e-11       # source and each file
        seconds += core_s / (60 * cores if flavor.gpus else cores)
    return seconds / 60


def require_token(token: str | None) -> str:
    if not token:
        raise AuthError("Hugging Face Jobs need a Hub token with write access and the Jobs permission: set "
                        "HF_TOKEN or run `hf auth login`.")
    return token


def make_plan(source: str, method: str = "gguf", variants: Sequence[str] | str | None = None,
              push: str | None = None, private: bool = False, no_eval: bool = False, ctx: int = 512,
              max_chunks: int = 16, allow_pickle: bool = False, options: dict[str, Any] | None = None, *,
              token: str | None, flavor: str = "auto", timeout: str | int | None = None,
              namespace: str | None = None, image: str | None = None) -> Plan:
    """Check everything before a Job starts: the token's right to start Jobs in the namespace, the source and
    options (the preflight, sized for the Job's machine rather than this one), the flavor, the image. The push
    target defaults to NAMESPACE/<model>-<SUFFIX>."""
    from .formats import get_format
    from .preflight import Hardware, eval_memory, preflight
    from .source import resolve

    token = require_token(token)
    namespace = check_jobs_permission(token, namespace)
    fmt = get_format(method)
    info = resolve(source, token=token)
    if not info.repo_id:
        raise BadOptionError("A Job downloads the model from the Hub; push the local folder to a Hub repo first, "
                             "or run it here.")
    chosen = [v for v in (variants.split(",") if isinstance(variants, str) else variants or []) if v.strip()]
    anywhere = Hardware("cpu", ram=None, disk_free=None)   # no local limits: the Job's machine is chosen below
    pre = preflight(source, fmt.name, chosen or None, token=token, evaluate=not no_eval, hardware=anywhere,
                    options=options, target=push, info=info)
    if pre.problems:
        raise BadOptionError(pre.problems[0])
    push = push or f"{namespace}/{pre.repo_name}"
    args = cli_arguments(info.display, fmt.name, pre.variants, push, private, no_eval, ctx, max_chunks,
                         allow_pickle, options or {})
    assert pre.parameters is not None and pre.disk_needed is not None
    ram_needed = 0 if no_eval else eval_memory(info.config, pre.parameters)[0]
    needs = needs_of(fmt.name, pre.parameters, pre.disk_needed, info.weight_bytes, ram_needed,
                     max(pre.sizes.values(), default=0))
    machine = pick(needs, flavors(token), flavor)
    minutes = estimate_minutes(needs, machine, fmt.name, len(pre.variants), not no_eval, ctx * max_chunks)
    timeout_s = parse_timeout(timeout) if timeout else max(MIN_TIMEOUT_S, _round_up(3 * minutes * 60, 600))
    return Plan(machine, needs, minutes, timeout_s, namespace, image or default_image(), job_command(args), push,
                _exists(push, token))


def cli_arguments(source: str, method: str, variants: Sequence[str], push: str, private: bool, no_eval: bool,
                  ctx: int, max_chunks: int, allow_pickle: bool, options: dict[str, Any]) -> list[str]:
    """The CLI arguments of the same job, for the Job's machine: nothing that names a file of this one."""
    from .formats import check_options, get_format
    from .pipeline import command_args

    for key, value in options.items():
        if isinstance(value, str) and (os.sep in value or value.lower().endswith(LOCAL_SUFFIXES)) \
                and os.path.exists(value):
            raise BadOptionError(f"--{key.replace('_', '-')} names a file of this machine; a Job cannot read it "
                                 "(a Hub dataset id works).")
    fmt = get_format(method)
    out = command_args(source, fmt, variants, check_options(fmt, options, list(variants)), push, private, None,
                       no_eval)
    out += ["--ctx", str(ctx), "--chunks", str(max_chunks)]
    return out + (["--allow-pickle"] if allow_pickle else [])


class Job:
    """A started Job of this pipeline: follow it to its report, ask its status, cancel it."""

    def __init__(self, plan: Plan, state: JobState, token: str):
        self.plan, self.state, self._token = plan, state, token

    @property
    def id(self) -> str:
        return self.state.job_id

    def status(self) -> JobState:
        self.state = status(self.id, self.plan.namespace, self._token)
        return self.state

    def follow(self, progress: Callable[[str, int, int], None] | None = None,
               on_line: Callable[[str], None] | None = None) -> Report:
        """Wait for the end; the pushed report, or JobsError with the Job's last lines (a target repo the Job
        created without finishing is removed)."""
        self.state = follow(self.id, self.plan.namespace, self._token, progress, on_line)
        if self.state.stage != "COMPLETED":
            removed = clean_up(self.plan.push, self.plan.existed, self._token)
            raise JobsError(self.failure(removed))
        return result(self.plan.push, self._token)

    def cancel(self) -> None:
        cancel(self.id, self.plan.namespace, self._token)
        clean_up(self.plan.push, self.plan.existed, self._token)

    def failure(self, removed: bool = False) -> str:
        s = self.state
        tail = "\n".join(s.tail[-5:])
        return (f"The Job ended {s.stage}{': ' + s.message if s.message else ''}"
                f"{f'; the empty repo {self.plan.push} it created was removed' if removed else ''}. {s.url}"
                + (f"\nLast lines:\n{tail}" if tail else ""))


def submit(source: str, method: str = "gguf", variants: Sequence[str] | str | None = None, *,
           token: str | None = None, flavor: str = "auto", **kwargs: Any) -> Job:
    """Plan and start the job on Hugging Face Jobs (Python API); `kwargs` as make_plan's."""
    from .hub import resolve_token

    token = require_token(resolve_token(token))
    plan = make_plan(source, method, variants, token=token, flavor=flavor, **kwargs)
    return Job(plan, start(plan, token), token)


# --------------------------------------------------------------------------- starting, following, stopping


def check_jobs_permission(token: str, namespace: str | None) -> str:
    """The namespace the Job is billed to (the token's user unless an organisation is named), after checking
    the token may start Jobs there; a token without that right is one line before anything starts."""
    from .hub import whoami, writable_namespaces

    me = whoami(token)
    namespace = namespace or me["name"]
    if namespace not in writable_namespaces(me) | {me["name"]}:
        raise AuthError(f"Your token cannot start Jobs in {namespace!r}: you are not a member with write access.")
    access = (me.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise AuthError("Hugging Face Jobs need a token with write access; this one is read-only.")
    if access.get("role") == "fineGrained":
        grained = access.get("fineGrained") or {}
        allowed = set(grained.get("global") or [])
        for scope in grained.get("scoped") or []:
            if (scope.get("entity") or {}).get("name") == namespace:
                allowed |= set(scope.get("permissions") or [])
        if "job.write" not in allowed:
            raise AuthError(f"This token may not start Jobs in {namespace!r}: give it the Jobs permission "
                            "(fine-grained: \"Start and manage Jobs\"), or sign in again allowing Jobs.")
    return namespace


def start(plan: Plan, token: str) -> JobState:
    """Start the planned Job; the token goes in as its HF_TOKEN secret only."""
    from huggingface_hub import HfApi

    job = _call(lambda: HfApi().run_job(
        image=plan.image, command=plan.command, env={PROGRESS_ENV: "lines", "PYTHONUNBUFFERED": "1"},
        secrets={"HF_TOKEN": token}, flavor=plan.flavor.name, timeout=plan.timeout_s, namespace=plan.namespace,
        labels={"app": "quantspace"}, token=token), starting=True)
    return JobState(job.id, plan.namespace, job.url, str(job.status.stage), job.status.message)


def status(job_id: str, namespace: str, token: str, tail: int = TAIL_LINES) -> JobState:
    """The Job's stage, its last progress line and log tail (and the pushed repo once it has finished)."""
    from huggingface_hub import HfApi

    api = HfApi()
    job = _call(lambda: api.inspect_job(job_id=job_id, namespace=namespace, token=token))
    lines = list(_logs(api, job_id, namespace, token, follow=False))
    state = JobState(job.id, namespace, job.url, str(job.status.stage), job.status.message)
    _absorb(state, lines, tail)
    return state


def follow(job_id: str, namespace: str, token: str, on_progress: Callable[[str, int, int], None] | None = None,
           on_line: Callable[[str], None] | None = None) -> JobState:
    """Stream the Job's logs until it ends: progress lines go to on_progress, the others to on_line. The final
    state, with the log tail."""
    from huggingface_hub import HfApi

    api = HfApi()
    state = JobState(job_id, namespace, "", "RUNNING")
    lines: list[str] = []
    for line in _logs(api, job_id, namespace, token, follow=True):
        lines.append(line)
        if m := PROGRESS_RE.match(line.strip()):
            if on_progress is not None:
                on_progress(m["stage"], int(m["done"]), int(m["total"]))
        elif on_line is not None:
            on_line(line)
    job = _call(lambda: api.inspect_job(job_id=job_id, namespace=namespace, token=token))
    state.url, state.stage, state.message = job.url, str(job.status.stage), job.status.message
    _absorb(state, lines, TAIL_LINES)
    return state


def cancel(job_id: str, namespace: str, token: str) -> None:
    from huggingface_hub import HfApi

    _call(lambda: HfApi().cancel_job(job_id=job_id, namespace=namespace, token=token))


def result(repo_id: str, token: str) -> Report:
    """The report the finished Job pushed (quantspace.json of the target repo)."""
    from huggingface_hub import hf_hub_download

    path = _call(lambda: hf_hub_download(repo_id, "quantspace.json", token=token))
    return Report.load(Path(path))


def card(repo_id: str, token: str) -> str:
    """The model card the finished Job pushed."""
    from huggingface_hub import hf_hub_download

    return Path(_call(lambda: hf_hub_download(repo_id, "README.md", token=token))).read_text(encoding="utf-8")


def clean_up(repo_id: str, existed: bool, token: str) -> bool:
    """After a Job that did not finish: a target repo it created without a QuantSpace commit is removed (the
    push is one commit, so a repo without quantspace.json holds nothing of the job). True when one was."""
    from huggingface_hub import HfApi

    api = HfApi()
    if existed or not _call(lambda: api.repo_exists(repo_id, token=token)):
        return False
    if _call(lambda: api.file_exists(repo_id, "quantspace.json", token=token)):
        return False
    _call(lambda: api.delete_repo(repo_id, token=token))
    return True


# --------------------------------------------------------------------------- the command and the image


def job_command(cli_args: Sequence[str]) -> list[str]:
    """The CLI the Job runs: the user's own arguments (they hold no token: it is a secret of the Job)."""
    return ["python", "-m", "quantspace", "quantize", *cli_args]


def default_image() -> str:
    """On a Space, the Space's own image; elsewhere QUANTSPACE_JOB_IMAGE (README: an image of this version)."""
    space = os.environ.get("SPACE_ID")
    image = os.environ.get(IMAGE_ENV) or (f"hf.co/spaces/{space}" if space else "")
    if not image:
        raise BadOptionError(f"Which image should the Job run? Pass --job-image (or set {IMAGE_ENV}): a Space that "
                             "runs this version of QuantSpace (hf.co/spaces/OWNER/NAME), see the README.")
    return image


def parse_timeout(text: str) -> int:
    """'90m', '3h', '1d', '600' (seconds) → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    if not m or float(m[1]) <= 0:
        raise BadOptionError(f"Job timeout {text!r} is not a duration like 90m, 3h or 1d.")
    return int(float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]])


def shell_line(command: Sequence[str]) -> str:
    return " ".join(shlex.quote(c) for c in command)


# --------------------------------------------------------------------------- helpers


def _absorb(state: JobState, lines: list[str], tail: int) -> None:
    """Progress, pushed repo and the last lines (progress lines left out) of a Job's log."""
    plain = []
    for line in lines:
        text = line.rstrip("\n")
        if m := PROGRESS_RE.match(text.strip()):
            state.progress = {"stage": m["stage"], "done": int(m["done"]), "total": int(m["total"])}
        else:
            plain.append(text)
            if text.startswith("pushed: "):
                state.repo_url = text.removeprefix("pushed: ").strip()
    state.tail = plain[-tail:]


def _logs(api: Any, job_id: str, namespace: str, token: str, follow: bool) -> Iterator[str]:
    """The Job's log lines, an HTTP failure while streaming as one line."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield from api.fetch_job_logs(job_id=job_id, namespace=namespace, follow=follow, token=token)
    except HfHubHTTPError as exc:
        raise JobsError(f"Hugging Face Jobs: {_first(exc)}") from None


def _exists(repo_id: str, token: str) -> bool:
    from huggingface_hub import HfApi

    return bool(_call(lambda: HfApi().repo_exists(repo_id, token=token)))


def _call(fn: Callable[[], Any], starting: bool = False) -> Any:
    """A Hub call, its HTTP failure as one line (403 when starting: the Jobs permission)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if starting and status in (401, 403):
            raise AuthError("The Hub refused to start the Job: the token needs write access and the Jobs "
                            f"permission in that namespace ({_first(exc)}).") from None
        raise JobsError(f"Hugging Face Jobs: {_first(exc)}") from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bytes(text: str | None) -> int:
    """'16 GB', '1.5 TB', '24GiB' → bytes (0 when unknown)."""
    m = re.search(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B)", str(text or ""), re.I)
    if not m:
        return 0
    unit = m[2].upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m[1]) * base ** "KMGT".index(unit[0]) * base)


def _count(text: str | None) -> int:
    m = re.search(r"\d+", str(text or ""))
    return int(m[0]) if m else 1


def _per_minute(usd: float, unit: str | None) -> float:
    per = {"second": 1 / 60, "minute": 1.0, "hour": 60.0}.get(str(unit or "minute").lower(), 1.0)
    return usd / per


def _fits(f: Flavor, needs: Needs) -> bool:
    if f.ram < needs.ram or (f.disk and f.disk < needs.disk):
        return False
    return not needs.gpu_memory or (f.gpus > 0 and f.gpu_memory >= needs.gpu_memory)


def _short(needs: Needs) -> str:
    gpu = f", {format_size(needs.gpu_memory)} GPU memory" if needs.gpu_memory else ""
    return f"needs about {format_size(needs.ram)} RAM, {format_size(needs.disk)} disk{gpu}"


def _minutes(m: float) -> str:
    return f"{m:.0f} min" if m < 90 else f"{m / 60:.1f} h"


def _round_up(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)
