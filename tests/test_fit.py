"""--fit: the GGUF with the least measured error within a size budget, beside the stock variants."""

from __future__ import annotations

import pytest

from quantspace.errors import BadOptionError
from quantspace.fit import budget_label, kv_cache_bytes, parse_budget
from quantspace.formats.gguf import file_tensors
from tests.test_faults import one_error_line
from tests.test_pipeline import run_cli

STOCK = ["Q3_K_M", "Q4_K_M"]


def test_budgets_parse_in_decimal_units_and_bad_ones_are_refused(tiny_bpe, tmp_path):
    from quantspace import quantize

    assert parse_budget("4.5GB") == parse_budget("4.5 gb") == parse_budget("4.5G") == 4_500_000_000
    assert parse_budget("800MB") == 800_000_000 and parse_budget("950KB") == 950_000
    assert budget_label(" 4.5gb ") == "FIT-4.5GB"
    for bad in ("big", "0GB", "4.5 GiB", "-1GB"):
        with pytest.raises(BadOptionError, match="is not a size"):
            parse_budget(bad)
    with pytest.raises(BadOptionError, match="fit 'big' is not a size"):   # before any work
        quantize(str(tiny_bpe), variants="Q4_K_M", out=tmp_path / "out", no_eval=True, options={"fit": "big"})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def fitted(tiny_bpe, tmp_path_factory):
    """Q3_K_M, Q4_K_M and a file fitted to a budget halfway between their sizes, measured."""
    from quantspace import quantize
    from quantspace.preflight import preflight

    sizes = preflight(str(tiny_bpe), "gguf", STOCK, evaluate=True).sizes
    budget = f"{(sizes['Q3_K_M'] + sizes['Q4_K_M']) / 2 / 1000:.0f}KB"
    out = tmp_path_factory.mktemp("fit") / "out"
    report = quantize(str(tiny_bpe), variants=STOCK, out=out, ctx=64, max_chunks=4,
                      options={"fit": budget, "imatrix_chunks": 8, "imatrix_ctx": 64})
    return report, out, budget


def test_fitted_file_is_within_budget_and_no_worse_than_the_nearest_smaller_stock_file(fitted):
    report, out, budget = fitted
    by = {f.variant: f for f in report.files}
    fit = by[budget_label(budget)]
    assert fit.filename == f"tiny-llama-bpe-FIT-{budget}.gguf" and (out / fit.filename).is_file()
    assert fit.size_bytes == (out / fit.filename).stat().st_size <= parse_budget(budget)
    stock = [f for f in report.files if f.variant in STOCK]
    smaller = max((f for f in stock if f.size_bytes <= parse_budget(budget)), key=lambda f: f.size_bytes)
    assert smaller.variant == "Q3_K_M"
    assert fit.metrics["kld_mean"] <= smaller.metrics["kld_mean"], (fit.metrics, smaller.metrics)
    # The recipe in the report is what the file holds, tensor by tensor.
    recipe = fit.details["recipe"]
    held = file_tensors(out / fit.filename)
    assert recipe and all(held[name][1].name == t for name, t in recipe.items())
    assert {held[n][1].name for n in recipe} <= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}


def test_card_compares_the_fitted_file_with_the_stock_ones(fitted):
    report, out, budget = fitted
    card = (out / "README.md").read_text(encoding="utf-8")
    fit = next(f for f in report.files if f.variant == budget_label(budget))
    line = next(line for line in card.splitlines() if line.startswith(f"`{fit.filename}` is the file fitted"))
    assert "Q3_K_M (" in line and "Q4_K_M (" in line and f"{fit.metrics['kld_mean']:.5f}" in line
    assert f"--fit {budget}" in card          # the command that reproduces it


def test_budget_below_the_smallest_file_is_one_clear_line_and_writes_nothing(tiny_bpe, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["quantize", str(tiny_bpe), "--variants", "Q4_K_M", "--fit", "100KB", "--no-eval",
                            "--imatrix", "off", "--out", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and "fit 100KB: the smallest file this model can be is" in line, line
    assert "give a larger budget" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_preflight_shows_the_fitted_file_and_its_size_holds(fitted, tiny_bpe):
    from quantspace.preflight import preflight

    report, out, budget = fitted
    label = budget_label(budget)
    pre = preflight(str(tiny_bpe), "gguf", STOCK, evaluate=False, options={"fit": budget})
    assert pre.ok and set(pre.sizes) == {*STOCK, label}
    made = next(f for f in report.files if f.variant == label).size_bytes
    assert 0.97 * pre.sizes[label] <= made <= pre.sizes[label] <= parse_budget(budget), (made, pre.sizes)


def test_a_budget_no_file_meets_is_a_preflight_problem_before_any_download(tiny_bpe):
    from quantspace.preflight import preflight

    pre = preflight(str(tiny_bpe), "gguf", ["Q4_K_M"], evaluate=False, options={"fit": "100KB"})
    assert not pre.ok and any("fit 100KB: the smallest file this model can be is" in p for p in pre.problems)
    pre = preflight(str(tiny_bpe), "gguf", ["Q4_K_M"], evaluate=False, options={"fit": "0.6GB-GPU-100k"})
    assert not pre.ok and any("leaves no room for the model" in p for p in pre.problems), pre.problems


@pytest.mark.parametrize("name,kind,arch", [("tiny-llama-bpe", "bpe", "llama"), ("tiny-gemma3-gemma", "gemma", "gemma3")])
def test_the_kv_cache_allowance_is_what_llama_cpp_allocates(name, kind, arch, tmp_path, capfd):
    """Full attention keeps every token, a sliding window its window (Gemma 3), as llama-server allocates."""
    import json
    import re

    import llama_cpp

    from quantspace.converter.streaming import convert
    from tests.conftest import _tiny

    src = _tiny(name, kind, arch)
    f16 = convert(src, tmp_path / "f16.gguf")
    config = json.loads((src / "config.json").read_text())
    for ctx in (1024, 4096):
        capfd.readouterr()
        llama_cpp.Llama(str(f16), n_ctx=ctx, swa_full=False, verbose=True)
        log = capfd.readouterr().err
        mib = sum(float(x) for x in re.findall(r"KV buffer size =\s+([0-9.]+) MiB", log))
        assert kv_cache_bytes(config, ctx) == pytest.approx(mib * 2**20, rel=0.01), (ctx, mib)


def test_a_device_budget_leaves_room_for_its_kv_cache_and_keeps_the_users_types(fitted, tiny_bpe, tmp_path):
    """'0.0xGB-Mac-1k' sized so the file must land between Q3_K_M and Q4_K_M: the file, the KV cache for 1k tokens
    and llama.cpp's buffers fit in the share of memory macOS gives the GPU; the user's own types stay."""
    import json

    from quantspace import quantize
    from quantspace.fit import GIB, device_of, kv_cache_bytes, working_bytes

    report, _, budget = fitted
    config = json.loads((tiny_bpe / "config.json").read_text())
    room = kv_cache_bytes(config, 1024) + working_bytes(config)
    device = f"{(parse_budget(budget) + room) / (GIB * 2 / 3):.6f}GB-Mac-1k"
    options = {"fit": device, "imatrix_chunks": 8, "imatrix_ctx": 64, "output_type": "Q8_0",
               "tensor_types": "attn_v=Q6_K"}
    made = quantize(str(tiny_bpe), variants="Q4_K_M", out=tmp_path / "out", no_eval=True, options=options)
    fit = next(f for f in made.files if f.variant.startswith("FIT-"))
    assert fit.filename == f"tiny-llama-bpe-FIT-{device_of(device).name}.gguf"
    assert fit.size_bytes + room <= device_of(device).usable()
    assert "of KV cache for 1024 tokens" in fit.details["fit_budget"]
    types = {n: t.name for n, (_, t) in file_tensors(tmp_path / "out" / fit.filename).items()}
    assert types["output.weight"] == "Q8_0"
    assert {t for n, t in types.items() if "attn_v" in n} == {"Q6_K"}
    assert len(set(types.values()) - {"F32"}) >= 3   # the rest is a real mix, not one type
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert f"`{fit.filename}` is the file fitted to" in card and "KV cache" in card
