"""Preflight as a pure function, and the page built from the format registry (no browser, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantspace.formats import REGISTRY, Option, TensorStats
from quantspace.formats.gguf import GGUF
from quantspace.pipeline import parameter_count
from quantspace.preflight import Hardware, gpu_seconds, preflight
from tests.hub_fixtures import point_client_at

GIB = 2**30


class GpuOnly(GGUF):
    """A format that needs a GPU and has options of every kind: what AWQ/NF4 look like to the page."""
    name = "gpuonly"
    suffix = "GPUONLY"
    needs_gpu = True
    variants = ("W4", "W8")
    default_variants = ("W4",)
    options = (Option("group_size", 128, "Weights per scale.", minimum=32),
               Option("zero_point", True, "Asymmetric quantization."),
               Option("kernel", "gemm", "Kernel layout.", choices=("gemm", "gemv")))

    def check_variants(self, variants: list[str]) -> list[str]:
        return [v.upper() for v in variants]

    def estimate(self, stats: TensorStats, variants: list[str]) -> dict[str, int]:
        return {v: stats.total * int(v[1:]) // 8 for v in variants}


class Missing(GpuOnly):
    name = "missing"

    def unavailable(self) -> str | None:
        return "its backend package is not installed."


@pytest.fixture()
def fake_formats(monkeypatch):
    monkeypatch.setitem(REGISTRY, "gpuonly", f"{__name__}:GpuOnly")
    monkeypatch.setitem(REGISTRY, "missing", f"{__name__}:Missing")


def cpu(disk: int = 100 * GIB, ram: int = 16 * GIB) -> Hardware:
    return Hardware("cpu", ram=ram, disk_free=disk)


def test_local_folder_sizes_and_disk(tiny_bpe: Path):
    pre = preflight(str(tiny_bpe), "gguf", ["Q8_0", "F16"], evaluate=False, hardware=cpu())
    assert pre.ok and pre.problems == []
    assert pre.parameters == parameter_count(tiny_bpe)
    assert pre.download_bytes == 0                     # a local folder is not downloaded
    assert pre.sizes["Q8_0"] < pre.sizes["F16"]
    # the outputs only: F16 is one of them (no other intermediate), no evaluation scratch with evaluate=False
    assert pre.disk_needed == sum(pre.sizes.values())
    with_eval = preflight(str(tiny_bpe), "gguf", ["Q8_0", "F16"], evaluate=True, hardware=cpu())
    assert with_eval.disk_needed > pre.disk_needed


def test_too_little_disk_or_memory_is_a_problem(tiny_bpe: Path):
    pre = preflight(str(tiny_bpe), "gguf", ["Q8_0"], hardware=cpu(disk=1000, ram=1000))
    assert not pre.ok
    assert any("of disk" in p for p in pre.problems)
    assert any("turn evaluation off" in p for p in pre.problems)


def test_bad_variant_and_method_are_problems(tiny_bpe: Path):
    assert any("Unknown GGUF variant" in p for p in preflight(str(tiny_bpe), "gguf", ["Q9"], hardware=cpu()).problems)
    assert any("Unknown method" in p for p in preflight(str(tiny_bpe), "nope", hardware=cpu()).problems)


def test_gpu_format_on_cpu_and_on_zerogpu(tiny_bpe: Path, fake_formats, monkeypatch):
    pre = preflight(str(tiny_bpe), "gpuonly", hardware=cpu())
    assert any("needs a CUDA GPU" in p for p in pre.problems)
    assert pre.sizes == {"W4": pre.parameters // 2}
    zero = Hardware("zerogpu", "NVIDIA H200 MIG", 70 * GIB, 16 * GIB, 100 * GIB)
    pre = preflight(str(tiny_bpe), "gpuonly", hardware=zero)
    assert pre.ok and pre.gpu_seconds == gpu_seconds(pre.parameters)
    monkeypatch.setattr("quantspace.preflight.ZEROGPU_MAX_SECONDS", pre.gpu_seconds - 1)
    assert any("ZeroGPU window" in p for p in preflight(str(tiny_bpe), "gpuonly", hardware=zero).problems)
    small = Hardware("cuda", "Tiny GPU", 1000, 16 * GIB, 100 * GIB)
    assert any("of GPU memory" in p for p in preflight(str(tiny_bpe), "gpuonly", hardware=small).problems)
    assert gpu_seconds(7_000_000_000) > gpu_seconds(1_000_000_000) > gpu_seconds(0)


def test_page_is_built_from_the_registry(fake_formats, monkeypatch, tmp_path):
    """A new format gets a tab with its variants and one control per option; an unavailable one is disabled."""
    point_client_at("http://127.0.0.1:9", tmp_path / "hf_home", monkeypatch)   # no Hub login on this "machine"
    from quantspace.ui import build_demo

    config = build_demo().get_config_file()
    comps = {c["id"]: c for c in config["components"]}
    tabs = {c["props"]["label"]: c["props"] for c in comps.values() if c["type"] == "tabitem"}
    assert tabs["GGUF"]["interactive"] is True
    assert tabs["GPUONLY (unavailable)"]["interactive"] is False     # no GPU on this machine
    assert tabs["MISSING (unavailable)"]["interactive"] is False
    by_label = {c["props"].get("label"): c for c in comps.values()}
    assert [c[0] for c in by_label["GPUONLY variants"]["props"]["choices"]] == ["W4", "W8"]
    assert by_label["Group size"]["type"] == "number" and by_label["Group size"]["props"]["minimum"] == 32
    assert by_label["Zero point"]["type"] == "checkbox"
    assert by_label["Kernel"]["type"] == "dropdown"
    notes = " ".join(c["props"].get("value") or "" for c in comps.values() if c["type"] == "markdown")
    assert "MISSING** is unavailable: its backend package is not installed." in notes
    assert "GPUONLY** is unavailable: needs a CUDA GPU" in notes
    # Signed out and no machine login: no sign-in button, and the page says how to get one.
    assert not any(c["type"] == "loginbutton" for c in comps.values())
    assert "hf auth login" in notes
