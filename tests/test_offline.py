"""Without a reachable Hub: the app starts (sign-in off, the reason on the page), the CLI works on models in the
local Hub cache and answers one line for anything else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.hub_fixtures import ALICE_TOKEN
from tests.test_app import TINY, launch_app_env
from tests.test_ui_browser import ROOT, free_port, wait_http

pytestmark = pytest.mark.filterwarnings("ignore:Gradio does not support OAuth")


def account_text(url: str) -> str:
    """What the page's account line says (from the app's config, as the browser gets it)."""
    with urllib.request.urlopen(url + "config", timeout=10) as r:
        config = json.load(r)
    texts = [c["props"].get("value") for c in config["components"] if c["props"].get("elem_id") == "account"]
    assert len(texts) == 1
    return texts[0]


def start_app(env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    log = open(tmp / f"app-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, proc)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError((tmp / f"app-{port}.log").read_text(errors="replace")[-3000:]) from None
    return proc, url


@pytest.fixture
def offline_env(hub, tiny_bpe, tmp_path, monkeypatch):
    """alice's token is this machine's login; the tiny model is in the local Hub cache (downloaded once)."""
    launch_app_env(tmp_path, monkeypatch, hub, tiny_bpe)
    from huggingface_hub import snapshot_download

    snapshot_download(TINY)
    return {**os.environ, "QUANTSPACE_TEST_TINY": str(tiny_bpe)}


@pytest.mark.parametrize("why, change, reason", [
    ("offline", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1 is set"),
    ("no network", {"HF_ENDPOINT": "http://127.0.0.1:9"}, "could not be reached"),
    ("revoked token", {"HF_TOKEN": "hf_revoked"}, "token was rejected"),
])
def test_app_starts_with_sign_in_off_and_says_why(offline_env, tmp_path, why, change, reason):
    from gradio_client import Client

    proc, url = start_app({**offline_env, **change}, tmp_path)
    try:
        text = account_text(url)
        assert text.startswith("**Sign-in is off**") and reason in text, text
        # Nothing needs the Hub to check a local folder.
        client = Client(url, verbose=False)
        pre = client.predict(offline_env["QUANTSPACE_TEST_TINY"], "gguf", ["Q8_0"], "", False, "",
                             api_name="/preflight")
        assert pre["ok"], pre["problems"]
        if why == "offline":   # and a model in the local Hub cache is found there
            pre = client.predict(TINY, "gguf", ["Q8_0"], "", False, "", api_name="/preflight")
            assert pre["ok"] and "in the local Hub cache" in " ".join(pre["checks"]), pre
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantspace", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_offline_uses_the_local_hub_cache(offline_env, tmp_path):
    env = {**offline_env, "HF_HUB_OFFLINE": "1"}
    est = cli(["estimate", TINY, "--json"], env)
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["source"] == TINY
    out = tmp_path / "out"
    run = cli(["quantize", TINY, "--variants", "Q8_0", "--no-eval", "--out", str(out)], env)
    assert run.returncode == 0, run.stderr
    assert (out / "tiny-llama-Q8_0.gguf").read_bytes()[:4] == b"GGUF"
    report = json.loads((out / "quantspace.json").read_text())
    assert report["source"] == TINY and len(report["revision"]) == 40


@pytest.mark.parametrize("args, message", [
    (["estimate", "quantorg/not-cached"], "quantorg/not-cached is not in the local Hub cache and HF_HUB_OFFLINE=1 is set"),
    (["quantize", "quantorg/not-cached", "--no-eval"], "quantorg/not-cached is not in the local Hub cache"),
    (["quantize", TINY, "--variants", "Q8_0", "--no-eval", "--push", "alice/x"], "Pushing needs the Hub and "
                                                                               "HF_HUB_OFFLINE=1 is set"),
])
def test_cli_offline_answers_one_line(offline_env, tmp_path, args, message):
    run = cli([*args, "--out", str(tmp_path / "out")] if args[0] == "quantize" else args,
              {**offline_env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], run.stderr
    assert not (tmp_path / "out").exists()


def test_a_partly_cached_model_is_refused_offline(offline_env, hub, tmp_path):
    """Only config.json in the cache (a preflight ran, the weights never came): refused, never half-used."""
    from huggingface_hub import hf_hub_download

    hub.create_repo("quantorg/config-only")
    hub.upload_folder("quantorg/config-only", Path(offline_env["QUANTSPACE_TEST_TINY"]))
    hf_hub_download("quantorg/config-only", "config.json")
    run = cli(["estimate", "quantorg/config-only"], {**offline_env, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("error: Only part of quantorg/config-only is in the local Hub cache"), run.stderr
    assert ALICE_TOKEN not in run.stderr
