"""Faults: nothing lost, nothing half-done.

Each test injects one fault (a Hub answering 5xx/429 or cutting connections, a disk that fills up, the process
killed with SIGKILL at a stage) and checks what a user relies on: one clear error line, no partial file in the
output folder, no half-pushed repo, temp space freed, and the same command run again succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantspace import retry
from quantspace.report import Report
from tests.hub_fixtures import ALICE_TOKEN
from tests.test_pipeline import ROOT, run_cli, seed

SAFETENSORS_GET = r"/resolve/[^/]+/model\.safetensors$"
COMMIT = r"^/api/models/[^/]+/[^/]+/commit/"


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    """Our backoff waits, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(retry, "sleep", recorded.append)
    monkeypatch.setattr(retry, "BACKOFF_S", 0.05)
    return recorded


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch) -> Path:
    """A private TMPDIR, to see what a job leaves in temp space."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(out_dir: Path, tmp: Path) -> list[str]:
    """Staging folders beside the output and job folders in temp space."""
    staged = [p.name for p in out_dir.parent.glob(".quantspace-partial-*")]
    work = [p.name for p in tmp.glob("quantspace-*")]
    return staged + work


def one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# -- Downloads -------------------------------------------------------------------------------------------------

def test_download_busy_hub_is_retried(hub, tiny_bpe, tmp_path, tmpdir_env, waits):
    from quantspace import quantize

    seed(hub, "quantorg/tiny", tiny_bpe)
    # huggingface_hub waits out a 429 on a download itself (honouring Retry-After); 5xx are ours to retry.
    hub.inject(SAFETENSORS_GET, [503, {"status": 429, "retry_after": 1}, 500], method="GET", whole_files=True)
    report = quantize("quantorg/tiny", variants="F16", out=tmp_path / "out", no_eval=True)
    assert [f for _, _, f in hub.faults_log] == ["503", str({"status": 429, "retry_after": 1}), "500"]
    assert waits == [retry.BACKOFF_S, 2 * retry.BACKOFF_S]   # our backoff, once per 5xx
    assert report.files[0].size_bytes == (tmp_path / "out" / "tiny-F16.gguf").stat().st_size > 0
    assert leftovers(tmp_path / "out", tmpdir_env) == []


@pytest.mark.parametrize("fault", ["truncate", "drop", "corrupt"])
def test_download_cut_short_or_spoiled_is_never_used(hub, tiny_bpe, tmp_path, tmpdir_env, waits, fault):
    """A weights file that arrives short, not at all, or with wrong bytes is fetched again; the output is
    exactly what the intact file gives."""
    from quantspace import quantize

    seed(hub, "quantorg/tiny-llama-bpe", tiny_bpe)   # the same name as the folder: the same GGUF metadata
    hub.inject(SAFETENSORS_GET, [fault], method="GET", whole_files=True)
    quantize("quantorg/tiny-llama-bpe", variants="F16", out=tmp_path / "hub", no_eval=True)
    quantize(str(tiny_bpe), variants="F16", out=tmp_path / "local", no_eval=True)
    assert hub.faults_log and hub.faults_log[0][2] == fault
    gets = [p for m, p in hub.requests_log if m == "GET" and p.endswith("/model.safetensors")]
    assert len(gets) >= 2   # fetched again after the bad try
    name = "tiny-llama-bpe-F16.gguf"
    assert sha256(tmp_path / "hub" / name) == sha256(tmp_path / "local" / name)
    # The file in the cache is the intact one.
    cached = next(Path(os.environ["HF_HUB_CACHE"]).rglob("model.safetensors"))
    assert sha256(cached) == sha256(tiny_bpe / "model.safetensors")


def test_download_that_keeps_failing_is_one_clear_error(hub, tiny_bpe, tmp_path, tmpdir_env, waits, capsys,
                                                        monkeypatch):
    seed(hub, "quantorg/tiny", tiny_bpe)
    hub.inject(SAFETENSORS_GET, [503] * 20, method="GET", whole_files=True)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["quantize", "quantorg/tiny", "--no-eval", "--push", "alice/tiny-GGUF",
                            "--out", str(out_dir)], capsys)
    line = one_error_line(err)
    assert code == 2 and "Downloading quantorg/tiny failed after" in line and "HTTP 503" in line, line
    assert len(waits) == retry.ATTEMPTS - 1 and waits == sorted(waits)   # bounded, growing backoff
    assert not out_dir.exists() and leftovers(out_dir, tmpdir_env) == []
    from huggingface_hub import HfApi

    assert not HfApi().repo_exists("alice/tiny-GGUF", token=ALICE_TOKEN)


# -- Uploads ---------------------------------------------------------------------------------------------------

def _push(capsys, tmp_path, target="alice/tiny-GGUF") -> tuple[int, str, str]:
    return run_cli(["quantize", "quantorg/tiny", "--variants", "Q8_0", "--no-eval", "--push", target,
                    "--out", str(tmp_path / "out")], capsys)


def _our_commits(hub, repo_id: str) -> list[dict]:
    return [c for c in hub.commits(repo_id) if c["title"] != "initial commit"]


def test_upload_busy_hub_is_retried_with_backoff(hub, tiny_bpe, tmp_path, tmpdir_env, waits, capsys, monkeypatch):
    seed(hub, "quantorg/tiny", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    hub.inject(COMMIT, [{"status": 429, "retry_after": 5}, 503, 500], method="POST")
    hub.inject(r"/preupload/", [502], method="POST")   # huggingface_hub retries this one itself
    code, out, err = _push(capsys, tmp_path)
    assert code == 0, err
    assert len(hub.faults_log) == 4
    assert waits[0] >= 5 and len(waits) == 3   # Retry-After honoured, then our backoff
    commits = _our_commits(hub, "alice/tiny-GGUF")
    assert len(commits) == 1 and {"tiny-Q8_0.gguf", "README.md", "quantspace.json"} <= set(commits[0]["files"])
    assert (tmp_path / "out" / "tiny-Q8_0.gguf").read_bytes() == hub.files("alice/tiny-GGUF")["tiny-Q8_0.gguf"]


@pytest.mark.parametrize("fault", ["drop", "truncate"])
def test_lost_commit_answer_does_not_commit_twice(hub, tiny_bpe, tmp_path, tmpdir_env, waits, capsys, monkeypatch,
                                                  fault):
    """The Hub commits but its answer never arrives: the repo's head shows it landed; no second commit."""
    seed(hub, "quantorg/tiny", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    hub.inject(COMMIT, [fault], method="POST")
    code, out, err = _push(capsys, tmp_path)
    assert code == 0, err
    assert hub.faults_log == [("POST", "/api/models/alice/tiny-GGUF/commit/main", fault)]
    assert len(_our_commits(hub, "alice/tiny-GGUF")) == 1
    assert "pushed:" in out and (tmp_path / "out" / "quantspace.json").is_file()


def test_lost_commit_answer_and_a_foreign_commit_is_not_taken_for_ours(hub, tiny_bpe, tmp_path, waits):
    """If someone else's commit moved the head, the retry (pinned to the old parent) is refused: no 2nd commit."""
    from quantspace.errors import PushError
    from quantspace.hub import push_folder

    hub.create_repo("alice/shared")
    (tmp_path / "a.txt").write_text("ours")
    real = hub._faults.apply

    def foreign_then_fail(handler, path):   # another writer commits just before our commit fails
        if handler.command == "POST" and "/commit/" in path and not hub.faults_log:
            hub.put_file("alice/shared", "b.txt", b"theirs")
            hub.inject(COMMIT, [503])
        return real(handler, path)

    hub._faults.apply = foreign_then_fail
    with pytest.raises(PushError, match="changed on the Hub during the upload"):
        push_folder(tmp_path, ["a.txt"], "alice/shared", ALICE_TOKEN, False, "msg")
    assert [c["title"] for c in hub.commits("alice/shared")] == ["initial commit", "Upload b.txt"]


def test_upload_that_keeps_failing_removes_the_repo_it_created(hub, tiny_bpe, tmp_path, tmpdir_env, waits,
                                                               capsys, monkeypatch):
    seed(hub, "quantorg/tiny", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    hub.inject(COMMIT, [503] * 20, method="POST")
    code, _, err = _push(capsys, tmp_path)
    line = one_error_line(err)
    assert code == 2 and "Upload to alice/tiny-GGUF failed, nothing was committed" in line
    assert f"HTTP 503 after {retry.ATTEMPTS} tries" in line
    from huggingface_hub import HfApi

    assert not HfApi().repo_exists("alice/tiny-GGUF", token=ALICE_TOKEN)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out", tmpdir_env) == []
    # The same command succeeds once the Hub is well again.
    hub._faults._rules.clear()
    code, _, err = _push(capsys, tmp_path)
    assert code == 0, err
    assert len(_our_commits(hub, "alice/tiny-GGUF")) == 1


# -- Disk full -------------------------------------------------------------------------------------------------

def _cli_with_file_limit(args: list[str], limit: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in a subprocess that may not write files larger than `limit` bytes (EFBIG, like a full disk)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            "from quantspace.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_disk_full_during_conversion_names_the_disk_and_the_need(tiny_bpe, tmp_path, tmpdir_env):
    out_dir = tmp_path / "out"
    args = ["quantize", str(tiny_bpe), "--variants", "Q4_K_M", "--no-eval", "--out", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    weights = (tiny_bpe / "model.safetensors").stat().st_size   # float32: the F16 file is about half of it
    proc = _cli_with_file_limit(args, weights // 4, env)
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and f"A file in {tmp_path} hit this process's file-size limit" in line, line
    assert "this job needs about" in line
    assert not out_dir.exists() and leftovers(out_dir, tmpdir_env) == []
    proc = subprocess.run([sys.executable, "-m", "quantspace", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["README.md", "imatrix.gguf", "quantspace.json",
                                                         "tiny-llama-bpe-Q4_K_M.gguf"]


def test_disk_full_error_reports_free_space_and_need(tiny_bpe, tmp_path, tmpdir_env, monkeypatch):
    """ENOSPC from the converter's writer (a full disk) → DiskFullError; the needed size is the estimate's."""
    import errno

    import gguf

    from quantspace import quantize
    from quantspace.errors import DiskFullError
    from quantspace.report import format_size

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(DiskFullError) as info:
        quantize(str(tiny_bpe), variants="Q8_0", out=tmp_path / "out", no_eval=True)
    message = str(info.value)
    monkeypatch.undo()
    from quantspace.estimate import estimate

    est = estimate(str(tiny_bpe), variants=["Q8_0"])
    assert message.startswith(f"Out of disk space in {tmp_path} (") and "free" in message, message
    assert format_size(est.sizes["Q8_0"] + est.work_bytes) in message   # the file and the F16 it is made from
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out", tmpdir_env) == []


# -- SIGKILL ---------------------------------------------------------------------------------------------------

def _stage_seen(marker: str):
    return lambda text, hub: marker in text


def _partial_downloads() -> list[Path]:
    return [p for p in Path(os.environ["HF_HUB_CACHE"]).glob("models--*/blobs/*.incomplete")]


def _download_under_way(text: str, hub) -> bool:
    return any(p.stat().st_size > 0 for p in _partial_downloads() if p.exists())


def _upload_started(text: str, hub) -> bool:
    return any(m == "PUT" and p.startswith("/_lfs/") for m, p in list(hub.requests_log))


# What the CLI prints when the stage after the killed one starts: it must not have been reached.
NEXT_STAGE = {"download": "convert F16", "convert": "imatrix  ", "imatrix": "quantize Q4_K_M",
              "quantize": "evaluate source", "evaluate": "card", "upload": None}
KILL_AT = {
    "download": _download_under_way,
    "convert": _stage_seen("convert F16"),
    "imatrix": _stage_seen("imatrix  "),   # the stage, not "imatrix calibration"
    "quantize": _stage_seen("quantize Q4_K_M"),
    "evaluate": _stage_seen("evaluate source"),
    "upload": _upload_started,
}


def _run_and_kill(cmd: list[str], env: dict[str, str], when, hub, limit_s: float = 600) -> str:
    """Start the CLI, SIGKILL it as soon as `when(stderr so far, hub)` holds; returns what it printed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    text, deadline = "", time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            chunk = proc.stderr.read()
            if chunk:
                text += chunk.decode(errors="replace")
            if when(text, hub):
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
                os.set_blocking(proc.stderr.fileno(), True)
                return text + proc.stderr.read().decode(errors="replace")
            if proc.poll() is not None:
                pytest.fail(f"the run ended (code {proc.returncode}) before the kill point:\n{text[-2000:]}")
            time.sleep(0.005)
        pytest.fail(f"the kill point was not reached in {limit_s} s:\n{text[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return text


@pytest.mark.parametrize("stage", list(KILL_AT))
def test_sigkill_at_each_stage_then_rerun(hub, smollm2, tmp_path, tmpdir_env, monkeypatch, stage):
    seed(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2)
    target, out_dir = "alice/SmolLM2-GGUF", tmp_path / "out"
    cmd = [sys.executable, "-m", "quantspace", "quantize", "HuggingFaceTB/SmolLM2-135M-Instruct",
           "--variants", "Q4_K_M", "--push", target, "--out", str(out_dir), "--ctx", "64", "--chunks", "2",
           "--imatrix-chunks", "4", "--imatrix-ctx", "64"]
    env = {**os.environ, "HF_TOKEN": ALICE_TOKEN, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir_env)}
    printed = _run_and_kill(cmd, env, KILL_AT[stage], hub)
    assert NEXT_STAGE[stage] is None or NEXT_STAGE[stage] not in printed, printed[-2000:]

    # Killed: no file in the output folder, and nothing half-pushed (the upload is one commit).
    assert not out_dir.exists() or not any(out_dir.iterdir())
    from huggingface_hub import HfApi

    if HfApi().repo_exists(target, token=ALICE_TOKEN):
        assert _our_commits(hub, target) == []
    assert len(list(out_dir.parent.glob(".quantspace-partial-*"))) == 1   # what the rerun must clean
    assert bool(_partial_downloads()) == (stage == "download")   # a killed download leaves a partial file

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert leftovers(out_dir, tmpdir_env) == [] and _partial_downloads() == []
    names = {"SmolLM2-135M-Instruct-Q4_K_M.gguf", "imatrix.gguf", "README.md", "quantspace.json"}
    assert {p.name for p in out_dir.iterdir()} == names
    report = Report.load(out_dir / "quantspace.json")
    gguf_file = out_dir / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    assert report.files[0].size_bytes == gguf_file.stat().st_size
    assert report.files[0].metrics["kld_mean"] < 0.5   # a real, measured quantization of the model
    commits = _our_commits(hub, target)
    assert len(commits) == 1 and names <= set(commits[0]["files"])
    assert hub.files(target)["SmolLM2-135M-Instruct-Q4_K_M.gguf"] == gguf_file.read_bytes()
    assert json.loads(hub.files(target)["quantspace.json"]) == report.to_dict()


# -- Staging folders -------------------------------------------------------------------------------------------

def test_sweep_removes_only_folders_no_running_job_holds(tmp_path):
    from quantspace import scratch

    live = scratch.LockedDir(tmp_path, "job-")
    dead = scratch.LockedDir(tmp_path, "job-")
    (dead.path / "half.gguf.partial").write_bytes(b"x")
    assert dead._fd is not None
    os.close(dead._fd)   # what the kernel does when its process dies
    dead._fd = None
    assert scratch.sweep(tmp_path, "job-") == [dead.path]
    assert live.path.is_dir() and not dead.path.exists()
    live.close()
    assert not live.path.exists()


# -- The test Hub's fault injection itself ---------------------------------------------------------------------

def test_hub_faults_do_what_they_say(hub, tiny_bpe):
    """Status faults answer instead of the Hub; "truncate" sends fewer bytes than announced; "drop" no answer."""
    import http.client
    from urllib.parse import urlsplit

    seed(hub, "quantorg/tiny", tiny_bpe)
    size = (tiny_bpe / "model.safetensors").stat().st_size
    hub.inject(SAFETENSORS_GET, [{"status": 429, "retry_after": 3}, "truncate", "drop"], method="GET",
               whole_files=True)
    host = urlsplit(hub.url)

    def get() -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.request("GET", "/quantorg/tiny/resolve/main/model.safetensors")
        return conn.getresponse()

    r = get()
    assert r.status == 429 and r.getheader("Retry-After") == "3"
    r = get()
    assert r.status == 200 and int(r.getheader("Content-Length")) == size
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        get()
    r = get()   # the faults are used up: served normally
    assert r.status == 200 and len(r.read()) == size
    assert [f for *_, f in hub.faults_log] == [str({"status": 429, "retry_after": 3}), "truncate", "drop"]
