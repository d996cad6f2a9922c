"""Quantization jobs for the page and the API, independent of any browser tab or connection.

A job has an unguessable id and an owner (the Hub account that started it, or nobody: then the id alone is
the key). It runs in a worker thread until it finishes, fails or is cancelled; closing a tab or dropping a
connection does not touch it. Jobs wait in one process-wide lane, so only one heavy job runs at a time.
A job that has ended keeps its log and result (report, card, downloadable files) for a bounded time
(QUANTSPACE_JOB_RETENTION_S), then a sweep removes it. No Gradio here, so all of it is testable on its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from ..errors import AuthError, CalibrationError, QuantSpaceError, first_line
from ..formats import run_directly
from ..preflight import gpu_seconds, on_space, on_zero_gpu
from ..source import allowed_files
from .gpu import gpu_runner
from .views import Log

# Gradio's mocked sign-in (off a Space) hands out this placeholder instead of a real token.
MOCK_OAUTH_TOKEN = "mock-oauth-token-for-local-dev"
RETENTION_S = 3 * 3600          # default for QUANTSPACE_JOB_RETENTION_S
MAX_QUEUED = 8                  # default for QUANTSPACE_MAX_QUEUED_JOBS
ACCOUNT_TTL_S = 300             # how long a token's account name is remembered (in memory only)
ENDED = ("finished", "failed", "cancelled")
MAX_UPLOAD_BYTES = 200 * 1000 * 1000   # a calibration upload larger than this is refused before it is copied


def jobs_root(create: bool = True) -> Path:
    """Where per-job folders live; QUANTSPACE_JOBS_DIR moves them (tests check what is left there). The sweep
    looks without creating it: a folder only a sweep made would be left behind in temp space."""
    root = Path(os.environ.get("QUANTSPACE_JOBS_DIR") or Path(tempfile.gettempdir()) / "quantspace-jobs")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def retention_s() -> float:
    """How long an ended job (its log, result and files) is kept: QUANTSPACE_JOB_RETENTION_S, in seconds."""
    return float(os.environ.get("QUANTSPACE_JOB_RETENTION_S") or RETENTION_S)


def max_queued() -> int:
    return int(os.environ.get("QUANTSPACE_MAX_QUEUED_JOBS") or MAX_QUEUED)


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


# Folders of jobs that exist in this process (any registry); the sweep removes only other, stale ones.
_live_dirs: set[Path] = set()
_accounts: dict[str, tuple[str, float]] = {}
_accounts_lock = threading.Lock()


def account_of(token: str | None) -> str | None:
    """The Hub account a token belongs to (None without a token). Asked once per few minutes per token; the
    token itself is only a hash key here, never stored."""
    if not token:
        return None
    key = hashlib.sha256(token.encode()).hexdigest()
    now = time.monotonic()
    with _accounts_lock:
        hit = _accounts.get(key)
    if hit and hit[1] > now:
        return hit[0]
    from ..hub import whoami

    name = whoami(token)["name"]
    with _accounts_lock:
        _accounts[key] = (name, now + ACCOUNT_TTL_S)
    return name


class Cancelled(Exception):
    """Raised inside the pipeline at its next progress step after the user pressed Cancel."""


class JobNotFoundError(QuantSpaceError):
    """No such job, it was removed after its retention time, or it belongs to another account."""


class BusyError(QuantSpaceError):
    """Too many jobs are already waiting for their turn."""


def not_found() -> JobNotFoundError:
    # One message for "unknown", "expired" and "not yours": a stranger learns nothing about someone's job.
    hours = retention_s() / 3600
    return JobNotFoundError(f"No job with this id is visible to you: jobs are removed {hours:g} h after they end, "
                            "and a job started while signed in opens only for that same account.")


@dataclass
class JobSpec:
    model: str
    method: str = "gguf"
    variants: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    target: str | None = None         # push here when set
    private: bool = False
    evaluate: bool = True
    # An uploaded calibration file (its path where the web server put it; the caller has checked that it is an
    # upload) and the name the visitor gave it. It replaces options["calib_dataset"] for this job only.
    calib_file: str | None = None
    calib_name: str | None = None
    # Run on Hugging Face Jobs instead of here: a flavor name, or "auto" for the cheapest that fits.
    hf_jobs: str | None = None


@dataclass
class JobResult:
    report: dict[str, Any]
    card: str                         # the model card's markdown
    folder: Path                      # the output folder (inside the job folder)
    files: list[Path]                 # what is offered for download: the report, and the files when not pushed


@dataclass
class Snapshot:
    """A job's state at one moment, as followers see it."""
    version: int
    state: str                        # queued, running, finished, failed, cancelled
    stage: str | None
    done: int
    total: int
    ahead: int | None                 # jobs ahead of this one while queued
    log: str


class Lane:
    """One heavy job at a time (per process), first come first served; waiting jobs see how many are ahead."""

    def __init__(self, slots: int = 1):
        self.slots = slots
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running = 0

    def enter(self, job: Job) -> None:
        """Block until it is `job`'s turn; raises Cancelled if the job is cancelled while it waits."""
        with self._cond:
            self._queue.append(job)
            try:
                while not (self._running < self.slots and self._queue[0] is job):
                    if job.cancelled:
                        raise Cancelled("Cancelled while waiting for its turn; nothing was done.")
                    job._queued(self._running + self._queue.index(job))
                    self._cond.wait(timeout=1.0)
            finally:
                self._queue.remove(job)
                self._cond.notify_all()
            self._running += 1

    def leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


LANE = Lane()


class Job:
    """Runs `pipeline.quantize` in a worker thread; keeps its log and result until it is removed."""

    def __init__(self, spec: JobSpec, token: str | None, owner: str | None = None, session: str | None = None,
                 lane: Lane = LANE):
        if spec.target and not token:
            raise AuthError("Sign in with Hugging Face (or pass hf_token) to push; without signing in you can "
                            "still quantize and download the files.")
        if spec.hf_jobs and not token:
            raise AuthError("Sign in with Hugging Face (or pass hf_token) to run on Hugging Face Jobs: a Job is "
                            "billed to your account.")
        if spec.hf_jobs and spec.calib_file:
            raise CalibrationError("A Hugging Face Job cannot read an uploaded calibration file; use a Hub "
                                   "dataset id, or run it here.")
        self.id = secrets.token_urlsafe(24)        # 192 random bits: the job's address, and for anonymous jobs its key
        self.spec, self.owner, self.session = spec, owner, session
        self._token = token                        # in memory only, dropped when the job ends
        self._lane = lane
        # The folder's name is random too, and unrelated to the id.
        self.dir = Path(tempfile.mkdtemp(prefix="job-", dir=jobs_root()))
        try:
            # Copied now: the web server's temp copy may be cleaned while the job waits for its turn.
            self._upload = take_upload(spec.calib_file, spec.calib_name, self.dir) if spec.calib_file else None
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        _live_dirs.add(self.dir)
        self.result: JobResult | None = None
        self.hf_job: dict[str, Any] | None = None   # the Hugging Face Job running it: id, url, flavor, stage
        self.error: BaseException | None = None
        self.ended_at: float | None = None         # time.monotonic() when it ended
        self._state = "queued"
        self._stage: str | None = None
        self._done = self._total = 0
        self._ahead: int | None = None
        self._log = Log()
        self._version = 0
        self._changed = threading.Condition()
        self._cancel = threading.Event()
        self._log.note(f"started {spec.model} → {spec.method.upper()} {', '.join(spec.variants)}".rstrip())
        if self._upload is not None:
            self._log.note(f"calibration text: {self._upload[0]} (uploaded)")
        # The caller's context (Gradio's request) goes with the thread: ZeroGPU reads it to bill the visitor.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._run,), name="quantspace-job",
                                        daemon=True)
        self._thread.start()

    # -- what happens in the worker thread ------------------------------------------------------------------
    def _changed_now(self) -> None:
        """Call with self._changed held."""
        self._version += 1
        self._changed.notify_all()

    def _queued(self, ahead: int) -> None:
        with self._changed:
            if ahead != self._ahead:
                self._ahead = ahead
                self._log.update(f"waiting for its turn: {ahead} job{'s' if ahead != 1 else ''} ahead", 0, 0)
                self._changed_now()

    def _tick(self, stage: str, done: int, total: int) -> None:
        # The upload is one commit: once it has started, stopping could not take it back, so it finishes.
        if self._cancel.is_set() and stage != "upload":
            raise Cancelled("Cancelled; nothing was pushed and the job's files were removed.")
        self._show(stage, done, total)

    def _show(self, stage: str, done: int, total: int) -> None:
        """A stage's progress in the log (a Hugging Face Job's too: its Cancel goes to the Job, not here)."""
        with self._changed:
            self._stage, self._done, self._total = stage, done, total
            self._log.update(stage, done, total)
            self._changed_now()

    def _run(self) -> None:
        try:
            if self.spec.hf_jobs:   # the work happens on another machine: no turn to wait for here
                with self._changed:
                    self._state = "running"
                    self._changed_now()
                self.result = self._work_on_hf_jobs()
                return
            self._lane.enter(self)
            try:
                with self._changed:
                    self._state, self._ahead = "running", None
                    self._changed_now()
                self.result = self._work()
            finally:
                self._lane.leave()
        except BaseException as exc:  # kept for followers, /job_status and wait()
            self.error = exc
        finally:
            self._token = None
            self._settle()

    def _work(self) -> JobResult:
        from ..pipeline import quantize

        spec, out = self.spec, self.dir / "out"
        params = self._parameters() if on_zero_gpu() else None
        window = gpu_seconds(params) if params is not None else None
        runner = gpu_runner(params) if params is not None else run_directly
        options, trusted = dict(spec.options), {}
        if self._upload is not None:
            # The option names the upload by its base name (so the report and card show only that); this job's
            # context alone maps that name to its copy. Calibration text is read in this thread, before any
            # GPU window, so the mapping is where calib.local_file looks.
            name, copy = self._upload
            options["calib_dataset"], trusted = name, {name: copy}
        with allowed_files(trusted):
            report = quantize(spec.model, method=spec.method, variants=spec.variants or None, out=out,
                              push=spec.target or None, private=spec.private, no_eval=not spec.evaluate,
                              token=self._token, progress=self._tick, options=options, device="auto",
                              run_gpu=runner, gpu_window_s=window)
        data = report.to_dict()
        files = [out / "quantspace.json"]
        if not data.get("repo_url"):   # not pushed: the files themselves are the result
            files += [out / f for entry in data["files"] for f in (entry.get("files") or [entry["filename"]])]
        return JobResult(data, (out / "README.md").read_text(encoding="utf-8"), out, files)

    def _work_on_hf_jobs(self) -> JobResult:
        """Plan, start and follow the same job on Hugging Face Jobs; Cancel cancels the Job."""
        from .. import hf_jobs

        spec, token = self.spec, self._token
        assert isinstance(token, str) and spec.hf_jobs
        plan = hf_jobs.make_plan(spec.model, spec.method, spec.variants or None, spec.target, spec.private,
                                 not spec.evaluate, options=spec.options, token=token, flavor=spec.hf_jobs)
        self._note(plan.summary())
        if self.cancelled:
            raise Cancelled("Cancelled before the Job started; nothing was done.")
        job = hf_jobs.Job(plan, hf_jobs.start(plan, token), token)
        self.hf_job = {"id": job.id, "url": job.state.url, "flavor": plan.flavor.name, "namespace": plan.namespace,
                       "stage": job.state.stage, "tail": []}
        self._note(f"Hugging Face Job {job.id}: {job.state.url}")
        stop = threading.Thread(target=self._cancel_when_asked, args=(job,), name="quantspace-hf-job-cancel",
                                daemon=True)
        stop.start()
        try:
            report = job.follow(progress=self._show, on_line=self._remote_line)
        except hf_jobs.JobsError:
            if self.cancelled:
                raise Cancelled("Cancelled: the Hugging Face Job was stopped and nothing was pushed.") from None
            raise
        finally:
            self.hf_job["stage"] = job.state.stage
        out = self.dir / "out"
        out.mkdir()
        report.save(out)
        card = hf_jobs.card(plan.push, token)
        return JobResult(report.to_dict(), card, out, [out / "quantspace.json"])

    def _remote_line(self, line: str) -> None:
        """The Job's other log lines: the last few are kept for /job_status (its `hf_job.tail`)."""
        assert self.hf_job is not None
        with self._changed:
            self.hf_job["stage"] = "RUNNING"
            self.hf_job["tail"] = [*self.hf_job["tail"], line.rstrip()][-20:]

    def _cancel_when_asked(self, job: Any) -> None:
        while not self.over:
            if self._cancel.wait(timeout=1.0):
                try:
                    job.cancel()
                except QuantSpaceError:   # it had just ended: the follower reports how
                    pass
                return

    def _note(self, text: str) -> None:
        with self._changed:
            self._log.note(text)
            self._changed_now()

    def _parameters(self) -> int:
        """The model's size, for the ZeroGPU window (read from safetensors headers, no download)."""
        from ..estimate import estimate

        return estimate(self.spec.model, self.spec.method, self.spec.variants or None, token=self._token).parameters

    def _settle(self) -> None:
        """The end: keep only what is offered for download (nothing at all after a failure or Cancel)."""
        if self.result is not None:
            _keep_only(self.dir, set(self.result.files))
            state = "finished"
            note = "finished" if not self.cancelled else "finished: Cancel came after the upload had started"
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            state = "cancelled" if isinstance(self.error, Cancelled) else "failed"
            note = "cancelled: nothing was pushed, files removed" if state == "cancelled" else f"failed: {self.error}"
        with self._changed:
            self._state, self._ahead = state, None
            self._log.note(note)
            self.ended_at = time.monotonic()
            self._changed_now()

    # -- what callers see ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    @property
    def over(self) -> bool:
        return self._state in ENDED

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def visible_to(self, user: str | None) -> bool:
        """A signed-in user's job is theirs alone; an anonymous job is open to whoever has its id."""
        return self.owner is None or self.owner == user

    def snapshot(self) -> Snapshot:
        with self._changed:
            return Snapshot(self._version, self._state, self._stage, self._done, self._total, self._ahead,
                            self._log.text)

    async def watch(self, poll: float = 0.5) -> AsyncIterator[Snapshot]:
        """Snapshots as the job changes, checked every `poll` seconds without holding a thread (for pages,
        which may watch many jobs at once); the last one is the job's end."""
        seen = -1
        while True:
            snap = self.snapshot()
            if snap.version != seen:
                seen = snap.version
                yield snap
            if snap.state in ENDED:
                return
            await asyncio.sleep(poll)

    def status(self) -> dict[str, Any]:
        """The JSON of /job_status: no token, no paths."""
        snap = self.snapshot()
        left = None
        if self.ended_at is not None:
            left = max(0, round(self.ended_at + retention_s() - time.monotonic()))
        return {"job_id": self.id, "state": snap.state, "stage": snap.stage, "done": snap.done, "total": snap.total,
                "jobs_ahead": snap.ahead, "log": snap.log.splitlines(), "cancel_requested": self.cancelled,
                "report": self.result.report if self.result is not None else None,
                "error": first_line(self.error) if self.error is not None else None,
                "removed_in_s": left, "hf_job": self.hf_job}

    def wait(self, timeout: float | None = None) -> JobResult:
        """The result once the job has finished, or its error raised here."""
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise TimeoutError("the job is still running")
        return self.result

    def cancel(self) -> None:
        """Stop at the next step (or before starting, if it is still waiting); everything it wrote is removed."""
        self._cancel.set()
        self._lane.wake()


def upload_name(name: str) -> str:
    """A plain file name from the name a visitor gave an upload: its base name only (no folders), odd characters
    replaced, the suffix in lower case (it decides how the file is read)."""
    base = re.sub(r"[^\w.\-]", "_", Path(name.replace("\\", "/")).name)
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    stem = stem.lstrip(".")[-80:] or "calibration"     # never a hidden file, never empty
    return f"{stem}{dot}{ext.lower()[:10]}"


def take_upload(path: str, name: str | None, job_dir: Path) -> tuple[str, Path]:
    """(name, copy): an uploaded calibration file copied into the job's folder, after refusing one that is too
    large; then read once, so a file that is not calibration text fails now, in one line, not after the queue
    and the download."""
    from ..calib import load_calibration_text

    source = Path(path)
    name = upload_name(name or source.name)
    if not source.is_file():
        raise CalibrationError(f"The uploaded calibration file {name} is gone; upload it again.")
    size = source.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise CalibrationError(f"{name} is {size / 1e6:.0f} MB; a calibration file may be at most "
                               f"{MAX_UPLOAD_BYTES // 10**6} MB.")
    folder = job_dir / "calib"
    folder.mkdir()
    copy = folder / name
    shutil.copyfile(source, copy)
    with allowed_files({name: copy}):
        load_calibration_text(name)
    return name, copy


def _keep_only(folder: Path, keep: set[Path]) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


class Registry:
    """Every job of this process by id, whoever started it and whether or not anyone still watches it."""

    def __init__(self, lane: Lane = LANE, sweep_every: float | None = None):
        self._lane = lane
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._sweep_every = sweep_every       # also sweep in the background, so an idle server frees its disk
        self._sweeper: threading.Thread | None = None

    def _sweep_forever(self) -> None:
        assert self._sweep_every is not None
        while True:
            time.sleep(self._sweep_every)
            try:
                self.sweep()
            except Exception:  # a folder that cannot be read now is tried again next time
                pass

    def start(self, spec: JobSpec, token: str | None, owner: str | None, session: str | None = None) -> Job:
        self.sweep()
        with self._lock:
            if self._sweep_every and self._sweeper is None:
                self._sweeper = threading.Thread(target=self._sweep_forever, name="quantspace-sweep", daemon=True)
                self._sweeper.start()
        with self._lock:
            queued = sum(1 for j in self._jobs.values() if j.state == "queued")
        if queued >= max_queued():
            raise BusyError(f"{queued} jobs are already waiting for their turn; try again in a few minutes.")
        job = Job(spec, token, owner, session, lane=self._lane)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def get(self, job_id: str, user: str | None) -> Job:
        """The job if `user` may see it; the same error whether it never existed, expired or is someone else's."""
        self.sweep()
        with self._lock:
            job = self._jobs.get((job_id or "").strip())
        if job is None or not job.visible_to(user):
            raise not_found()
        return job

    def cancel(self, job_id: str, user: str | None) -> Job:
        job = self.get(job_id, user)
        if not job.over:
            job.cancel()
        return job

    def cancel_session(self, session: str | None) -> bool:
        """Cancel the jobs one client (browser tab, gradio_client Client) started that are still going."""
        if not session:
            return False
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.session == session and not j.over and not j.cancelled]
        for job in jobs:
            job.cancel()
        return bool(jobs)

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove jobs that ended more than the retention time ago (their folders too), and folders no job
        of this process owns that are older than that (left by an earlier run). Returns the removed ids."""
        now = time.monotonic() if now is None else now
        keep = retention_s()
        with self._lock:
            gone = [j for j in self._jobs.values() if j.ended_at is not None and now - j.ended_at >= keep]
            for job in gone:
                del self._jobs[job.id]
        for job in gone:
            shutil.rmtree(job.dir, ignore_errors=True)
            _live_dirs.discard(job.dir)
        wall = time.time()
        for folder in jobs_root(create=False).glob("job-*"):
            try:
                stale = folder not in _live_dirs and wall - folder.stat().st_mtime >= keep
            except OSError:
                continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
        return [j.id for j in gone]


REGISTRY = Registry(sweep_every=600)
