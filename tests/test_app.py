"""The Space's named API, called with gradio_client against the app on 127.0.0.1 and the local Hub.

One app and one Hub per module (launching is the slow part); each test uses its own target repo.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantspace.pipeline import parameter_count
from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN, point_client_at
from tests.hubserver import HubServer

# Off a Space, Gradio warns that sign-in is mocked with the machine's token: that is what these tests use.
pytestmark = pytest.mark.filterwarnings("ignore:Gradio does not support OAuth")
TINY = "quantorg/tiny-llama"
# An architecture no converter knows (llama.cpp's converter takes GPT-2 and ~280 others).
UNKNOWN = "quantorg/tiny-mystery"
NEWER = {"quantorg/tiny-gemma3": ("spm", "gemma3"), "quantorg/tiny-qwen3": ("bpe", "qwen3")}


@dataclass
class Served:
    url: str
    hub: HubServer
    jobs: Path
    hf_home: Path

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def jobs_left(self) -> list[str]:
        return sorted(p.name for p in self.jobs.iterdir()) if self.jobs.exists() else []

    def files_left(self) -> set[str]:
        """Every file under the job folders (finished jobs keep what they offer for download a while)."""
        if not self.jobs.exists():
            return set()
        return {str(p.relative_to(self.jobs)) for p in self.jobs.rglob("*") if p.is_file()}

    def no_token_written(self) -> None:
        for path in self.jobs.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert ALICE_TOKEN.encode() not in data and BOB_TOKEN.encode() not in data, path


def launch_app_env(tmp: Path, mp: pytest.MonkeyPatch, hub: HubServer, tiny: Path) -> None:
    """Point the client (and subprocesses) at `hub`, alice's token as the machine login; seed two models."""
    hub.add_user("alice", ALICE_TOKEN, orgs=["quantorg"])
    hub.add_user("bob", BOB_TOKEN)
    point_client_at(hub.url, tmp / "hf_home", mp)
    mp.setenv("HF_TOKEN", ALICE_TOKEN)        # the machine's login: Gradio's mocked sign-in uses it
    mp.setenv("QUANTSPACE_JOBS_DIR", str(tmp / "jobs"))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    mp.setenv("QUANTSPACE_JOB_IMAGE", "hf.co/spaces/alice/QuantSpace")   # what Hugging Face Jobs run (not a Space)
    hub.create_repo(TINY)
    hub.upload_folder(TINY, tiny)
    mystery = tmp / "mystery"
    shutil.copytree(tiny, mystery)
    cfg = json.loads((mystery / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (mystery / "config.json").write_text(json.dumps(cfg))
    hub.create_repo(UNKNOWN)
    hub.upload_folder(UNKNOWN, mystery)
    from tests.conftest import _tiny

    for repo, (kind, arch) in NEWER.items():   # the families people type in first today
        hub.create_repo(repo)
        hub.upload_folder(repo, _tiny(f"tiny-{arch}", kind, arch))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bpe):
    tmp = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp, HubServer(root=tmp / "hub") as hub:
        launch_app_env(tmp, mp, hub, tiny_bpe)
        from quantspace.ui import build_demo, launch_kwargs

        demo = build_demo()   # as app.py builds it
        demo.queue(default_concurrency_limit=1)
        _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                                **launch_kwargs())
        try:
            yield Served(url, hub, tmp / "jobs", tmp / "hf_home")
        finally:
            demo.close()


def test_every_action_has_a_named_endpoint(served):
    api = served.client().view_api(print_info=False, return_format="dict")
    named = set(api["named_endpoints"])
    documented = {"/preflight", "/quantize", "/search_models", "/cancel", "/start_job", "/job_status", "/cancel_job"}
    assert not api["unnamed_endpoints"]
    # The page's own handlers are not part of the API (Gradio's LoginButton adds its /_check_login_status).
    assert {n for n in named if not n.startswith("/_")} == documented
    params = {p["parameter_name"]: p["python_type"]["type"] for p in api["named_endpoints"]["/quantize"]["parameters"]}
    assert params["model"] == "str" and params["private"] == "bool" and params["hf_token"] == "str"


def test_search_suggests_hub_models(served):
    client = served.client()
    assert TINY in client.predict("tiny-ll", api_name="/search_models")
    assert client.predict("x", api_name="/search_models") == []   # too short to search


def test_preflight_reports_sizes_before_any_download(served, tiny_bpe):
    pre = served.client().predict(TINY, "gguf", ["Q4_K_M", "Q8_0"], "", True, "", api_name="/preflight")
    assert pre["ok"] and not pre["problems"]
    assert pre["architecture"] == "LlamaForCausalLM"
    assert pre["parameters"] == parameter_count(tiny_bpe)
    # what fetch will take: the weights, tokenizer and chat template files; config.json is in the Hub cache
    # already (the preflight read it)
    assert pre["download_bytes"] == sum(f.stat().st_size for f in tiny_bpe.iterdir() if f.name != "config.json")
    assert set(pre["sizes"]) == {"Q4_K_M", "Q8_0"} and pre["sizes"]["Q4_K_M"] < pre["sizes"]["Q8_0"]
    assert pre["disk_needed"] > pre["download_bytes"] + sum(pre["sizes"].values())
    assert pre["repo_name"] == "tiny-llama-GGUF"
    assert pre["hardware"]["kind"] == "cpu"
    assert not list(served.hf_home.rglob("*.safetensors"))   # headers only, never the weights


@pytest.mark.parametrize("model, target, token, message", [
    ("", "", "", "No model given"),
    ("quantorg/does-not-exist", "", "", "was not found"),
    (UNKNOWN, "", "", "Architecture MysteryForCausalLM is not supported"),
    (TINY, "bob/tiny-llama-GGUF", ALICE_TOKEN, "cannot write to 'bob'"),
])
def test_preflight_explains_problems(served, model, target, token, message):
    pre = served.client().predict(model, "gguf", ["Q8_0"], target, False, token, api_name="/preflight")
    assert not pre["ok"]
    assert any(message in p for p in pre["problems"]), pre["problems"]


def test_quantize_pushes_with_progress(served):
    client = served.client()
    before = served.jobs_left()
    target = "alice/tiny-llama-GGUF"
    job = client.submit(TINY, "gguf", ["Q8_0", "Q4_K_M"], {}, target, False, False, ALICE_TOKEN,
                        api_name="/quantize")
    stages = set()
    while not job.done():
        status = job.status()
        stages |= {p.desc for p in status.progress_data or [] if p.desc}
        time.sleep(0.02)
    report = job.result()
    assert report["repo_id"] == target and report["repo_url"].endswith(target)
    assert [f["variant"] for f in report["files"]] == ["Q8_0", "Q4_K_M"]
    files = served.hub.files(target)
    assert {"tiny-llama-Q8_0.gguf", "tiny-llama-Q4_K_M.gguf", "README.md", "quantspace.json"} <= set(files)
    assert json.loads(files["quantspace.json"])["files"] == report["files"]
    assert stages and stages <= {"download", "imatrix calibration", "convert F16", "imatrix", "quantize Q8_0",
                                 "quantize Q4_K_M", "card", "upload"}
    # Pushed: the job keeps only its report (offered for download) until its retention ends; no weights.
    new = set(served.jobs_left()) - set(before)
    assert len(new) == 1
    kept = {p.name for p in (served.jobs / new.pop()).rglob("*") if p.is_file()}
    assert kept == {"quantspace.json"}
    served.no_token_written()


@pytest.mark.parametrize("target, token, message", [
    ("alice/signed-out-GGUF", "", "Sign in with Hugging Face"),
    ("bob/not-yours-GGUF", ALICE_TOKEN, "cannot write to 'bob'"),
])
def test_refused_push_writes_nothing(served, target, token, message):
    from gradio_client.exceptions import AppError

    before = served.jobs_left()
    with pytest.raises(AppError, match=message):
        served.client().predict(TINY, "gguf", ["Q8_0"], {}, target, False, False, token, api_name="/quantize")
    assert not any(r.repo_id == target for r in served.hub._repos.values())
    assert served.jobs_left() == before


def test_bad_model_through_the_api(served):
    from gradio_client.exceptions import AppError

    client = served.client()
    before = served.jobs_left()
    for model, message in [("", "No model given"), ("quantorg/does-not-exist", "was not found"),
                           (UNKNOWN, "MysteryForCausalLM is not supported")]:
        with pytest.raises(AppError, match=message):
            client.predict(model, "gguf", ["Q8_0"], {}, "", False, False, "", api_name="/quantize")
    with pytest.raises(AppError, match="Unknown GGUF variant"):
        client.predict(TINY, "gguf", ["Q9"], {}, "", False, False, "", api_name="/quantize")
    assert served.jobs_left() == before


def test_cancel_stops_the_job_and_cleans_up(served):
    from gradio_client.exceptions import AppError

    client = served.client()
    before = served.jobs_left()
    target = "alice/cancelled-GGUF"
    job = client.submit(TINY, "gguf", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"], {}, target, False,
                        True, ALICE_TOKEN, api_name="/quantize")
    deadline = time.monotonic() + 60
    while not (job.status().progress_data or job.done()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.predict(api_name="/cancel") is True
    with pytest.raises(AppError, match="Cancelled"):
        job.result()
    assert not any(r.repo_id == target for r in served.hub._repos.values())
    assert served.jobs_left() == before
    assert client.predict(api_name="/cancel") is False   # nothing left to cancel


def repo_exists(hub: HubServer, repo_id: str) -> bool:
    return any(r.repo_id == repo_id for r in hub._repos.values())


def poll_status(client, job_id: str, token: str, until, timeout: float = 180) -> list[dict]:
    """/job_status until `until(status)`; returns every status seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        status = client.predict(job_id, token, api_name="/job_status")
        seen.append(status)
        if until(status):
            return seen
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.05)


def test_a_job_outlives_its_client_and_opens_by_id_for_its_owner_only(served):
    from gradio_client.exceptions import AppError

    target = "alice/detached-GGUF"
    first = served.client()
    started = first.predict(TINY, "gguf", ["Q8_0", "Q4_K_M"], {}, target, False, True, ALICE_TOKEN,
                            api_name="/start_job")
    job_id = started["job_id"]
    assert len(job_id) >= 22 and started["state"] in ("queued", "running")
    first.close()                                  # the client that started it is gone

    other = served.client()                        # e.g. another device of the same user
    seen = poll_status(other, job_id, ALICE_TOKEN, lambda s: s["state"] != "queued" and s["stage"])
    assert seen[-1]["state"] == "running" and seen[-1]["report"] is None
    for token in (BOB_TOKEN, ""):                  # another user, or nobody: refused, with no details
        with pytest.raises(AppError, match="No job with this id is visible to you") as refused:
            other.predict(job_id, token, api_name="/job_status")
        assert target not in str(refused.value)
        with pytest.raises(AppError, match="No job with this id is visible to you"):
            other.predict(job_id, token, api_name="/cancel_job")
    seen += poll_status(other, job_id, ALICE_TOKEN, lambda s: s["state"] != "running")
    final = seen[-1]
    assert final["state"] == "finished", final
    assert final["report"]["repo_id"] == target and final["error"] is None
    assert [f["variant"] for f in final["report"]["files"]] == ["Q8_0", "Q4_K_M"]
    # The log tells the whole story, whatever moments the polls happened to catch.
    assert re.search(r"download.*quantize Q8_0.*quantize Q4_K_M.*evaluate.*upload done.*finished$",
                     "\n".join(final["log"]), re.S), final["log"]
    assert {s["stage"].split()[0] for s in seen if s["stage"]} <= {"download", "imatrix", "convert", "quantize",
                                                                  "evaluate", "card", "upload"}
    assert {"tiny-llama-Q8_0.gguf", "tiny-llama-Q4_K_M.gguf", "quantspace.json"} <= set(served.hub.files(target))
    served.no_token_written()


def test_a_dropped_quantize_call_still_finishes_and_pushes(served):
    client = served.client()
    target = "alice/dropped-GGUF"
    job = client.submit(TINY, "gguf", ["Q8_0"], {}, target, False, False, ALICE_TOKEN, api_name="/quantize")
    deadline = time.monotonic() + 60
    while not job.status().progress_data and time.monotonic() < deadline:
        time.sleep(0.02)
    job.cancel()                                   # the connection goes away mid-run (a closed laptop)
    client.close()
    deadline = time.monotonic() + 180
    while "tiny-llama-Q8_0.gguf" not in (served.hub.files(target) if repo_exists(served.hub, target) else {}):
        assert time.monotonic() < deadline, "the job did not finish after its client dropped"
        time.sleep(0.2)


def test_cancel_by_id_stops_the_job_and_cleans_up(served):
    client = served.client()
    before = served.jobs_left()
    target = "alice/cancel-by-id-GGUF"
    started = client.predict(TINY, "gguf", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"], {}, target,
                             False, True, ALICE_TOKEN, api_name="/start_job")
    job_id = started["job_id"]
    poll_status(client, job_id, ALICE_TOKEN, lambda s: s["state"] == "running" and s["stage"])
    status = served.client().predict(job_id, ALICE_TOKEN, api_name="/cancel_job")   # from any client of hers
    assert status["cancel_requested"] is True
    final = poll_status(client, job_id, ALICE_TOKEN, lambda s: s["state"] != "running")[-1]
    assert final["state"] == "cancelled" and final["error"].startswith("Cancelled") and final["report"] is None
    assert not repo_exists(served.hub, target)
    assert served.jobs_left() == before


def test_results_are_removed_after_the_retention_time(served, monkeypatch):
    from gradio_client.exceptions import AppError

    client = served.client()
    before = served.files_left()
    started = client.predict(TINY, "gguf", ["Q8_0"], {}, "", False, False, "", api_name="/start_job")
    final = poll_status(client, started["job_id"], "", lambda s: s["state"] not in ("queued", "running"))[-1]
    assert final["state"] == "finished" and final["removed_in_s"] > 0
    offered = served.files_left() - before        # not pushed: the files stay for download, with the report
    assert {Path(p).name for p in offered} == {"tiny-llama-Q8_0.gguf", "quantspace.json"}
    monkeypatch.setenv("QUANTSPACE_JOB_RETENTION_S", "0")
    with pytest.raises(AppError, match="No job with this id"):
        client.predict(started["job_id"], "", api_name="/job_status")   # the sweep runs on every status call
    assert not (served.files_left() & offered)


def test_detached_jobs_still_run_one_at_a_time(served):
    client = served.client()
    before = served.jobs_left()
    many = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
    first = client.predict(TINY, "gguf", many, {}, "", False, True, "", api_name="/start_job")["job_id"]
    poll_status(client, first, "", lambda s: s["state"] == "running")
    second = served.client().predict(TINY, "gguf", ["Q8_0"], {}, "", False, False, "", api_name="/start_job")
    assert second["state"] == "queued"
    waiting = poll_status(client, second["job_id"], "", lambda s: s["jobs_ahead"] == 1)[-1]
    assert waiting["state"] == "queued" and "waiting for its turn: 1 job ahead" in waiting["log"][-1]
    assert client.predict(first, "", api_name="/job_status")["state"] == "running"
    client.predict(first, "", api_name="/cancel_job")
    final = poll_status(client, second["job_id"], "", lambda s: s["state"] not in ("queued", "running"))[-1]
    assert final["state"] == "finished"
    assert client.predict(first, "", api_name="/job_status")["state"] == "cancelled"
    assert len(set(served.jobs_left()) - set(before)) == 1      # the finished one keeps its files a while


def test_a_job_on_hugging_face_jobs_through_the_api(served):
    """/start_job with hf_jobs: the Job runs on the (local) Hub's Jobs with the caller's token as its secret only;
    /job_status shows its id, link, flavor and stage progress; the report is the pushed one. /cancel_job on a
    second one cancels the Hugging Face Job: no repo is left."""
    client = served.client()
    target = "alice/tiny-on-jobs-GGUF"
    started = client.predict(model=TINY, method="gguf", variants=["Q8_0"], options={"imatrix": "off"},
                             target=target, evaluate=True, hf_token=ALICE_TOKEN, hf_jobs="auto",
                             api_name="/start_job")
    seen = poll_status(client, started["job_id"], ALICE_TOKEN, lambda s: s["state"] not in ("queued", "running"))
    final = seen[-1]
    assert final["state"] == "finished", final
    assert final["report"]["repo_id"] == target and final["report"]["files"][0]["metrics"]["kld_mean"] is not None
    hf_job = final["hf_job"]
    assert hf_job["flavor"] == "cpu-basic" and hf_job["stage"] == "COMPLETED" and hf_job["url"].endswith(hf_job["id"])
    # Stage progress parsed from the Job's log: one log line per stage, as for a job run here.
    assert any(re.search(r"quantize Q8_0 done$", line) for line in final["log"]), final["log"]
    spec = served.hub.jobs.jobs[hf_job["id"]].spec
    assert spec["secrets"] == {"HF_TOKEN": ALICE_TOKEN} and ALICE_TOKEN not in json.dumps(spec["command"])
    assert "quantspace.json" in served.hub.files(target)
    served.no_token_written()

    second = client.predict(model=TINY, method="gguf", variants=["Q8_0"], options={"imatrix": "off"},
                            target="alice/tiny-cancelled-GGUF", hf_token=ALICE_TOKEN, hf_jobs="cpu-upgrade",
                            api_name="/start_job")
    running = poll_status(client, second["job_id"], ALICE_TOKEN, lambda s: bool(s["hf_job"]))[-1]
    client.predict(second["job_id"], ALICE_TOKEN, api_name="/cancel_job")
    final = poll_status(client, second["job_id"], ALICE_TOKEN, lambda s: s["state"] not in ("queued", "running"))[-1]
    assert final["state"] == "cancelled" and final["hf_job"]["stage"] == "CANCELED", final
    assert served.hub.jobs.jobs[running["hf_job"]["id"]].stage == "CANCELED"
    assert not repo_exists(served.hub, "alice/tiny-cancelled-GGUF")


def test_signed_out_callers_cannot_start_hugging_face_jobs(served):
    from gradio_client.exceptions import AppError

    before = len(served.hub.jobs.jobs)
    with pytest.raises(AppError, match="billed to your account"):
        served.client().predict(model=TINY, hf_jobs="auto", api_name="/start_job")
    assert len(served.hub.jobs.jobs) == before
