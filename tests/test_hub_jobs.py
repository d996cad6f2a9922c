"""Hugging Face Jobs on the local Hub (tests/hub_jobs.py), driven by the real huggingface_hub client.

Each Job's command runs as a local subprocess (`python` is this interpreter); timings are a few seconds at most.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, JobInfo
from huggingface_hub.errors import BadRequestError, HfHubHTTPError

from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN, hub, point_client_at  # noqa: F401  (fixture)
from tests.hub_jobs import REPO_ROOT
from tests.hubserver import HubServer

IMAGE = "python:3.12"


@pytest.fixture
def alice() -> HfApi:
    return HfApi(token=ALICE_TOKEN)


def run(api: HfApi, code: str, **kwargs) -> JobInfo:
    return api.run_job(image=kwargs.pop("image", IMAGE), command=["python", "-c", code],
                       namespace=kwargs.pop("namespace", "alice"), **kwargs)


def wait(api: HfApi, job: JobInfo, namespace: str = "alice") -> JobInfo:
    return api.wait_for_job(job.id, namespace=namespace, poll_interval=0.05, timeout=30)


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie does not: nothing may reap a killed grandchild at once)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def wait_for_line(hub: HubServer, job: JobInfo, prefix: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = [line for line in hub.jobs.jobs[job.id].log_lines if line.startswith(prefix)]
        if lines:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line {prefix!r}: {hub.jobs.jobs[job.id].log_lines}")


def test_run_job_env_secrets_logs_and_no_secret_echoed(hub: HubServer, alice: HfApi) -> None:
    code = ("import os\n"
            "print('FOO =', os.environ['FOO'])\n"
            "print('token set:', os.environ.get('HF_TOKEN') is not None)\n"
            "print('endpoint:', os.environ['HF_ENDPOINT'])\n"
            "print('home:', os.environ['HF_HOME'])\n"
            "print('cwd:', os.getcwd())")
    job = run(alice, code, env={"FOO": "bar"}, secrets={"HF_TOKEN": ALICE_TOKEN}, flavor="cpu-upgrade",
              timeout="5m", labels={"step": "convert"})
    assert job.status.stage == "SCHEDULING" and len(job.id) == 24 and int(job.id, 16) >= 0
    assert job.owner.name == "alice" and job.owner.type == "user"

    done = wait(alice, job)
    assert done.status.stage == "COMPLETED" and done.status.message is None
    assert done.started_at is not None and done.finished_at is not None and done.finished_at >= done.started_at
    logs = list(alice.fetch_job_logs(job_id=job.id, namespace="alice"))
    home = logs[3].removeprefix("home: ")
    assert logs == ["FOO = bar", "token set: True", f"endpoint: {hub.url}", f"home: {home}", f"cwd: {REPO_ROOT}"]
    assert Path(home).is_relative_to(hub.root) and Path(home).is_dir()

    listed = list(alice.list_jobs(namespace="alice"))
    for info in (done, listed[0]):
        assert info.docker_image == IMAGE and info.space_id is None and info.flavor == "cpu-upgrade"
        assert info.environment == {"FOO": "bar"} and info.secrets == {"HF_TOKEN": None}
        assert info.labels["step"] == "convert" and info.command == ["python", "-c", code]
    assert [j.id for j in listed] == [job.id]
    # The secret's value never leaves the hub, in any JSON or log event it sent.
    assert hub.jobs.responses and not any(ALICE_TOKEN.encode() in body for body in hub.jobs.responses)
    assert ALICE_TOKEN not in repr(done) + repr(listed)

    recorded = hub.jobs.jobs[job.id]  # what the hub received, for asserts
    assert recorded.secrets == {"HF_TOKEN": ALICE_TOKEN} and recorded.environment == {"FOO": "bar"}
    assert (recorded.namespace, recorded.user, recorded.flavor, recorded.timeout_s) == ("alice", "alice",
                                                                                        "cpu-upgrade", 300)
    assert recorded.exit_code == 0 and recorded.pid and not alive(recorded.pid)


def test_space_image_is_recorded_as_space_id(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "print('from the space')", image="hf.co/spaces/alice/quantspace")
    assert job.space_id == "alice/quantspace" and job.docker_image is None
    assert hub.jobs.jobs[job.id].space_id == "alice/quantspace"
    assert wait(alice, job).status.stage == "COMPLETED"
    assert list(alice.fetch_job_logs(job_id=job.id, namespace="alice")) == ["from the space"]


def test_failed_job_reports_its_exit_code(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "import sys; print('about to fail'); sys.exit(3)")
    done = wait(alice, job)
    assert done.status.stage == "ERROR" and "exit code: 3" in done.status.message
    assert hub.jobs.jobs[job.id].exit_code == 3
    assert list(alice.fetch_job_logs(job_id=job.id, namespace="alice")) == ["about to fail"]


def test_job_past_its_timeout_is_killed(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "import time; print('sleeping', flush=True); time.sleep(60)", timeout=1)
    started = time.monotonic()
    done = wait(alice, job)
    assert done.status.stage == "ERROR" and "timed out" in done.status.message
    assert time.monotonic() - started < 10
    assert not alive(hub.jobs.jobs[job.id].pid)
    assert list(alice.fetch_job_logs(job_id=job.id, namespace="alice")) == ["sleeping"]


def test_follow_streams_lines_while_the_job_runs(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(1)")
    lines = alice.fetch_job_logs(job_id=job.id, namespace="alice", follow=True)
    assert next(iter(lines)) == "tick 0"
    first_at = time.monotonic()
    assert alice.inspect_job(job_id=job.id, namespace="alice").status.stage == "RUNNING"
    assert list(lines) == ["tick 1", "tick 2"]  # each line once, in order; returns when the Job ends
    assert time.monotonic() - first_at > 1.5
    assert alice.inspect_job(job_id=job.id, namespace="alice").status.stage == "COMPLETED"


def test_logs_without_follow_return_what_is_there(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "import time\nfor i in range(40):\n    print('tick', i, flush=True); time.sleep(0.25)")
    wait_for_line(hub, job, "tick 2")
    started = time.monotonic()
    lines = list(alice.fetch_job_logs(job_id=job.id, namespace="alice"))
    # The stream replays what was logged, then the client stops at the first line after the request's second.
    assert time.monotonic() - started < 4
    assert len(lines) >= 3 and lines == [f"tick {i}" for i in range(len(lines))]
    assert alice.inspect_job(job_id=job.id, namespace="alice").status.stage == "RUNNING"
    alice.cancel_job(job_id=job.id, namespace="alice")
    done = list(alice.fetch_job_logs(job_id=job.id, namespace="alice"))
    assert done[: len(lines)] == lines
    assert list(alice.fetch_job_logs(job_id=job.id, namespace="alice", tail=2)) == done[-2:]


def test_cancel_kills_the_process_group(hub: HubServer, alice: HfApi) -> None:
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print('child', child.pid, flush=True)\n"
            "time.sleep(60)")
    job = run(alice, code)
    child = int(wait_for_line(hub, job, "child ").split()[1])
    pid = hub.jobs.jobs[job.id].pid
    assert alive(pid) and alive(child)
    alice.cancel_job(job_id=job.id, namespace="alice")
    assert wait(alice, job).status.stage == "CANCELED"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert gone(child)


def test_cancel_kills_a_job_ignoring_sigterm(hub: HubServer, alice: HfApi) -> None:
    hub.jobs.kill_grace_s = 0.5
    job = run(alice, "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                     "print('stubborn', flush=True)\ntime.sleep(60)")
    wait_for_line(hub, job, "stubborn")
    alice.cancel_job(job_id=job.id, namespace="alice")
    assert wait(alice, job).status.stage == "CANCELED"
    assert hub.jobs.jobs[job.id].exit_code == -9 and not alive(hub.jobs.jobs[job.id].pid)


def test_list_jobs_by_namespace_stage_and_label(hub: HubServer, alice: HfApi) -> None:
    a = run(alice, "print('a')", labels={"kind": "a"})
    b = run(alice, "import sys; sys.exit(1)", labels={"kind": "b"})
    org = run(alice, "print('org')", namespace="quantorg")
    for job, namespace in ((a, "alice"), (b, "alice"), (org, "quantorg")):
        wait(alice, job, namespace)
    assert [j.id for j in alice.list_jobs(namespace="alice")] == [a.id, b.id]
    assert [j.id for j in alice.list_jobs(namespace="alice", labels={"kind": "b"})] == [b.id]
    assert [j.id for j in alice.list_jobs(namespace="alice", status="ERROR")] == [b.id]
    assert [j.id for j in alice.list_jobs(namespace="alice", status=["COMPLETED", "ERROR"])] == [a.id, b.id]
    [org_job] = alice.list_jobs(namespace="quantorg")
    assert org_job.id == org.id and org_job.owner.type == "org" and org_job.owner.name == "quantorg"


def test_hardware_list_and_unknown_flavor(hub: HubServer, alice: HfApi) -> None:
    hardware = {hw.name: hw for hw in alice.list_jobs_hardware()}
    assert {"cpu-basic", "cpu-upgrade", "t4-small", "l4x1", "a10g-large", "a100-large", "h200"} <= set(hardware)
    assert hardware["cpu-basic"].accelerator is None and hardware["cpu-basic"].unit_label == "minute"
    h200 = hardware["h200"]
    assert h200.accelerator.model == "H200" and h200.accelerator.vram == "141 GB"
    assert h200.unit_cost_usd > hardware["cpu-basic"].unit_cost_usd

    hub.jobs.hardware = [hw for hw in hub.jobs.hardware if hw["name"] in ("cpu-basic", "h200")]
    assert [hw.name for hw in alice.list_jobs_hardware()] == ["cpu-basic", "h200"]
    with pytest.raises(BadRequestError) as err:
        run(alice, "print(1)", flavor="t4-small")
    assert "t4-small" in str(err.value)
    assert not hub.jobs.jobs


def test_who_may_run_and_see_jobs(hub: HubServer, alice: HfApi) -> None:
    bob = HfApi(token=BOB_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        run(bob, "print(1)", namespace="alice")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        run(HfApi(token=False), "print(1)", namespace="alice")
    assert err.value.response.status_code == 401

    hub.add_user("carol", "hf_carol_token", jobs=False)
    carol = HfApi(token="hf_carol_token")
    with pytest.raises(HfHubHTTPError) as err:
        run(carol, "print(1)", namespace="carol")
    assert err.value.response.status_code == 403 and "job.write" in str(err.value)
    token = carol.whoami()["auth"]["accessToken"]
    assert token["role"] == "fineGrained"
    granted = token["fineGrained"]["global"] + [p for s in token["fineGrained"]["scoped"] for p in s["permissions"]]
    assert "repo.write" in granted and not any(p.startswith("job.") for p in granted)
    assert alice.whoami()["auth"]["accessToken"]["role"] == "write"
    assert not hub.jobs.jobs

    job = run(alice, "print(1)")
    with pytest.raises(HfHubHTTPError) as err:
        bob.inspect_job(job_id=job.id, namespace="alice")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        list(bob.list_jobs(namespace="alice"))
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        bob.cancel_job(job_id=job.id, namespace="alice")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        alice.inspect_job(job_id=job.id, namespace="quantorg")  # another namespace's id
    assert err.value.response.status_code == 404
    assert wait(alice, job).status.stage == "COMPLETED"


def test_job_reaches_the_hub_with_its_secret_token(hub: HubServer, alice: HfApi) -> None:
    job = run(alice, "from huggingface_hub import HfApi; print('I am', HfApi().whoami()['name'])",
              secrets={"HF_TOKEN": ALICE_TOKEN})
    assert wait(alice, job).status.stage == "COMPLETED", hub.jobs.jobs[job.id].log_lines
    assert list(alice.fetch_job_logs(job_id=job.id, namespace="alice")) == ["I am alice"]
    assert ("GET", "/api/whoami-v2") in hub.requests_log


def test_stopping_the_hub_kills_its_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer(root=tmp_path / "hub") as server:
        server.add_user("alice", ALICE_TOKEN)
        point_client_at(server.url, tmp_path / "hf_home", monkeypatch)
        job = run(HfApi(token=ALICE_TOKEN), "import time; print('up', flush=True); time.sleep(60)")
        wait_for_line(server, job, "up")
        pid = server.jobs.jobs[job.id].pid
    assert server.jobs.jobs[job.id].stage == "CANCELED" and not alive(pid)
