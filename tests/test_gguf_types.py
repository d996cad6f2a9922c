"""Every llama.cpp file type and the per-tensor type options, against real llama.cpp (quantize, load, generate).

The types that need an importance matrix are made here with a dummy all-ones one (llama.cpp's
`llama_model_imatrix_data` entries built by `quantize_with_ones_imatrix`), until QuantSpace computes its own.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import pytest

from quantspace import cli
from quantspace.errors import BadOptionError, QuantizeError
from quantspace.estimate import estimate, tensor_shapes
from quantspace.formats import Context, Option, get_format
from quantspace.formats.gguf import GGUF, VARIANTS, llama_quantize
from quantspace.formats.gguf_types import check_ternary, is_ternary
from quantspace.converter.tensor_types import choose_types, f16_tensors, model_facts, Overrides
from quantspace.pipeline import quantize
from quantspace.preflight import preflight
from quantspace.source import resolve

Q = gguf.GGMLQuantizationType
NEW = ["Q5_1", "Q5_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_L", "IQ3_M", "IQ3_S", "TQ2_0", "TQ1_0"]
NEEDS_IMATRIX = ["IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


def _quiet(name: str):
    return lambda done, total: None


def written_types(path: Path) -> dict[str, Q]:
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def quantize_with_ones_imatrix(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's quantizer given an importance matrix of ones for every weight (rows × experts long)."""
    import llama_cpp

    weights = [t for t in gguf.GGUFReader(src).tensors if len(t.shape) >= 2 and t.name.endswith("weight")]
    names = [t.name.encode() for t in weights]
    arrays = [(ctypes.c_float * (int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) > 2 else 1)))(
        *([1.0] * (int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) > 2 else 1)))) for t in weights]
    entries = (llama_cpp.llama_model_imatrix_data * (len(weights) + 1))()
    for e, name, data in zip(entries, names, arrays):
        e.name, e.data, e.size = name, ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), len(data)
    entries[len(weights)].name = None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(ftype), os.cpu_count() or 1
    params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0 and dst.is_file(), f"llama.cpp could not quantize {ftype} with an imatrix"


@pytest.fixture(scope="module")
def made(tiny_bpe, tmp_path_factory) -> dict[str, Path]:
    """Every new variant that needs no imatrix, through the format's own produce(); the F16 file kept."""
    folder = tmp_path_factory.mktemp("types")
    outs = get_format("gguf").produce(tiny_bpe, folder, "tiny", ["F16", *NEW], Context(stage=_quiet))
    return {o.variant: o.path for o in outs}


def test_variants_are_every_llama_cpp_type_largest_first():
    for v in [*NEW, *NEEDS_IMATRIX]:
        assert v in VARIANTS and VARIANTS[v].summary
    assert [v for v, x in VARIANTS.items() if x.needs_imatrix] == NEEDS_IMATRIX
    order = list(VARIANTS)
    assert order.index("Q8_0") < order.index("Q4_K_M") < order.index("Q2_K") < order.index("IQ1_S")


@pytest.mark.parametrize("variant", NEW)
def test_new_type_loads_and_generates_in_llama_cpp(made, variant):
    """llama.cpp writes the file type asked for and runs it (TQ too: the runtime has no BitNet check)."""
    from llama_cpp import Llama

    reader = gguf.GGUFReader(made[variant])
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == int(VARIANTS[variant].ftype)
    llm = Llama(str(made[variant]), n_ctx=64, verbose=False)
    out = llm.create_completion("Hello", max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("variant", NEEDS_IMATRIX)
def test_imatrix_types_are_exactly_those_llama_cpp_refuses_without_one(made, variant, tmp_path):
    # Refused without one (with llama.cpp's reason), made with one.
    with pytest.raises(QuantizeError, match="needs an importance matrix .* requires an imatrix"):
        llama_quantize(made["F16"], tmp_path / "x.gguf", VARIANTS[variant].ftype, threads=1)
    quantize_with_ones_imatrix(made["F16"], tmp_path / "y.gguf", VARIANTS[variant].ftype)


OVERRIDES = {"output_type": "Q8_0", "embedding_type": "q4_k", "tensor_types": "ffn_down=Q6_K"}


def test_overrides_land_in_the_file_the_estimate_and_the_report(tiny_bpe, tmp_path):
    fmt = get_format("gguf")
    ctx = Context(stage=_quiet, options={**{o.name: o.default for o in fmt.options}, **OVERRIDES})
    [out] = fmt.produce(tiny_bpe, tmp_path, "tiny", ["Q4_K_M"], ctx)
    written = written_types(out.path)
    assert written["output.weight"] == Q.Q8_0 and written["token_embd.weight"] == Q.Q4_K
    assert {t for n, t in written.items() if ".ffn_down." in n} == {Q.Q6_K}
    assert {t for n, t in written.items() if ".ffn_up." in n} == {Q.Q4_K}      # the rest: llama.cpp's choice
    # The estimate predicts every tensor and the whole file from headers and config alone.
    info = resolve(str(tiny_bpe))
    ov = Overrides(Q.Q8_0, Q.Q4_K, (("ffn_down", Q.Q6_K),))
    assert choose_types(f16_tensors(tensor_shapes(info, None), info.config), VARIANTS["Q4_K_M"].ftype,
                        model_facts(info.config), overrides=ov) == written
    sized = estimate(str(tiny_bpe), "gguf", ["Q4_K_M"], options=OVERRIDES).sizes["Q4_K_M"]
    plain = estimate(str(tiny_bpe), "gguf", ["Q4_K_M"]).sizes["Q4_K_M"]
    real = out.path.stat().st_size
    assert abs(sized - real) <= 0.03 * real and abs(sized - real) < abs(plain - real)
    assert out.details["output_type"] == "Q8_0" and out.details["embedding_type"] == "Q4_K"
    assert out.details["tensor_types"] == {"ffn_down": "Q6_K"}
    assert out.details["tensor_type_counts"]["Q6_K"] == sum(t == Q.Q6_K for t in written.values())


BAD = [({"output_type": "Q4_K_M"}, "Q4_K_M is a file type"),
       ({"embedding_type": "Q9"}, "Unknown tensor type 'Q9'"),
       ({"tensor_types": "ffn_down"}, "must be REGEX=TYPE"),
       ({"tensor_types": "ffn_down=Q6_K,[=Q4_K"}, "not a valid regular expression"),
       ({"tensor_types": "(?<=blk)ffn=Q4_K"}, "ECMAScript"),
       ({"tensor_types": "blk\\.[0-9]{1,2}\\.ffn_down=Q4_K_M"}, "Unknown tensor type 'Q4_K_M'")]


@pytest.mark.parametrize("options,words", BAD)
def test_bad_options_are_one_line_before_any_work(options, words, tmp_path):
    # The source does not exist: the options must be refused before it is even looked up.
    with pytest.raises(BadOptionError, match=words.replace("(", r"\(")) as err:
        quantize(str(tmp_path / "nowhere"), method="gguf", variants=["Q4_K_M"], options=options, no_eval=True)
    assert "\n" not in str(err.value)


def test_cli_flags_reach_the_check(tmp_path, capsys):
    rc = cli.main(["quantize", str(tmp_path / "nowhere"), "--tensor-types", "attn_v=Q9_K", "--no-eval"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Unknown tensor type 'Q9_K'" in err and "\n" not in err


def test_comma_inside_a_pattern_stays_there(tmp_path):
    assert get_format("gguf").check_choice({"tensor_types": "blk\\.[0-9]{1,2}\\.ffn_down=Q6_K,attn_v=q8_0"},
                                           ["Q4_K_M"]) is None


@pytest.fixture
def with_imatrix_option(monkeypatch):
    """The imatrix option as the imatrix work declares it, for as long as this branch lacks it."""
    if not any(o.name == "imatrix" for o in GGUF.options):
        monkeypatch.setattr(GGUF, "options", GGUF.options + (Option("imatrix", "auto", "auto, off or a path"),))


def test_imatrix_off_refuses_types_that_need_one_in_preflight(tiny_bpe, with_imatrix_option, tmp_path):
    pre = preflight(str(tiny_bpe), "gguf", ["Q4_K_M", "IQ2_XXS", "IQ1_S"], evaluate=False,
                    options={"imatrix": "off"})
    [line] = [p for p in pre.problems if "importance matrix" in p]
    assert "IQ2_XXS, IQ1_S need an importance matrix" in line and not pre.ok
    assert not [p for p in preflight(str(tiny_bpe), "gguf", ["IQ2_XXS"], evaluate=False,
                                     options={"imatrix": "auto"}).problems if "importance matrix" in p]
    # An override to such a type is refused the same way; and the run itself refuses before any lookup.
    pre = preflight(str(tiny_bpe), "gguf", ["Q4_K_M"], evaluate=False,
                    options={"imatrix": "off", "tensor_types": "ffn_up=IQ2_XS"})
    assert any("tensor_types asks for IQ2_XS" in p for p in pre.problems)
    with pytest.raises(BadOptionError, match="IQ2_M needs an importance matrix"):
        quantize(str(tmp_path / "nowhere"), method="gguf", variants=["IQ2_M"], options={"imatrix": "off"},
                 no_eval=True)


def test_a_misfit_output_type_is_refused_in_preflight(smollm2):
    """llama.cpp writes a given embedding type without its usual fallback: Q4_K's 256-weight blocks do not
    split SmolLM2's 576-wide rows, and llama.cpp would fail after the download ('invalid size')."""
    pre = preflight(str(smollm2), "gguf", ["Q4_K_M"], evaluate=False, options={"embedding_type": "Q4_K"})
    assert any("token_embd.weight has rows of 576" in p and "Q8_0" in p for p in pre.problems)
    assert preflight(str(smollm2), "gguf", ["Q4_K_M"], evaluate=False, options={"embedding_type": "Q8_0"}).ok


def test_ternary_types_only_for_bitnet_models(tiny_bpe):
    pre = preflight(str(tiny_bpe), "gguf", ["TQ1_0", "Q4_K_M"], evaluate=False)
    assert any("TQ1_0 store ternary weights" in p and "LlamaForCausalLM" in p for p in pre.problems)
    assert is_ternary({"architectures": ["BitnetForCausalLM"]})
    assert is_ternary({"architectures": ["LlamaForCausalLM"], "quantization_config": {"quant_method": "bitnet"}})
    check_ternary({"architectures": ["BitNetForCausalLM"]}, ["TQ2_0"])   # no refusal


def test_estimate_covers_every_variant(tiny_bpe):
    sizes = estimate(str(tiny_bpe), "gguf").sizes
    assert set(sizes) == set(VARIANTS) and all(s > 0 for s in sizes.values())
    assert sizes["IQ1_S"] < sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"] < sizes["F16"]
