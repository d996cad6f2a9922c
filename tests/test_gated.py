"""Gated source repos (the Llama and Gemma kind): metadata is public, files need an accepted licence.

The preflight and the CLI tell a visitor who has not been granted access where to accept the licence, before
anything runs; a granted visitor goes through. The test Hub behaves like the real one (401/403 GatedRepo).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download
from huggingface_hub.errors import GatedRepoError

from quantspace.preflight import Hardware, preflight
from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN
from tests.test_pipeline import run_cli, seed

GATED = "metaorg/tiny-gated"  # owned by neither test user
GIB = 2**30


@pytest.fixture
def gated(hub, tiny_bpe: Path):
    seed(hub, GATED, tiny_bpe, gated=True)
    return hub


def cpu() -> Hardware:
    return Hardware("cpu", ram=16 * GIB, disk_free=100 * GIB)


def licence_page(hub) -> str:
    return f"{hub.url}/{GATED}"


def test_hub_serves_metadata_to_all_and_files_to_granted_users(gated):
    gated.grant(GATED, "bob")
    for token in (None, ALICE_TOKEN, BOB_TOKEN):
        info = HfApi().model_info(GATED, token=token, files_metadata=True)
        assert info.gated and "config.json" in {s.rfilename for s in info.siblings}
    for token, status in ((None, 401), (ALICE_TOKEN, 403)):
        with pytest.raises(GatedRepoError) as refused:
            hf_hub_download(GATED, "config.json", token=token)
        assert refused.value.response.status_code == status
        with pytest.raises(GatedRepoError):  # safetensors headers are file content too
            get_safetensors_metadata(GATED, token=token)
    config = Path(hf_hub_download(GATED, "config.json", token=BOB_TOKEN))
    assert config.read_bytes() == gated.files(GATED)["config.json"]
    assert get_safetensors_metadata(GATED, token=BOB_TOKEN).files_metadata


def test_preflight_of_a_granted_visitor_is_ok(gated):
    gated.grant(GATED, "bob")
    pre = preflight(GATED, "gguf", ["Q8_0"], token=BOB_TOKEN, evaluate=False, hardware=cpu())
    assert pre.problems == [] and pre.ok
    assert pre.parameters and pre.sizes["Q8_0"] > 0


def test_preflight_of_a_visitor_not_granted_links_the_licence(gated):
    gated.grant(GATED, "bob")
    pre = preflight(GATED, "gguf", ["Q8_0"], token=ALICE_TOKEN, evaluate=False, hardware=cpu())
    assert not pre.ok and len(pre.problems) == 1
    problem = pre.problems[0]
    assert licence_page(gated) in problem and "licence" in problem and "sign in" not in problem.lower()


def test_preflight_signed_out_says_sign_in_and_links_the_licence(gated):
    pre = preflight(GATED, "gguf", ["Q8_0"], token=None, evaluate=False, hardware=cpu())
    assert not pre.ok and len(pre.problems) == 1
    problem = pre.problems[0]
    assert "sign in" in problem.lower() and licence_page(gated) in problem


def test_cli_on_a_gated_repo_not_granted_says_one_line(gated, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    out_dir = tmp_path / "out"
    for args in (["estimate", GATED], ["quantize", GATED, "--variants", "Q8_0", "--no-eval", "--out", str(out_dir)]):
        code, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err  # the CLI's exit code for a user error
        assert lines[0].startswith("error: ") and licence_page(gated) in lines[0]
    assert not out_dir.exists()
    # Once granted, the same command works.
    gated.grant(GATED, "alice")
    code, out, err = run_cli(["estimate", GATED], capsys)
    assert code == 0 and "parameters" in out, err
