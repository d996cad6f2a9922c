"""The size-vs-KLD chart: an SVG beside the card, one labelled point per measured file, referenced by the card."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from quantspace.card import build_card
from quantspace.chart import CHART_NAME, size_vs_kld_svg, write_chart
from quantspace.formats import get_format
from quantspace.report import FileResult, Report

SVG = "{http://www.w3.org/2000/svg}"
REFERENCE = f"![Size vs KL divergence]({CHART_NAME})"


def _report(klds: dict[str, tuple[int, float | None]]) -> Report:
    files = [FileResult(f"m-{v}.gguf", v, size, 8.0 * size / 1e6,
                        metrics=None if kld is None else {"kld_mean": kld, "perplexity": 10.0})
             for v, (size, kld) in klds.items()]
    return Report(source="org/m", revision=None, method="gguf", name="m-GGUF", architecture="LlamaForCausalLM",
                  parameters=1_000_000, license=None, files=files)


def _points(svg: str) -> list[dict[str, str]]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return [c.attrib for c in root.iter(f"{SVG}circle") if c.get("class") == "point"]


def _labels(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text") if t.get("class") == "label"]


def test_one_labelled_point_per_measured_file_in_size_order():
    # Listed largest first (as the report does); one file without KLD is left out of the chart.
    report = _report({"Q8_0": (8_500_000, 0.0004), "Q6_K": (6_600_000, None), "Q4_K_M": (4_900_000, 0.012),
                      "Q2_K": (3_100_000, 0.31)})
    svg = size_vs_kld_svg(report)
    assert svg is not None
    points = _points(svg)
    assert [p["data-variant"] for p in points] == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert [int(p["data-size"]) for p in points] == sorted(int(p["data-size"]) for p in points)
    assert _labels(svg) == ["Q2_K", "Q4_K_M", "Q8_0"]
    xs = [float(p["cx"]) for p in points]
    ys = [float(p["cy"]) for p in points]
    assert xs == sorted(xs) and ys == sorted(ys)      # bigger file: further right and lower (less KLD)
    text = " ".join(t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text"))
    assert "File size (MB)" in text and "log scale" in text     # 0.0004 … 0.31 spans three decades
    assert 'fill="#ffffff"' in svg.split("<rect", 2)[1]        # an explicit white background


def test_close_values_get_a_linear_axis():
    svg = size_vs_kld_svg(_report({"Q8_0": (2_000_000_000, 0.010), "Q4_K_M": (1_000_000_000, 0.030)}))
    assert svg is not None
    text = " ".join(t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text"))
    assert "File size (GB)" in text and "Mean KLD (nats)" in text and "log scale" not in text


def test_card_references_the_chart_only_when_there_is_one(tmp_path):
    fmt = get_format("gguf")
    measured = _report({"Q8_0": (8_500_000, 0.0004), "Q4_K_M": (4_900_000, 0.012)})
    assert write_chart(measured, tmp_path) == tmp_path / CHART_NAME
    assert REFERENCE in build_card(measured, fmt).content
    for unmeasured in (_report({"Q8_0": (8_500_000, None), "Q4_K_M": (4_900_000, None)}),
                       _report({"Q8_0": (8_500_000, 0.0004), "Q4_K_M": (4_900_000, None)})):
        assert size_vs_kld_svg(unmeasured) is None
        assert write_chart(unmeasured, tmp_path / "none") is None and not (tmp_path / "none").exists()
        assert CHART_NAME not in build_card(unmeasured, fmt).content


def test_pipeline_writes_the_chart_beside_the_card(tiny_bpe, tmp_path):
    from quantspace import quantize

    out = tmp_path / "out"
    report = quantize(str(tiny_bpe), variants="Q8_0,Q2_K", out=out, ctx=64, max_chunks=2,
                      options={"imatrix": "off"})
    svg = (out / CHART_NAME).read_text(encoding="utf-8")
    by_size = sorted(report.files, key=lambda f: f.size_bytes)
    assert [p["data-variant"] for p in _points(svg)] == [f.variant for f in by_size] == ["Q2_K", "Q8_0"]
    assert REFERENCE in (out / "README.md").read_text(encoding="utf-8")

    quantize(str(tiny_bpe), variants="Q8_0,Q2_K", out=tmp_path / "no-eval", no_eval=True,
             options={"imatrix": "off"})
    assert not (tmp_path / "no-eval" / CHART_NAME).exists()
    assert CHART_NAME not in (tmp_path / "no-eval" / "README.md").read_text(encoding="utf-8")
