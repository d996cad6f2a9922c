"""Jobs without Gradio: one heavy job at a time, owners, cancel, retention, and what a job leaves on disk.

The quantization itself is the real pipeline on the tiny local model (no Hub, evaluation off); where a test is
about waiting or cancelling, `Job._work` is replaced by a step the test releases, so timing is not guessed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from quantspace.ui import jobs as jobs_mod
from quantspace.ui.jobs import Job, JobNotFoundError, JobResult, JobSpec, Lane, Registry

SECRET = "hf_not_a_real_token_but_secret"


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("QUANTSPACE_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("QUANTSPACE_JOB_RETENTION_S", "3600")
    return tmp_path / "jobs"


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Gate:
    """Stands in for the pipeline: each job ticks 'work 0/1', then waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.running: list[str] = []
        self.most = 0
        self._lock = threading.Lock()

    def work(self, job: Job) -> JobResult:
        gate = self.gates.setdefault(job.spec.model, threading.Event())
        with self._lock:
            self.running.append(job.spec.model)
            self.most = max(self.most, len(self.running))
        try:
            while not gate.wait(0.02):
                job._tick("work", 0, 1)          # raises Cancelled after Cancel, as the pipeline's steps do
            out = job.dir / "out"
            out.mkdir()
            (out / "quantspace.json").write_text("{}")
            return JobResult({"files": [], "repo_url": "x"}, "card", out, [out / "quantspace.json"])
        finally:
            with self._lock:
                self.running.remove(job.spec.model)

    def open(self, name: str) -> None:
        self.gates.setdefault(name, threading.Event()).set()


@pytest.fixture
def gate(monkeypatch) -> Gate:
    g = Gate()
    monkeypatch.setattr(Job, "_work", lambda self: g.work(self))
    return g


def test_one_heavy_job_at_a_time_and_the_queue_is_visible(root, gate):
    reg = Registry(Lane())
    first = reg.start(JobSpec("a"), None, "alice")
    wait_for(lambda: first.state == "running")
    second = reg.start(JobSpec("b"), None, "bob")
    third = reg.start(JobSpec("c"), None, None)
    wait_for(lambda: third.status()["jobs_ahead"] == 2)
    assert second.status()["state"] == "queued" and second.status()["jobs_ahead"] == 1
    assert "waiting for its turn: 2 jobs ahead" in third.status()["log"][-1]
    gate.open("a")
    wait_for(lambda: second.state == "running")
    wait_for(lambda: third.status()["jobs_ahead"] == 1)
    gate.open("b")
    gate.open("c")
    wait_for(lambda: third.over)
    assert [j.state for j in (first, second, third)] == ["finished"] * 3
    assert gate.most == 1


def test_cancel_while_queued_and_while_running(root, gate):
    reg = Registry(Lane())
    running = reg.start(JobSpec("a"), None, None)
    wait_for(lambda: running.state == "running")
    queued = reg.start(JobSpec("b"), None, None)
    wait_for(lambda: queued.status()["jobs_ahead"] == 1)
    reg.cancel(queued.id, None)
    wait_for(lambda: queued.over)
    assert queued.state == "cancelled" and not queued.dir.exists()
    assert "b" not in gate.running
    reg.cancel(running.id, "someone")              # anonymous job: the id is the key
    wait_for(lambda: running.over)
    status = running.status()
    assert status["state"] == "cancelled" and status["error"].startswith("Cancelled")
    assert status["report"] is None and not running.dir.exists()
    assert list(root.iterdir()) == []


def test_a_signed_in_users_job_is_theirs_alone(root, gate):
    reg = Registry(Lane())
    job = reg.start(JobSpec("a"), None, "alice")
    anonymous = reg.start(JobSpec("b"), None, None)
    assert reg.get(job.id, "alice") is job
    for stranger in ("bob", None):
        with pytest.raises(JobNotFoundError) as refused:
            reg.get(job.id, stranger)
        with pytest.raises(JobNotFoundError):
            reg.cancel(job.id, stranger)
        # The same answer as for an id that never existed: nothing about the job leaks.
        with pytest.raises(JobNotFoundError) as unknown:
            reg.get("no-such-job", stranger)
        assert str(refused.value) == str(unknown.value)
    assert not job.cancelled
    assert reg.get(anonymous.id, None) is anonymous and reg.get(anonymous.id, "bob") is anonymous
    assert len(job.id) >= 22 and job.id not in str(job.dir)    # ≥128 random bits, not the folder's name
    gate.open("a")
    gate.open("b")
    wait_for(lambda: job.over and anonymous.over)


def test_too_many_waiting_jobs_are_refused(root, gate, monkeypatch):
    from quantspace.ui.jobs import BusyError

    monkeypatch.setenv("QUANTSPACE_MAX_QUEUED_JOBS", "1")
    reg = Registry(Lane())
    first = reg.start(JobSpec("a"), None, None)
    wait_for(lambda: first.state == "running")
    second = reg.start(JobSpec("b"), None, None)
    wait_for(lambda: second.state == "queued" and second.status()["jobs_ahead"] == 1)
    with pytest.raises(BusyError, match="waiting for their turn"):
        reg.start(JobSpec("c"), None, None)
    for name in "ab":
        gate.open(name)
    wait_for(lambda: second.over)


def test_a_finished_job_keeps_its_files_until_the_retention_ends(root, tiny_bpe, monkeypatch):
    reg = Registry(Lane())
    job = reg.start(JobSpec(str(tiny_bpe), variants=["Q8_0"], evaluate=False), SECRET, None)
    result = job.wait(timeout=300)
    status = job.status()
    assert status["state"] == "finished" and status["report"]["files"][0]["variant"] == "Q8_0"
    assert 0 < status["removed_in_s"] <= 3600
    assert any("download" in line for line in status["log"]) and status["log"][-1].endswith("finished")
    names = {p.name for p in result.files}
    assert names == {"quantspace.json", status["report"]["files"][0]["filename"]}
    assert all(p.is_file() for p in result.files)
    # What the job left is exactly what it offers for download, and none of it holds the token.
    written = [p for p in job.dir.rglob("*") if p.is_file()]
    assert set(written) == set(result.files)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]
    assert SECRET not in repr(job.status()) and job._token is None

    reg.sweep()                                     # not yet due
    assert job.dir.exists() and reg.get(job.id, None) is job
    monkeypatch.setenv("QUANTSPACE_JOB_RETENTION_S", "0.2")
    time.sleep(0.3)
    assert reg.sweep() == [job.id]
    assert not job.dir.exists()
    with pytest.raises(JobNotFoundError):
        reg.get(job.id, None)


def test_a_failed_job_keeps_its_error_but_no_files(root):
    reg = Registry(Lane())
    job = reg.start(JobSpec(str(root / "no-such-folder"), variants=["Q8_0"], evaluate=False), None, None)
    with pytest.raises(Exception):
        job.wait(timeout=120)
    status = job.status()
    assert status["state"] == "failed" and status["error"] and "\n" not in status["error"]
    assert status["log"][-1].split("] ", 1)[1].startswith("failed:")
    assert not job.dir.exists()


def test_the_sweep_removes_stale_folders_of_an_earlier_run(root, monkeypatch):
    monkeypatch.setenv("QUANTSPACE_JOB_RETENTION_S", "0.2")
    root.mkdir(parents=True)
    stale = root / "job-left-by-a-crash"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "x.gguf").write_bytes(b"GGUF")
    fresh = root / "job-just-made"
    time.sleep(0.3)
    fresh.mkdir()
    Registry(Lane()).sweep()
    assert not stale.exists() and fresh.exists()


def test_a_live_job_of_another_registry_is_not_swept(root, gate, monkeypatch):
    monkeypatch.setenv("QUANTSPACE_JOB_RETENTION_S", "0.2")
    job = Registry(Lane()).start(JobSpec("a"), None, None)
    wait_for(lambda: job.state == "running")
    time.sleep(0.3)
    Registry(Lane()).sweep()
    assert job.dir.exists()
    gate.open("a")
    wait_for(lambda: job.over)


def test_account_of_asks_the_hub_once(hub, monkeypatch):
    from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN

    calls = []
    import quantspace.hub

    real = quantspace.hub.whoami
    monkeypatch.setattr(quantspace.hub, "whoami", lambda token: calls.append(1) or real(token))
    monkeypatch.setattr(jobs_mod, "_accounts", {})
    assert jobs_mod.account_of(ALICE_TOKEN) == "alice"
    assert jobs_mod.account_of(ALICE_TOKEN) == "alice"
    assert jobs_mod.account_of(BOB_TOKEN) == "bob"
    assert jobs_mod.account_of(None) is None and len(calls) == 2
    assert ALICE_TOKEN not in repr(jobs_mod._accounts)
