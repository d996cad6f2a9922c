"""GGUF through llama.cpp's own converter (convert_hf_to_gguf.py of the llama.cpp we quantize with) for the
architectures ours does not have: a tiny Gemma 4 (text) converts, quantizes, loads in llama.cpp and matches
transformers; failures are one line; the converter is taken from llama-cpp-python's source distribution."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from quantspace.converter import llama_cpp as lcpp_convert
from quantspace.errors import QuantizeError, UnsupportedArchitectureError
from quantspace.preflight import preflight
from tests.test_pipeline import llama_generate


@pytest.fixture(scope="module")
def tiny_gemma4():
    from tests.conftest import _tiny

    return _tiny("tiny-gemma4", "gemma", "gemma4")


def test_gemma4_converts_with_llama_cpps_converter_and_matches_transformers(tiny_gemma4, tmp_path):
    from quantspace import quantize

    pre = preflight(str(tiny_gemma4), "gguf", ["Q4_K_M", "Q8_0"], evaluate=True)
    assert pre.ok, pre.problems
    assert any("Converted by llama.cpp's convert_hf_to_gguf.py" in c for c in pre.checks), pre.checks
    out = tmp_path / "out"
    report = quantize(str(tiny_gemma4), variants="Q4_K_M,Q8_0", out=out, ctx=64, max_chunks=2)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "quantspace.json", "size_vs_kld.svg",
                                                     "tiny-gemma4-Q4_K_M.gguf", "tiny-gemma4-Q8_0.gguf"]
    by = {f.variant: f for f in report.files}
    # 8-bit llama.cpp against transformers in fp32: the same model, so nearly the same distribution.
    assert by["Q8_0"].metrics["kld_mean"] < 0.01 and by["Q8_0"].metrics["top1_agreement"] > 0.9
    assert by["Q4_K_M"].metrics["kld_mean"] > by["Q8_0"].metrics["kld_mean"]
    for f in report.files:
        assert f.details["converter"] == "llama.cpp's convert_hf_to_gguf.py"
        assert abs(pre.sizes[f.variant] - f.size_bytes) / f.size_bytes < 0.03, (f.variant, pre.sizes, f.size_bytes)
    assert llama_generate(out / "tiny-gemma4-Q4_K_M.gguf")
    assert "was made by llama.cpp's convert_hf_to_gguf.py" in (out / "README.md").read_text()


def test_architectures_neither_converter_knows_are_refused(tiny_bpe, tmp_path):
    folder = tmp_path / "mystery"
    shutil.copytree(tiny_bpe, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["MysteryForCausalLM"]}))
    pre = preflight(str(folder), "gguf", evaluate=False)
    assert not pre.ok and len(pre.problems) == 1
    assert "MysteryForCausalLM is not supported for GGUF: neither our converter nor llama.cpp's" in pre.problems[0]
    with pytest.raises(UnsupportedArchitectureError):
        lcpp_convert.check({"architectures": ["MysteryForCausalLM"]})
    assert lcpp_convert.check({"architectures": ["Qwen3MoeForCausalLM"]}) == "Qwen3MoeForCausalLM"
    assert {"Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "SmolLM3ForCausalLM",
            "Qwen3MoeForCausalLM", "LlamaForCausalLM"} <= lcpp_convert.architectures()


def _tarball(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_the_converter_is_taken_from_the_source_distribution(tmp_path):
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    sdist = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    _tarball(sdist, {root + "convert_hf_to_gguf.py": b"# script\n", root + "conversion/llama.py": b"x = 1\n",
                     root + "gguf-py/gguf/__init__.py": b"", root + "ggml/src/ggml.c": b"int x;\n",
                     "llama_cpp_python-9.9.9/llama_cpp/__init__.py": b""})
    dest = lcpp_convert.extract(sdist, tmp_path / "converter")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "conversion/llama.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    broken = tmp_path / "broken.tar.gz"
    _tarball(broken, {root + "convert_hf_to_gguf.py": b"# script\n"})
    with pytest.raises(QuantizeError, match="conversion/, gguf-py/ missing"):
        lcpp_convert.extract(broken, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_missing_converter_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSPACE_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(QuantizeError, match="run scripts/setup.sh"):
        lcpp_convert.converter_dir(fetch=False)


def test_failure_line_keeps_the_exception():
    stderr = "INFO:hf-to-gguf:Loading model\nTraceback (most recent call last):\n  File x\nValueError: bad rope\n"
    assert lcpp_convert.failure_line(stderr) == "ValueError: bad rope"


def test_the_cli_lists_what_each_method_supports(capsys):
    """The refusal points to `python -m quantspace architectures`; it lists each converter's architectures."""
    from quantspace.archs import supported
    from quantspace.cli import main

    with pytest.raises(UnsupportedArchitectureError, match="python -m quantspace architectures"):
        lcpp_convert.check({"architectures": ["MysteryForCausalLM"]})
    assert main(["architectures"]) == 0
    ours, theirs, awq, nf4 = capsys.readouterr().out.splitlines()
    assert ours.startswith("gguf, QuantSpace's streaming converter") and all(a in ours for a in supported("gguf"))
    assert theirs.startswith("gguf, llama.cpp's") and "Qwen3MoeForCausalLM" in theirs
    assert not any(a in theirs.split(": ", 1)[1].split(", ") for a in supported("gguf"))
    assert awq.startswith("awq") and all(a in awq for a in supported("awq")) and nf4.startswith("nf4")
    assert "MysteryForCausalLM" not in ours + theirs + awq
