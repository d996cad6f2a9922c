"""Our importance matrix: the sums and counts llama-imatrix would collect, computed in PyTorch layer by layer,
written as llama.cpp's imatrix GGUF, and used by llama.cpp's own quantizer (which refuses IQ2_XXS without one)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from quantspace import imatrix_compute as ic
from quantspace.converter import llama_cpp as lcpp_convert
from quantspace.converter.streaming import convert
from quantspace.errors import BadOptionError, CalibrationError, QuantizeError
from quantspace.formats.gguf import llama_quantize
from quantspace.imatrix import Entry, Imatrix, read_imatrix, write_imatrix
from tests.conftest import _tiny

CTX, CHUNKS = 64, 4
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, list[list[int]], Imatrix]:
    """(HF folder, its F16 GGUF by our converter, calibration chunks, our imatrix)."""
    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    tmp = tmp_path_factory.mktemp("imatrix-llama")
    f16 = convert(src, tmp / "F16.gguf")
    source, chunks = ic.calibration_chunks(src, CHUNKS, CTX)
    im = ic.compute(src, f16, tmp / "state", ic.Settings(ctx=CTX, n_chunks=CHUNKS), chunks, source)
    return src, f16, chunks, im


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> tuple[Path, Path, list[list[int]], Imatrix]:
    """The same for tiny Qwen3-MoE, whose F16 GGUF llama.cpp's converter writes."""
    src = _tiny("tiny-qwen3_moe", "bpe", "qwen3_moe")
    tmp = tmp_path_factory.mktemp("imatrix-moe")
    f16 = tmp / "F16.gguf"
    lcpp_convert.convert(src, f16, out_type="F16")
    source, chunks = ic.calibration_chunks(src, CHUNKS, CTX)
    im = ic.compute(src, f16, tmp / "state", ic.Settings(ctx=CTX, n_chunks=CHUNKS), chunks, source)
    return src, f16, chunks, im


def _hf_model(src: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def _direct_inputs(model: torch.nn.Module, names: list[str], chunks: list[list[int]]) -> dict[str, torch.Tensor]:
    """Every input row each named module of the whole HF model sees on the chunks, [tokens, width]."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(torch.tensor(chunks))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def _close(entry: Entry, rows: list[torch.Tensor]) -> None:
    """Our entry holds, per matrix (expert), Σ x² per column and the number of rows."""
    assert entry.sums.shape == (len(rows), rows[0].shape[1]) and entry.counts.shape == (len(rows),)
    for e, x in enumerate(rows):
        assert entry.counts[e] == x.shape[0]
        np.testing.assert_allclose(entry.sums[e], x.square().sum(0).numpy(), rtol=2e-4, atol=1e-5)


def test_llama_entries_equal_a_direct_computation(llama):
    src, f16, chunks, im = llama
    assert all(len(c) == CTX for c in chunks) and len(chunks) == CHUNKS
    model = _hf_model(src)
    n_layers = model.config.num_hidden_layers
    modules = {f"model.layers.{i}.{hf}": f"blk.{i}.{g}.weight" for i in range(n_layers) for hf, g in LLAMA_NAMES.items()}
    modules["lm_head"] = "output.weight"   # untied: llama.cpp quantizes it, reading the final norm's output
    inputs = _direct_inputs(model, list(modules), chunks)
    assert set(im.entries) == set(modules.values())
    for hf, name in modules.items():
        _close(im.entries[name], [inputs[hf]])
        assert im.entries[name].counts[0] == CHUNKS * CTX
    # Every entry is a weight of the GGUF, its width the weight's input columns (ggml's ne0).
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(f16).tensors}
    assert all(im.entries[n].sums.shape[1] == shapes[n][0] for n in im.entries)
    assert (im.chunk_count, im.chunk_size) == (CHUNKS, CTX)


def test_moe_experts_get_their_own_rows_and_counts(moe):
    src, f16, chunks, im = moe
    model = _hf_model(src)
    n_layers, n_exp = model.config.num_hidden_layers, model.config.num_experts
    inputs = _direct_inputs(model, [f"model.layers.{i}.{m}" for i in range(n_layers)
                                    for m in ("mlp", "self_attn.q_proj", "self_attn.o_proj")], chunks)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in gguf.GGUFReader(f16).tensors}
    with torch.no_grad():
        for i in range(n_layers):
            block = model.model.layers[i].mlp
            x = inputs[f"model.layers.{i}.mlp"].float()
            _, _, top = block.gate(x)                  # the router's top-k experts per token
            experts = block.experts                    # transformers' fused [E, 2I, H] and [E, H, I]
            inter = experts.gate_up_proj.shape[1] // 2
            token_rows, down_rows = [], []
            for e in range(n_exp):
                xe = x[(top == e).any(-1)]
                gate, up = xe @ experts.gate_up_proj[e, :inter].T, xe @ experts.gate_up_proj[e, inter:].T
                token_rows.append(xe.double())
                down_rows.append((experts.act_fn(gate) * up).double())
            for kind, rows in (("gate", token_rows), ("up", token_rows), ("down", down_rows)):
                name = f"blk.{i}.ffn_{kind}_exps.weight"
                assert shapes[name][2] == n_exp
                _close(im.entries[name], rows)
            # each token goes to top-k experts: the counts add up to tokens × k, unevenly
            counts = im.entries[f"blk.{i}.ffn_gate_exps.weight"].counts
            assert counts.sum() == CHUNKS * CTX * model.config.num_experts_per_tok and len(set(counts)) > 1
            _close(im.entries[f"blk.{i}.attn_q.weight"], [inputs[f"model.layers.{i}.self_attn.q_proj"]])
            _close(im.entries[f"blk.{i}.attn_output.weight"], [inputs[f"model.layers.{i}.self_attn.o_proj"]])


def test_file_round_trips_in_llama_imatrix_layout(llama, tmp_path):
    *_, im = llama
    path = write_imatrix(im, tmp_path / "imatrix.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == im.datasets
    assert reader.fields["imatrix.chunk_count"].contents() == CHUNKS
    assert reader.fields["imatrix.chunk_size"].contents() == CTX
    t = {t.name: t for t in reader.tensors}
    assert tuple(t["blk.0.ffn_down.weight.in_sum2"].shape) == (512, 1)   # ggml order: [ne0, n_mat]
    assert tuple(t["blk.0.ffn_down.weight.counts"].shape) == (1, 1)
    back = read_imatrix(path)
    assert set(back.entries) == set(im.entries) and back.datasets == im.datasets
    assert (back.chunk_count, back.chunk_size) == (im.chunk_count, im.chunk_size)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)


@pytest.mark.parametrize("which", ["llama", "moe"])
def test_llama_cpp_refuses_iq2_xxs_without_it_and_quantizes_with_it(which, request, tmp_path):
    import llama_cpp

    src, f16, _, im = request.getfixturevalue(which)
    out = tmp_path / "IQ2_XXS.gguf"
    with pytest.raises(QuantizeError, match="importance matrix"):
        llama_quantize(f16, out, gguf.LlamaFileType.MOSTLY_IQ2_XXS)
    assert not out.exists()
    im = read_imatrix(write_imatrix(im, tmp_path / "imatrix.gguf"))
    llama_quantize(f16, out, gguf.LlamaFileType.MOSTLY_IQ2_XXS, imatrix=im)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    expert = "blk.0.ffn_gate_exps.weight" if which == "moe" else "blk.0.ffn_gate.weight"
    assert types[expert] == gguf.GGMLQuantizationType.IQ2_XXS
    assert reader.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert reader.fields["quantize.imatrix.dataset"].contents() == im.datasets[0][:127]
    assert reader.fields["quantize.imatrix.entries_count"].contents() == len(im.entries)
    assert reader.fields["quantize.imatrix.chunks_count"].contents() == CHUNKS
    llm = llama_cpp.Llama(str(out), n_ctx=64, verbose=False)
    text = llm("The whale", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert llm.n_tokens > 2 and isinstance(text, str)


def test_imatrix_lowers_q4_k_m_kld_on_smollm2(smollm2, tmp_path):
    """And the IQ types made with it (IQ4_XS, and IQ2_XXS, which llama.cpp makes only with one) load and generate."""
    import llama_cpp

    from quantspace import quantize

    kld = {}
    for mode in ("off", "auto"):
        variants = "Q4_K_M" if mode == "off" else "Q4_K_M,IQ4_XS,IQ2_XXS"
        report = quantize(str(smollm2), variants=variants, out=tmp_path / mode, ctx=128, max_chunks=4,
                          options={"imatrix": mode, "imatrix_chunks": 16, "imatrix_ctx": 256})
        kld[mode] = report.files[0].metrics["kld_mean"]
        details = report.files[0].details
        if mode == "auto":
            for f in report.files[1:]:
                assert f.details["imatrix"] == "imatrix.gguf" and f.metrics["kld_mean"] > 0
                reader = gguf.GGUFReader(tmp_path / mode / f.filename)
                assert reader.fields["quantize.imatrix.entries_count"].contents() == 30 * 7
                llm = llama_cpp.Llama(str(tmp_path / mode / f.filename), n_ctx=128, verbose=False)
                out = llm("The capital of France is", max_tokens=8, temperature=0.0)
                assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip(), f.variant
                del llm
            by = {f.variant: f.metrics["kld_mean"] for f in report.files}
            assert by["Q4_K_M"] < by["IQ2_XXS"] and by["IQ4_XS"] < by["IQ2_XXS"], by
            assert details["imatrix"] == "imatrix.gguf" and details["imatrix_chunks"] == 16
            im = read_imatrix(tmp_path / mode / "imatrix.gguf")
            # 30 layers × 7 linears; the output weight is the tied embedding (no output.weight, no entry)
            assert len(im.entries) == 30 * 7 and "output.weight" not in im.entries
            saved = json.loads((tmp_path / mode / "quantspace.json").read_text())
            assert saved["files"][0]["details"]["imatrix_chunks"] == 16
            assert "imatrix.gguf" in (tmp_path / mode / "README.md").read_text()
        else:
            assert "imatrix" not in details and not (tmp_path / mode / "imatrix.gguf").exists()
    assert kld["auto"] < kld["off"], kld


def test_a_given_imatrix_file_and_a_local_calibration_file(llama, tmp_path):
    from quantspace import quantize

    src, *_ = llama
    calib = tmp_path / "calib.jsonl"
    text = (Path(__file__).parents[1] / "quantspace" / "data" / "sotu.txt").read_text()[:40000]
    calib.write_text("\n".join(json.dumps({"text": p}) for p in text.split("\n\n") if p.strip()))
    report = quantize(str(src), variants="Q4_K_M", out=tmp_path / "a", no_eval=True,
                      options={"calib_dataset": str(calib), "imatrix_chunks": 2, "imatrix_ctx": 64})
    assert report.files[0].details["imatrix_dataset"] == "calib.jsonl"
    made = tmp_path / "a" / "imatrix.gguf"
    assert read_imatrix(made).datasets == ["calib.jsonl"]
    # That file, given back as PATH: used as is, published as imatrix.gguf, recorded in the quantized file.
    given = tmp_path / "mine.gguf"
    given.write_bytes(made.read_bytes())
    report = quantize(str(src), variants="Q3_K_M,Q8_0", out=tmp_path / "b", no_eval=True,
                      options={"imatrix": str(given)})
    q3, q8 = report.files
    assert q3.details["imatrix_given"] and q3.details["imatrix_dataset"] == "calib.jsonl"
    assert "imatrix" not in q8.details   # 8 bits: llama.cpp does not use one
    assert (tmp_path / "b" / "imatrix.gguf").read_bytes() == given.read_bytes()
    reader = gguf.GGUFReader(tmp_path / "b" / q3.filename)
    assert reader.fields["quantize.imatrix.dataset"].contents() == "calib.jsonl"


def test_wrong_imatrix_files_are_refused_in_one_line(llama, moe, tmp_path):
    from quantspace import quantize

    src, f16, *_ = llama
    other = write_imatrix(moe[3], tmp_path / "moe.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    cases = {junk: "not an imatrix GGUF", f16: "not an importance matrix", other: "another model",
             tmp_path / "missing.gguf": "No imatrix file"}
    for path, words in cases.items():
        with pytest.raises(BadOptionError, match=words) as err:
            quantize(str(src), variants="Q4_K_M", out=tmp_path / "out", no_eval=True, options={"imatrix": str(path)})
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()


def test_bad_calibration_files_give_one_line_and_write_nothing(tmp_path):
    from quantspace import quantize

    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02\xff" * 100)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (tmp_path / "notext.jsonl").write_text('{"id": 1, "label": 2}\n{"id": 2, "label": 3}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    cases = {"empty.txt": "no text", "binary.txt": "binary", "latin1.txt": "not UTF-8",
             "notext.jsonl": "no text in notext.jsonl", "broken.jsonl": "line 2 of broken.jsonl",
             "fake.parquet": "not a readable Parquet", "missing.txt": "No calibration file"}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": [1, 2], "score": [0.5, 0.7]}), tmp_path / "nocolumn.parquet")
        cases["nocolumn.parquet"] = "no text in nocolumn.parquet"
    except ImportError:   # without pyarrow a .parquet file is refused, in one line, for that reason
        cases["fake.parquet"] = r"needs pyarrow \(pip install pyarrow\)"
    out = tmp_path / "out"
    for name, words in cases.items():
        with pytest.raises(CalibrationError, match=f"(?i){words}") as err:
            quantize(str(src), variants="Q4_K_M", out=out, no_eval=True,
                     options={"calib_dataset": str(tmp_path / name)})
        assert "\n" not in str(err.value), name
        assert not out.exists(), name
        assert not list(tmp_path.glob(".quantspace-partial-*")), name


def test_cli_has_the_flags_and_auto_skips_8_bit_variants(tmp_path):
    from quantspace.cli import _chosen_options, _parser
    from quantspace import quantize

    args = _parser().parse_args(["quantize", "x", "--imatrix", "off", "--calib-dataset", "c.txt",
                                 "--imatrix-chunks", "8"])
    assert _chosen_options(args) == {"imatrix": "off", "calib_dataset": "c.txt", "imatrix_chunks": "8"}
    # Only 8-bit and 16-bit variants: no imatrix computed, none published (a bad calibration file is not read).
    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    report = quantize(str(src), variants="Q8_0", out=tmp_path / "o", no_eval=True,
                      options={"calib_dataset": str(tmp_path / "missing.txt")})
    assert "imatrix" not in report.files[0].details and not (tmp_path / "o" / "imatrix.gguf").exists()


def test_a_hub_dataset_calibrates_and_one_without_text_is_one_line(hub, tmp_path):
    from quantspace import quantize

    src = _tiny("tiny-llama-bpe", "bpe", "llama")
    text = (Path(__file__).parents[1] / "quantspace" / "data" / "sotu.txt").read_text()[:20000]
    hub.create_repo("alice/speeches", repo_type="dataset")
    rows = "\n".join(json.dumps({"id": i, "text": p}) for i, p in enumerate(text.split("\n\n")) if p.strip())
    hub.put_file("alice/speeches", "train.jsonl", rows.encode(), repo_type="dataset")
    hub.create_repo("alice/ids", repo_type="dataset")
    hub.put_file("alice/ids", "data.jsonl", b'{"id": 1, "label": 0}\n{"id": 2, "label": 1}\n', repo_type="dataset")
    options = {"imatrix_chunks": 2, "imatrix_ctx": 64}
    report = quantize(str(src), variants="Q4_K_M", out=tmp_path / "a", no_eval=True,
                      options={**options, "calib_dataset": "alice/speeches"})
    assert "alice/speeches" in report.files[0].details["imatrix_dataset"]
    assert "alice/speeches" in read_imatrix(tmp_path / "a" / "imatrix.gguf").dataset
    with pytest.raises(CalibrationError, match="no text in alice/ids/data.jsonl") as err:
        quantize(str(src), variants="Q4_K_M", out=tmp_path / "b", no_eval=True,
                 options={**options, "calib_dataset": "alice/ids"})
    assert "\n" not in str(err.value) and not (tmp_path / "b").exists()
