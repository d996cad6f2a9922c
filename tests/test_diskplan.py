"""The disk plan: the preflight's figure is the job's real peak, and a job the disk cannot hold stops before it
downloads anything."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from quantspace.errors import DiskFullError
from tests.test_faults import tmpdir_env  # noqa: F401  (fixture)
from tests.test_pipeline import seed


def _files(roots: list[Path]) -> dict[str, int]:
    sizes = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for f in files:
                try:
                    sizes[os.path.join(folder, f)] = os.lstat(os.path.join(folder, f)).st_size
                except FileNotFoundError:   # removed while we looked
                    pass
    return sizes


def _used(roots: list[Path]) -> int:
    return sum(_files(roots).values())


class PeakDisk:
    """The most bytes the folders held at once. Use only grows between deletions, so it is read before every
    deletion Python makes (llama.cpp and the converters write; only Python code deletes) and at the end."""

    def __init__(self, roots: list[Path], monkeypatch: pytest.MonkeyPatch):
        self.roots, self.peak, self._lock = roots, 0, threading.RLock()
        self.at_peak: dict[str, int] = {}   # what was there, for a failure's message
        for name in ("unlink", "remove", "rmdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._before(real))

    def _before(self, real):  # noqa: ANN001, ANN202
        def deleting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.look()
            return real(*args, **kwargs)
        return deleting

    def look(self) -> None:
        with self._lock:
            files = _files(self.roots)
            if sum(files.values()) > self.peak:
                self.peak, self.at_peak = sum(files.values()), files


@pytest.mark.parametrize("options,evaluate", [({}, True), ({"fit": "5MB"}, True), ({"fit": "5MB"}, False)])
def test_the_preflight_disk_figure_is_the_jobs_measured_peak(hub, tiny_bpe, tmp_path, tmpdir_env,  # noqa: F811
                                                              monkeypatch, options, evaluate):
    """The download, the files, and the larger of the intermediates (F16 file, a --fit candidate) and the
    evaluation's scratch (the source's log-probabilities), within 10% of what the folders really held at most."""
    from quantspace import quantize
    from quantspace.preflight import preflight

    seed(hub, "quantorg/tiny", tiny_bpe)
    variants = ["Q4_K_M", "Q8_0"]
    pre = preflight("quantorg/tiny", "gguf", variants, evaluate=evaluate, options=options)
    assert pre.ok and pre.download_bytes > 0
    run = tmp_path / "run"
    roots = [tmp_path / "hf_home", run, tmpdir_env]   # Hub cache, --out's folder, temp space (not the test Hub's)
    for r in roots:
        r.mkdir(exist_ok=True)
    before = _used(roots)
    with monkeypatch.context() as m:
        disk = PeakDisk(roots, m)
        quantize("quantorg/tiny", variants=variants, out=run / "out", no_eval=not evaluate,
                 options={"imatrix_chunks": 4, "imatrix_ctx": 64, **options})
        disk.look()
    peak = disk.peak - before
    big = sorted(((n, p) for p, n in disk.at_peak.items() if n > 10**5), reverse=True)
    assert abs(peak - pre.disk_needed) <= 0.10 * peak, (peak, pre.disk_needed, big)


def test_a_job_the_disk_cannot_hold_stops_before_downloading(hub, tiny_bpe, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    from quantspace import diskplan
    from tests.test_faults import one_error_line
    from tests.test_pipeline import run_cli

    seed(hub, "quantorg/tiny", tiny_bpe)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(diskplan.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(DiskFullError, match=r"needs about .* and only 1.00 MB is free") as err:
        from quantspace import quantize

        quantize("quantorg/tiny", variants=["Q4_K_M"], out=tmp_path / "out")
    assert "Nothing was downloaded" in str(err.value) and "(download 6." in str(err.value)
    assert not list((tmp_path / "hf_home").rglob("*.safetensors")) and not (tmp_path / "out").exists()
    code, _, stderr = run_cli(["quantize", "quantorg/tiny", "--variants", "Q4_K_M", "--out", str(tmp_path / "o")],
                              capsys)
    assert code != 0 and "Nothing was downloaded" in one_error_line(stderr)
