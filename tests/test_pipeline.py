"""The whole product path through the CLI and the Python API, against the local Hub."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantspace.cli import main
from quantspace.report import Report
from tests.hub_fixtures import ALICE_TOKEN

ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def seed(hub, repo_id: str, folder: Path, **kwargs) -> None:
    hub.create_repo(repo_id, **kwargs)
    hub.upload_folder(repo_id, folder)


def llama_generate(path: Path) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, seed=0)
    text = llm("The State of the Union is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    return text


def test_push_end_to_end_with_real_model(hub, smollm2, tmp_path, capsys, monkeypatch):
    """Local Hub source → quantize --push → files, card and report on the Hub; llama.cpp runs each file."""
    seed(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2)
    hub.put_file("HuggingFaceTB/SmolLM2-135M-Instruct", "onnx/model.onnx", b"not needed" * 1000)
    hub.put_file("HuggingFaceTB/SmolLM2-135M-Instruct", "README.md", b"---\nlicense: apache-2.0\n---\n# SmolLM2\n")
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    target = "alice/SmolLM2-135M-Instruct-GGUF"
    code, out, err = run_cli(["quantize", "HuggingFaceTB/SmolLM2-135M-Instruct", "--variants", "Q4_K_M,Q8_0",
                              "--push", target, "--out", str(tmp_path / "out"), "--ctx", "128", "--chunks", "4"],
                             capsys)
    assert code == 0, err
    fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests_log if m == "GET" and "/resolve/" in p}
    assert "model.safetensors" in fetched and "model.onnx" not in fetched  # only what the conversion needs
    files = hub.files(target)
    expected = {"SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf", "README.md",
                "quantspace.json"}
    assert expected <= set(files)
    assert len(hub.commits(target)) == 2  # the repo's initial commit + ours: everything in one commit
    assert ALICE_TOKEN not in out + err and all(ALICE_TOKEN.encode() not in b for b in files.values())

    from huggingface_hub import ModelCard, hf_hub_download

    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "gguf"
    assert card.data.license == "apache-2.0"  # carried from the source's card
    assert {"gguf", "q4_k_m", "q8_0"} <= set(card.data.tags)
    assert "llama-cli -hf alice/SmolLM2-135M-Instruct-GGUF" in card.text

    report = Report.from_dict(json.loads(files["quantspace.json"]))
    assert report.revision == hub.repo_info("HuggingFaceTB/SmolLM2-135M-Instruct")["sha"]
    by_variant = {f.variant: f for f in report.files}
    assert by_variant["Q4_K_M"].size_bytes == len(files["SmolLM2-135M-Instruct-Q4_K_M.gguf"])
    q8, q4 = by_variant["Q8_0"].metrics, by_variant["Q4_K_M"].metrics
    assert report.source_metrics["perplexity"] > 1
    assert q8["kld_mean"] < q4["kld_mean"] < 0.5
    assert q8["top1_agreement"] > q4["top1_agreement"] > 0.6
    assert abs(q8["delta_ppl"]) < 0.05 * report.source_metrics["perplexity"]
    # The card shows the numbers the report computed.
    assert f"{q4['perplexity']:.4f}" in card.text
    assert "State of the Union" in card.text

    for name in ("SmolLM2-135M-Instruct-Q4_K_M.gguf", "SmolLM2-135M-Instruct-Q8_0.gguf"):
        path = Path(hf_hub_download(target, name, token=ALICE_TOKEN))
        assert llama_generate(path).strip()
    assert "Q4_K_M" in out and "pushed:" in out


def test_python_api_local_folder(tiny_bpe, tmp_path):
    from quantspace import quantize

    out = tmp_path / "result"
    report = quantize(str(tiny_bpe), variants=["Q4_K_M", "F16", "BF16"], out=out, no_eval=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "imatrix.gguf", "quantspace.json", "tiny-llama-bpe-Q4_K_M.gguf",
                            "tiny-llama-bpe-F16.gguf", "tiny-llama-bpe-BF16.gguf"])
    assert Report.load(out / "quantspace.json") == report
    sizes = {f.variant: f.size_bytes for f in report.files}
    assert sizes["Q4_K_M"] < sizes["F16"] == sizes["BF16"]
    assert 15 < report.files[1].bits_per_weight < 17   # F16 ≈ 16 bits per weight
    card = (out / "README.md").read_text()
    assert report.evaluation is None and "not measured" in card
    assert "llama-cli -m tiny-llama-bpe-Q4_K_M.gguf" in card  # not pushed: usage points at the local file


def test_rerun_keeps_earlier_files_and_leaves_no_intermediate(tiny_bpe, tmp_path):
    from quantspace import quantize

    out = tmp_path / "result"
    quantize(str(tiny_bpe), variants="F16", out=out, no_eval=True)
    f16 = (out / "tiny-llama-bpe-F16.gguf").read_bytes()
    quantize(str(tiny_bpe), variants="Q8_0", out=out, no_eval=True)
    assert (out / "tiny-llama-bpe-F16.gguf").read_bytes() == f16
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "quantspace.json", "tiny-llama-bpe-F16.gguf", "tiny-llama-bpe-Q8_0.gguf"])


def test_estimate_matches_real_sizes(hub, tiny_qwen2, tmp_path, capsys, monkeypatch):
    """Sizes from headers alone are close to what the quantizer really writes, and no weights are fetched."""
    seed(hub, "quantorg/tiny-qwen2", tiny_qwen2)
    code, out, err = run_cli(["estimate", "quantorg/tiny-qwen2", "--json"], capsys)
    assert code == 0, err
    est = json.loads(out)
    assert est["architecture"] == "Qwen2ForCausalLM"
    from quantspace.pipeline import parameter_count

    assert est["parameters"] == parameter_count(tiny_qwen2)
    assert not list(Path(tmp_path).rglob("*.safetensors"))
    from quantspace import quantize

    report = quantize(str(tiny_qwen2), variants="Q8_0,Q4_K_M,Q2_K", out=tmp_path / "o", no_eval=True)
    for f in report.files:
        assert abs(est["sizes"][f.variant] - f.size_bytes) < 0.15 * f.size_bytes, f.variant


def test_private_push_creates_private_repo(hub, tiny_spm, tmp_path, capsys, monkeypatch):
    seed(hub, "quantorg/tiny-spm", tiny_spm)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    code, _, err = run_cli(["quantize", "quantorg/tiny-spm", "--variants", "q8_0", "--no-eval", "--push",
                            "quantorg/tiny-spm-GGUF", "--private", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert hub.repo_info("quantorg/tiny-spm-GGUF")["private"] is True
    assert "tiny-spm-Q8_0.gguf" in hub.files("quantorg/tiny-spm-GGUF")


def _broken_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_arch(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(folder: Path) -> None:
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


@pytest.mark.parametrize("case, edit, message", [
    ("unsupported", _set_arch, "Architecture MysteryForCausalLM is not supported"),
    ("no-tokenizer", lambda d: [(d / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
     "no tokenizer.json or tokenizer.model"),
    ("corrupt", _truncate, "truncated or corrupt"),
    ("pickled", _pickle_only, "--allow-pickle"),
])
def test_bad_sources_fail_clearly_and_push_nothing(hub, tiny_bpe, tmp_path, capsys, monkeypatch, case, edit,
                                                   message):
    seed(hub, f"quantorg/{case}", _broken_copy(tiny_bpe, tmp_path / case, edit))
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(["quantize", f"quantorg/{case}", "--variants", "Q4_K_M", "--no-eval",
                              "--push", f"alice/{case}-GGUF", "--out", str(out_dir)], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    from huggingface_hub import HfApi

    assert not HfApi().repo_exists(f"alice/{case}-GGUF", token=ALICE_TOKEN)
    assert not out_dir.exists() or not any(out_dir.iterdir())
    if case in ("unsupported", "no-tokenizer", "pickled"):  # refused before any weight download
        assert not any(p.endswith((".safetensors", ".bin")) for m, p in hub.requests_log if m == "GET")


@pytest.mark.parametrize("args, message", [
    (["quantorg/missing"], "was not found"),
    (["quantorg/tiny@nope"], "Revision 'nope' does not exist"),
    (["quantorg/tiny", "--variants", "Q4_K_X"], "Unknown GGUF variant 'Q4_K_X'"),
    (["quantorg/tiny", "--method", "exl2"], "Unknown method 'exl2'"),
    (["quantorg/tiny", "--push", "bob/x"], "cannot write to 'bob'"),
    (["quantorg/tiny", "--eval-text", "/nonexistent/file.txt"], "file.txt"),
    (["quantorg/tiny", "--ctx", "2"], "too small"),
])
def test_bad_options_fail_before_work(hub, tiny_bpe, capsys, monkeypatch, tmp_path, args, message):
    seed(hub, "quantorg/tiny", tiny_bpe)
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    code, _, err = run_cli(["quantize", *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_push_without_token_is_refused(hub, tiny_bpe, capsys, tmp_path):
    seed(hub, "quantorg/tiny", tiny_bpe)
    code, _, err = run_cli(["quantize", "quantorg/tiny", "--no-eval", "--push", "alice/x",
                            "--out", str(tmp_path)], capsys)
    assert code == 2 and "HF_TOKEN" in err


def test_failed_upload_leaves_no_repo(hub, tiny_bpe, tmp_path, monkeypatch):
    """A push that breaks mid-commit removes the repo it created: nothing half-pushed."""
    from huggingface_hub import HfApi

    from quantspace.errors import PushError
    from quantspace.hub import push_folder

    (tmp_path / "a.txt").write_text("x")
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(PushError, match="nothing was committed"):
        push_folder(tmp_path, ["a.txt"], "alice/half", ALICE_TOKEN, False, "msg")
    assert not HfApi().repo_exists("alice/half", token=ALICE_TOKEN)


def test_pickled_weights_convert_when_allowed(tiny_bpe, tmp_path):
    import torch
    from safetensors.torch import load_file

    from quantspace import quantize

    src = tmp_path / "pickled"
    shutil.copytree(tiny_bpe, src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    report = quantize(str(src), variants="Q8_0", out=tmp_path / "o", no_eval=True, allow_pickle=True)
    assert report.files[0].size_bytes > 0 and llama_generate(tmp_path / "o" / "pickled-Q8_0.gguf") is not None


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "quantspace", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "quantize" in proc.stdout and "estimate" in proc.stdout


def test_unreachable_hub_is_a_clear_error(tmp_path, capsys, monkeypatch):
    from tests.hub_fixtures import point_client_at

    point_client_at("http://127.0.0.1:1", tmp_path / "hf", monkeypatch)  # nothing listens there
    code, _, err = run_cli(["quantize", "someone/model", "--no-eval", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Could not reach the Hub at http://127.0.0.1:1" in err and "Traceback" not in err


def test_read_only_org_members_cannot_push_there():
    from quantspace.hub import writable_namespaces

    me = {"name": "carol", "orgs": [{"name": "team", "roleInOrg": "write"}, {"name": "club", "roleInOrg": "read"}]}
    assert writable_namespaces(me) == {"carol", "team"}
