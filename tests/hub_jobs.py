"""Hugging Face Jobs for the local test Hub (`tests/hubserver.py`): each Job's command runs as a local subprocess.

The real `huggingface_hub` client (2.4.0: `run_job`, `inspect_job`, `list_jobs`, `fetch_job_logs`, `cancel_job`,
`wait_for_job`, `list_jobs_hardware`) drives it through these routes, which the server hands to `JobsBackend.handle`:

    GET  /api/jobs/hardware                       the flavors: `hub.jobs.hardware` (settable)
    POST /api/jobs/{ns}                           create a Job (JobInfo), then start it
    GET  /api/jobs/{ns}?stage=S&label=k=v         the namespace's Jobs (one page: no Link header)
    GET  /api/jobs/{ns}/{id}                      JobInfo
    GET  /api/jobs/{ns}/{id}/logs?tail=N          Server-Sent Events, live while the Job runs
    POST /api/jobs/{ns}/{id}/cancel               SIGTERM to the process group, SIGKILL after `kill_grace_s`

Access: a token that can write to the namespace (the user's own name or one of its orgs); creating and cancelling
also need the user's `jobs` permission (`hub.add_user(..., jobs=False)` gives a token without job.write).

How a Job runs: `command + arguments` via `subprocess.Popen`, in its own session (process group), stdout and
stderr merged, each line logged with its timestamp. `python`/`python3` stands for `sys.executable`: the test's
interpreter plays the image's. Working directory: `hub.jobs.workdir` (default: the repository root). Environment:
`hub.jobs.base_env` (PATH, HOME, LANG and what `point_client_at` sets: HF_ENDPOINT is this hub), then HF_HOME, a
fresh folder per Job under the server's root, then the Job's `environment`, then its `secrets`. The image itself
is only recorded. As in a real container, Python block-buffers stdout into a pipe: a Job that wants its lines
seen live prints with `flush=True` or sets PYTHONUNBUFFERED=1.

Stages: SCHEDULING when created, RUNNING once the process started; when it is over (its process group is then
killed, as a container goes with its main process): COMPLETED on exit 0, ERROR on another exit code or past
`timeoutSeconds`, CANCELED when cancelled. Secret values are never sent back: JobInfo lists their names only.

Logs (as the Hub streams them): an event `===== Job started at ... =====`, then one event per line, then the
response ends once the Job is over and every line was sent (chunked transfer, so the connection stays usable);
`: keep-alive` comments every `keepalive_s` while nothing happens. The client cannot say whether it follows:
`fetch_job_logs(follow=False)` on a running Job returns at the first line logged a second or more after its
request, or after its own 5 s read timeout when the Job prints nothing; on a finished Job, at once.

For asserts: `hub.jobs.jobs` (id -> `Job`: the spec as received, secret values included, who, pid, exit code,
log lines) and `hub.jobs.responses` (every body the Jobs routes sent, JSON and log events).
Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlsplit

TERMINAL_STAGES = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
# Spec fields the test hub cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("volumes", "expose", "ssh", "network", "resourceGroupId")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _hw(name: str, pretty: str, cpu: int, ram: int, disk: int, micro_usd: int,
        gpu: tuple[str, int, int] | None = None) -> dict[str, Any]:
    """One hardware entry as the Hub lists it; gpu = (model, quantity, VRAM GB in all)."""
    accelerator = None if gpu is None else {"type": "gpu", "model": gpu[0], "quantity": str(gpu[1]),
                                            "vram": f"{gpu[2]} GB", "manufacturer": "Nvidia"}
    return {"name": name, "prettyName": pretty, "cpu": f"{cpu} vCPU", "ram": f"{ram} GB",
            "ephemeralStorage": f"{disk} GB", "accelerator": accelerator, "unitCostMicroUSD": micro_usd,
            "unitCostUSD": micro_usd / 1e6, "unitLabel": "minute"}


def default_hardware() -> list[dict[str, Any]]:
    return [
        _hw("cpu-basic", "CPU Basic", 2, 16, 50, 167),
        _hw("cpu-upgrade", "CPU Upgrade", 8, 32, 50, 500),
        _hw("cpu-performance", "CPU Performance", 32, 256, 50, 3333),
        _hw("t4-small", "Nvidia T4 - small", 4, 15, 50, 6667, ("T4", 1, 16)),
        _hw("l4x1", "1x Nvidia L4", 8, 30, 400, 13333, ("L4", 1, 24)),
        _hw("a10g-large", "Nvidia A10G - large", 12, 46, 200, 25000, ("A10G", 1, 24)),
        _hw("a100-large", "Nvidia A100 - large", 12, 142, 1000, 41667, ("A100", 1, 80)),
        _hw("h200", "Nvidia H200", 23, 256, 1000, 83333, ("H200", 1, 141)),
    ]


def default_env(hub_url: str) -> dict[str, str]:
    """What every Job's process gets before its own environment and secrets (see `point_client_at`)."""
    from tests.hubserver import CLIENT_ENV   # not at the top: hubserver imports this module

    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update({"HF_ENDPOINT": hub_url, **CLIENT_ENV, "GRADIO_ANALYTICS_ENABLED": "False"})
    return env


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobsError(Exception):
    """An HTTP error for the client; hubserver answers it like its own errors."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Job:
    """One Job: its spec as received (secret values included) and what happened to it."""

    id: str
    namespace: str
    owner_type: str  # "user" or "org"
    user: str  # who created it
    spec: dict[str, Any]  # the request body, untouched
    docker_image: str | None
    space_id: str | None
    command: list[str]
    arguments: list[str]
    environment: dict[str, str]
    secrets: dict[str, str]
    flavor: str
    timeout_s: int | None
    labels: dict[str, str] | None
    hf_home: Path
    created_at: datetime = field(default_factory=_utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    stage: str = "SCHEDULING"
    message: str | None = None
    pid: int | None = None
    exit_code: int | None = None
    logs: list[tuple[datetime, str]] = field(default_factory=list)  # (when captured, line)
    canceled: bool = False
    timed_out: bool = False
    proc: subprocess.Popen | None = field(default=None, repr=False)
    runner: threading.Thread | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.stage in TERMINAL_STAGES

    @property
    def log_lines(self) -> list[str]:
        return [line for _, line in self.logs]


class JobsBackend:
    """The Jobs part of a `HubServer` (its `jobs` attribute)."""

    def __init__(self, hub: Any):  # a HubServer: its url and root are read when a Job starts
        self._hub = hub
        self.hardware: list[dict[str, Any]] = default_hardware()
        self.workdir: Path = REPO_ROOT
        self.kill_grace_s = 3.0  # SIGTERM, then SIGKILL after this long
        self.keepalive_s = 15.0
        self.jobs: dict[str, Job] = {}
        self.responses: list[bytes] = []
        self._base_env: dict[str, str] | None = None
        self._cond = threading.Condition()  # guards jobs' state and logs; notified on every change
        self._stopping = False

    @property
    def base_env(self) -> dict[str, str]:
        """Environment every Job starts from (`default_env` of the hub's url until set); a dict to edit in place."""
        if self._base_env is None:
            if not self._hub.url:
                raise RuntimeError("start the hub first: the Jobs' base environment holds its url")
            self._base_env = default_env(self._hub.url)
        return self._base_env

    @base_env.setter
    def base_env(self, env: dict[str, str]) -> None:
        self._base_env = dict(env)

    def stop(self) -> None:
        """Kill every Job's process group (the hub is stopping) and end the log streams."""
        with self._cond:
            self._stopping = True
            jobs = list(self.jobs.values())
            self._cond.notify_all()
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                _signal_group(job.proc, signal.SIGKILL)
        for job in jobs:
            if job.runner is not None:
                job.runner.join(timeout=5)

    # -- HTTP --------------------------------------------------------------------------------------------------

    def handle(self, handler: Any, path: str) -> None:
        """Answer one /api/jobs request; `handler` is the hubserver request handler (user, command, _json_body)."""
        segs = [unquote(s) for s in path.split("/")[3:] if s]
        method, user = handler.command, handler.user
        if segs == ["hardware"] and method == "GET":
            return self._send(handler, self.hardware)
        if len(segs) == 1 and method == "POST":
            job = self.create(user, segs[0], handler._json_body())
            info = self._info(job)  # SCHEDULING, as the Hub answers
            self.start(job)
            return self._send(handler, info)
        if len(segs) == 1 and method == "GET":
            self._authorize(user, segs[0])
            query = parse_qs(urlsplit(handler.path).query)
            return self._send(handler, [self._info(j) for j in self._list(segs[0], query)])
        if len(segs) == 2 and method == "GET":
            return self._send(handler, self._info(self._find(user, segs[0], segs[1])))
        if len(segs) == 3 and segs[2] == "logs" and method == "GET":
            job = self._find(user, segs[0], segs[1])
            tail = parse_qs(urlsplit(handler.path).query).get("tail", [None])[-1]
            return self._stream_logs(handler, job, int(tail) if tail is not None else None)
        if len(segs) == 3 and segs[2] == "cancel" and method == "POST":
            job = self._find(user, segs[0], segs[1], write=True)
            self.cancel(job)
            return self._send(handler, self._info(job))
        raise JobsError(404, f"{method} {path} is not implemented by the test hub")

    def _send(self, handler: Any, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.responses.append(body)
        handler._send(200, body)

    def _authorize(self, user: Any, namespace: str, write: bool = False) -> None:
        if user is None:
            raise JobsError(401, "You must be authenticated to use Jobs")
        if not user.can_write(namespace):
            raise JobsError(403, f'You don\'t have the rights to use Jobs under the namespace "{namespace}"')
        if write and not user.jobs:
            raise JobsError(403, "This token does not have the permission to start Jobs (job.write)")

    def _find(self, user: Any, namespace: str, job_id: str, write: bool = False) -> Job:
        self._authorize(user, namespace, write)
        with self._cond:
            job = self.jobs.get(job_id)
        if job is None or job.namespace != namespace:
            raise JobsError(404, f"Job {job_id} not found in {namespace}")
        return job

    def _list(self, namespace: str, query: dict[str, list[str]]) -> list[Job]:
        stages = {s.upper() for s in query.get("stage", [])}
        labels = [tuple(kv.split("=", 1)) if "=" in kv else (kv, None) for kv in query.get("label", [])]
        with self._cond:
            jobs = [j for j in self.jobs.values() if j.namespace == namespace]
        return [j for j in jobs if (not stages or j.stage in stages)
                and all(k in (j.labels or {}) and v in (None, (j.labels or {})[k]) for k, v in labels)]

    def _info(self, job: Job) -> dict[str, Any]:
        """JobInfo as the Hub sends it (camelCase); secrets by name only."""
        with self._cond:
            now = job.finished_at or _utcnow()
            durations = {"schedulingSecs": int(((job.started_at or now) - job.created_at).total_seconds()),
                         "runningSecs": int((now - job.started_at).total_seconds()) if job.started_at else None,
                         "totalSecs": int((now - job.created_at).total_seconds())}
            owner_id = hashlib.sha1(job.namespace.encode()).hexdigest()[:24]
            info: dict[str, Any] = {
                "id": job.id, "createdAt": _iso(job.created_at),
                "startedAt": _iso(job.started_at) if job.started_at else None,
                "finishedAt": _iso(job.finished_at) if job.finished_at else None,
                "command": list(job.command), "arguments": list(job.arguments),
                "environment": dict(job.environment), "secrets": {name: None for name in job.secrets},
                "flavor": job.flavor, "labels": dict(job.labels) if job.labels is not None else None,
                "timeoutSeconds": job.timeout_s,
                "status": {"stage": job.stage, "message": job.message},
                "durations": durations,
                "owner": {"id": owner_id, "name": job.namespace, "type": job.owner_type},
                "initiator": {"type": "user", "id": hashlib.sha1(job.user.encode()).hexdigest()[:24],
                              "name": job.user},
            }
        if job.space_id is not None:
            info["spaceId"] = job.space_id
        else:
            info["dockerImage"] = job.docker_image
        return info

    # -- Jobs --------------------------------------------------------------------------------------------------

    def create(self, user: Any, namespace: str, spec: Any) -> Job:
        """Check and record a Job (SCHEDULING); `start` runs it."""
        self._authorize(user, namespace, write=True)
        if not isinstance(spec, dict):
            raise JobsError(400, "The Job spec must be a JSON object")
        flavor = spec.get("flavor") or "cpu-basic"
        names = [hw["name"] for hw in self.hardware]
        if flavor not in names:
            raise JobsError(400, f"Invalid flavor {flavor!r}: expected one of {', '.join(names)}")
        if unsupported := [k for k in UNSUPPORTED if spec.get(k)]:
            raise JobsError(501, f"The test hub does not support Jobs with {', '.join(unsupported)}")
        if spec.get("attempts") not in (None, 0, 1):
            raise JobsError(501, "The test hub does not retry Jobs (attempts > 1)")
        image, space = spec.get("dockerImage"), spec.get("spaceId")
        if bool(image) == bool(space):
            raise JobsError(400, "A Job needs exactly one of dockerImage and spaceId")
        command, arguments = spec.get("command") or [], spec.get("arguments") or []
        if not (isinstance(command, list) and isinstance(arguments, list) and command + arguments
                and all(isinstance(a, str) for a in command + arguments)):
            raise JobsError(400, "The test hub runs a Job's command: give a non-empty list of strings")
        timeout = spec.get("timeoutSeconds")
        if timeout is not None and (not isinstance(timeout, int) or timeout <= 0):
            raise JobsError(400, f"Invalid timeoutSeconds: {timeout!r}")
        job_id = secrets.token_hex(12)
        job = Job(id=job_id, namespace=namespace, owner_type="user" if namespace == user.name else "org",
                  user=user.name, spec=spec, docker_image=image, space_id=space, command=list(command),
                  arguments=list(arguments),
                  environment={str(k): str(v) for k, v in (spec.get("environment") or {}).items()},
                  secrets={str(k): str(v) for k, v in (spec.get("secrets") or {}).items()},
                  flavor=flavor, timeout_s=timeout, labels=spec.get("labels"),
                  hf_home=Path(self._hub.root) / "jobs" / job_id / "hf_home")
        with self._cond:
            if self._stopping:
                raise JobsError(503, "The test hub is stopping")
            self.jobs[job_id] = job
        return job

    def start(self, job: Job) -> None:
        """Run the Job's command in the background (see the module docstring)."""
        env = {**self.base_env, "HF_HOME": str(job.hf_home), **job.environment, **job.secrets}
        with self._cond:
            job.runner = threading.Thread(target=self._run, args=(job, env), name=f"job-{job.id}", daemon=True)
            job.runner.start()  # under the lock: stop() then sees the runner to join

    def cancel(self, job: Job) -> None:
        """Kill the Job's process group and wait until it is CANCELED (a finished Job is left as it is)."""
        with self._cond:
            if job.done:
                return
            job.canceled = True
            proc = job.proc
        if proc is not None:
            self._kill(proc)
        if job.runner is not None:
            job.runner.join(timeout=self.kill_grace_s + 10)

    def _run(self, job: Job, env: dict[str, str]) -> None:
        argv = [*job.command, *job.arguments]
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        with self._cond:  # a cancel or stop that came first wins; Popen under the lock closes that race
            if job.canceled or self._stopping:
                return self._finish(job, "CANCELED", None)
            try:
                job.hf_home.mkdir(parents=True, exist_ok=True)
                proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                return self._finish(job, "ERROR", f"Job failed to start: {e}")
            job.proc, job.pid = proc, proc.pid
            job.stage, job.started_at = "RUNNING", _utcnow()
            self._cond.notify_all()
        assert proc.stdout is not None
        reader = threading.Thread(target=self._read, args=(job, proc.stdout), name=f"job-{job.id}-log", daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=job.timeout_s)
        except subprocess.TimeoutExpired:
            job.timed_out = True
            code = self._kill(proc)
        _signal_group(proc, signal.SIGKILL)  # what the main process left behind goes with it, as with a container
        reader.join(timeout=10)  # a process outside the group may hold the pipe: do not wait for it forever
        with self._cond:
            job.exit_code = code
            if job.canceled or self._stopping:
                self._finish(job, "CANCELED", None if job.canceled else "The test hub was stopped")
            elif job.timed_out:
                self._finish(job, "ERROR", f"Job timed out after {job.timeout_s} seconds (timeout)")
            elif code == 0:
                self._finish(job, "COMPLETED", None)
            else:
                self._finish(job, "ERROR", f"Job failed with exit code: {code}")

    def _finish(self, job: Job, stage: str, message: str | None) -> None:
        with self._cond:
            job.stage, job.message, job.finished_at = stage, message, _utcnow()
            self._cond.notify_all()

    def _kill(self, proc: subprocess.Popen) -> int:
        """SIGTERM the process group, SIGKILL it after the grace period; returns the exit status."""
        _signal_group(proc, signal.SIGTERM)
        try:
            return proc.wait(timeout=self.kill_grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            return proc.wait()

    def _read(self, job: Job, pipe: IO[bytes]) -> None:
        with pipe:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._cond:
                    job.logs.append((_utcnow(), line))
                    self._cond.notify_all()

    # -- logs --------------------------------------------------------------------------------------------------

    def _stream_logs(self, handler: Any, job: Job, tail: int | None) -> None:
        handler.send_response(200)  # also sends Date, which the client reads for follow=False
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(payload: bytes) -> None:
            self.responses.append(payload)
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
            handler.wfile.flush()

        def event(when: datetime, line: str) -> bytes:
            return b"data: " + json.dumps({"timestamp": _iso(when), "data": line}).encode() + b"\n\n"

        with self._cond:
            while not (job.started_at or job.done or self._stopping):
                self._cond.wait(timeout=self.keepalive_s)
            started = job.started_at
            sent = max(len(job.logs) - tail, 0) if tail is not None else 0
        if started is not None:
            send(event(started, f"===== Job started at {started:%Y-%m-%d %H:%M:%S} ====="))
            while True:
                with self._cond:
                    woken = True
                    if len(job.logs) <= sent and not (job.done or self._stopping):
                        woken = self._cond.wait(timeout=self.keepalive_s)
                    batch, over = job.logs[sent:], job.done or self._stopping
                if batch:
                    send(b"".join(event(when, line) for when, line in batch))
                    sent += len(batch)
                elif over:  # the runner marks a Job done only once its last line was logged
                    break
                elif not woken:  # nothing for a while: tell the client the stream is alive
                    send(b": keep-alive\n\n")
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the main process's pid
    except (ProcessLookupError, PermissionError):
        pass
