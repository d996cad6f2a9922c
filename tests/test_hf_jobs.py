"""The same job on Hugging Face Jobs, from the CLI and the Python API: the real huggingface_hub client against the
local test Hub, which runs each Job's command (`python -m quantspace quantize ...`) as a local subprocess."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from quantspace import hf_jobs
from quantspace.cli import main
from quantspace.errors import AuthError, BadOptionError
from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN

TINY = "alice/tiny-llama"
IMAGE = "hf.co/spaces/alice/QuantSpace"
FAST = ["--variants", "Q8_0", "--ctx", "64", "--chunks", "2", "--imatrix", "off"]


@pytest.fixture
def jobs_hub(hub, tiny_bpe, monkeypatch):
    """The test Hub with alice's tiny model, alice logged in on this machine, the Jobs image set."""
    hub.create_repo(TINY)
    hub.upload_folder(TINY, tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv(hf_jobs.IMAGE_ENV, IMAGE)
    return hub


def _repo_exists(hub, repo_id: str) -> bool:
    return any(r.repo_id == repo_id for r in hub._repos.values())


def test_cli_runs_the_job_on_hf_jobs_and_the_token_is_only_a_secret(jobs_hub, capsys):
    """Plan (cheapest flavor that fits, its price, the estimate), start, follow the stages from the Job's log,
    exit 0, the result pushed from the Job in one commit; the token nowhere but the Job's secret."""
    code = main(["quantize", TINY, *FAST, "--on-hf-jobs", "--yes"])
    out = capsys.readouterr()
    assert code == 0, out.err
    [job] = jobs_hub.jobs.jobs.values()
    assert job.spec["flavor"] == "cpu-basic"            # the cheapest; a tiny model fits it
    assert job.spec["spaceId"] == "alice/QuantSpace"
    assert job.spec["secrets"] == {"HF_TOKEN": ALICE_TOKEN}
    command = job.spec["command"] + job.spec.get("arguments", [])
    assert command[:4] == ["python", "-m", "quantspace", "quantize"] and "--push" in command
    assert command[command.index("--push") + 1] == "alice/tiny-llama-GGUF"
    for text in (json.dumps(job.spec["command"]), json.dumps(job.spec["environment"]), "\n".join(job.log_lines),
                 out.out, out.err, *(r.decode() for r in jobs_hub.jobs.responses)):
        assert ALICE_TOKEN not in text
    assert "cpu-basic" in out.err and "$" in out.err and "min" in out.err     # the plan, before it started
    assert re.search(r"quantize Q8_0\s+100%", out.err)                     # stage progress from the Job's log
    assert "pushed: " in out.out and "tiny-llama-Q8_0.gguf" in out.out       # the report's table
    files = jobs_hub.files("alice/tiny-llama-GGUF")
    assert {"tiny-llama-Q8_0.gguf", "README.md", "quantspace.json"} <= set(files)
    assert len(jobs_hub._repos[("model", "alice/tiny-llama-GGUF")].commits) == 2   # .gitattributes + one push


def test_detach_prints_the_job_and_returns(jobs_hub, capsys):
    code = main(["quantize", TINY, *FAST, "--on-hf-jobs", "cpu-upgrade", "--yes", "--detach"])
    out = capsys.readouterr()
    assert code == 0
    [job] = jobs_hub.jobs.jobs.values()
    assert out.out.strip() == job.id and job.spec["flavor"] == "cpu-upgrade" and job.id in out.err
    state = hf_jobs.status(job.id, "alice", ALICE_TOKEN)
    assert state.stage in ("SCHEDULING", "RUNNING", "COMPLETED") and state.url.endswith(job.id)
    hf_jobs.cancel(job.id, "alice", ALICE_TOKEN)


def test_a_job_that_fails_shows_its_last_lines_and_leaves_no_repo(jobs_hub, capsys):
    """A Job stopped by its timeout: exit 1, the Job's stage and last lines, and the target repo it may have
    created is gone."""
    code = main(["quantize", TINY, *FAST, "--on-hf-jobs", "--yes", "--job-timeout", "1s"])
    err = capsys.readouterr().err
    assert code == 1
    assert "ended ERROR" in err and "timed out" in err
    assert not _repo_exists(jobs_hub, "alice/tiny-llama-GGUF")


def test_python_api_follows_and_cancels(jobs_hub):
    """quantspace.hf_jobs.submit: the plan says what it costs; cancel stops the Job's process and leaves no repo."""
    job = hf_jobs.submit(TINY, "gguf", "Q8_0", flavor="auto", ctx=64, max_chunks=2, options={"imatrix": "off"})
    assert job.plan.flavor.name == "cpu-basic" and job.plan.cost_usd > 0 and job.plan.timeout_s >= 30 * 60
    hub_job = jobs_hub.jobs.jobs[job.id]
    deadline = time.monotonic() + 60
    while hub_job.pid is None:             # its process has started (the pipeline runs in it)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.cancel()
    assert job.status().stage == "CANCELED"
    with pytest.raises(ProcessLookupError):
        os.kill(hub_job.pid, 0)
    assert not _repo_exists(jobs_hub, "alice/tiny-llama-GGUF")


def test_quantize_on_hf_jobs_returns_the_pushed_report(jobs_hub):
    from quantspace import quantize

    stages = []
    report = quantize(TINY, variants="Q8_0", ctx=64, max_chunks=2, options={"imatrix": "off"},
                      on_hf_jobs="auto", push="alice/tiny-api-GGUF", progress=lambda s, d, t: stages.append(s))
    assert report.repo_id == "alice/tiny-api-GGUF" and report.files[0].variant == "Q8_0"
    assert report.files[0].metrics["kld_mean"] is not None and "quantize Q8_0" in stages


def test_a_token_without_the_jobs_permission_is_one_line_before_anything_starts(jobs_hub, monkeypatch, capsys):
    jobs_hub.add_user("carol", "hf_carol_token", jobs=False)
    monkeypatch.setenv("HF_TOKEN", "hf_carol_token")
    jobs_hub.create_repo("carol/tiny")
    code = main(["quantize", TINY, *FAST, "--on-hf-jobs", "--yes"])
    err = capsys.readouterr().err
    assert code == 2 and "may not start Jobs" in err and "Jobs permission" in err
    assert not jobs_hub.jobs.jobs
    with pytest.raises(AuthError, match="cannot start Jobs in 'alice'"):
        hf_jobs.make_plan(TINY, token=BOB_TOKEN, namespace="alice")


def test_the_flavor_must_fit_the_job():
    small = hf_jobs.Flavor("cpu-basic", "CPU Basic", 2, 16 * 10**9, 50 * 10**9, 0, 0, None, 0.0002)
    big = hf_jobs.Flavor("cpu-xl", "CPU XL", 16, 124 * 10**9, 1000 * 10**9, 0, 0, None, 0.017)
    gpu = hf_jobs.Flavor("l4x1", "1x L4", 8, 30 * 10**9, 400 * 10**9, 1, 24 * 10**9, "L4", 0.013)
    needs = hf_jobs.Needs(ram=40 * 10**9, disk=200 * 10**9, gpu_memory=0, parameters=8 * 10**9,
                          source_bytes=16 * 10**9)
    assert hf_jobs.pick(needs, [small, gpu, big]) == big
    with pytest.raises(BadOptionError, match="cpu-basic is too small.*cheapest that fits: cpu-xl"):
        hf_jobs.pick(needs, [small, gpu, big], "cpu-basic")
    with pytest.raises(BadOptionError, match="Unknown Jobs flavor"):
        hf_jobs.pick(needs, [small], "h100x9")
    awq = hf_jobs.needs_of("awq", 8 * 10**9, 40 * 10**9, 16 * 10**9, 2 * 10**9, 5 * 10**9)
    assert hf_jobs.pick(awq, [small, big, gpu]) == gpu        # AWQ wants a GPU
    assert hf_jobs.parse_timeout("90m") == 5400 and hf_jobs.parse_timeout("2h") == 7200
    with pytest.raises(BadOptionError):
        hf_jobs.parse_timeout("soon")


def test_local_files_cannot_go_to_a_job(jobs_hub, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("hello " * 100)
    code = main(["quantize", TINY, *FAST, "--calib-dataset", str(text), "--on-hf-jobs", "--yes"])
    assert code == 2 and "names a file of this machine" in capsys.readouterr().err
    assert not jobs_hub.jobs.jobs
