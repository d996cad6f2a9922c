"""A visitor's own calibration text, uploaded with the call (the page's "Calibration file", the API's calib_file),
on a Space: the job reads that upload and nothing else, the card names it by its file name only, and a bad file
is one line. Typing a path on the Space's disk stays refused."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.test_app import TINY, served  # noqa: F401  (the app fixture, launched once for this module)
from tests.test_ui_browser import ARTIFACTS, CHROMIUM, app_url, browser  # noqa: F401  (python app.py, chromium)

pytestmark = pytest.mark.filterwarnings("ignore:Gradio does not support OAuth")
SMALL = {"imatrix_chunks": 2, "imatrix_ctx": 64}
SPACE_REFUSAL = "is a file path; on this Space, name a Hub dataset (id[:file]) for calibration text."


@pytest.fixture
def on_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "quantorg/QuantSpace")
    monkeypatch.delenv("QUANTSPACE_ALLOWED_FOLDERS", raising=False)


@pytest.fixture
def notes(tmp_path) -> Path:
    """A .jsonl of chat rows and plain rows, long enough for 2 chunks of 64 tokens."""
    path = tmp_path / "my notes.jsonl"
    rows = [{"text": f"Entry {i}: the lighthouse keeper counted {i * 7} gulls and wrote it down in green ink."}
            for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": "Which ink?"}, {"role": "assistant", "content": "Green."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tensors(gguf_path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(gguf_path).tensors}


def strings(gguf_path: Path) -> dict[str, str]:
    """The GGUF's metadata strings (not arrays)."""
    from gguf import GGUFReader, GGUFValueType

    return {k: bytes(f.parts[f.data[0]]).decode() for k, f in GGUFReader(gguf_path).fields.items()
            if f.types == [GGUFValueType.STRING]}


def test_an_uploaded_jsonl_calibrates_the_imatrix_on_a_space(served, notes, tiny_bpe, tmp_path,  # noqa: F811
                                                             monkeypatch, on_space):
    from gradio_client import handle_file

    from quantspace.pipeline import quantize
    from quantspace.ui.jobs import REGISTRY

    before = served.files_left()
    client = served.client()
    typed = {**SMALL, "calib_dataset": "quantorg/no-such-dataset"}     # the upload wins over the text
    report = client.predict(TINY, "gguf", ["Q4_K_M"], typed, "", False, False, "", handle_file(str(notes)),
                            api_name="/quantize")
    (details,) = [f["details"] for f in report["files"]]
    assert details["imatrix_dataset"] == "my_notes.jsonl"          # its base name (spaces made plain), no path
    assert report["options"]["calib_dataset"] == "my_notes.jsonl"
    assert "--calib-dataset my_notes.jsonl" in report["command"]
    kept = {Path(p) for p in served.files_left() - before}
    assert {p.name for p in kept} == {"tiny-llama-Q4_K_M.gguf", "quantspace.json"}   # the upload's copy is gone
    job_gguf = served.jobs / next(p for p in kept if p.suffix == ".gguf")
    meta = strings(job_gguf)
    assert meta["quantize.imatrix.dataset"] == "my_notes.jsonl"
    # No temp path (the upload's, or the job folder's) in anything offered or pushed: report, card, GGUF.
    (job,) = [j for j in REGISTRY._jobs.values() if j.result is not None and j.result.report == report]
    assert "computed in PyTorch on 2 chunks of 64 tokens of my_notes.jsonl" in job.result.card
    published = [job.result.card, (served.jobs / next(p for p in kept if p.suffix == ".json")).read_text(),
                 *meta.values()]
    for text in published:
        assert "/tmp" not in text and "job-" not in text and str(notes.parent) not in text

    # The same file given on the CLI (off a Space) makes the same weights: the imatrix came from that text...
    monkeypatch.delenv("SPACE_ID")
    cli = quantize(str(tiny_bpe), variants=["Q4_K_M"], out=tmp_path / "cli", no_eval=True,
                   options={**SMALL, "calib_dataset": str(notes)})
    cli_gguf = tmp_path / "cli" / "tiny-llama-bpe-Q4_K_M.gguf"
    assert tensors(cli_gguf) == tensors(job_gguf)
    assert cli.files[0].details["imatrix_dataset"] == "my notes.jsonl"
    # ...and not from the shipped text, which makes other weights.
    shipped = quantize(str(tiny_bpe), variants=["Q4_K_M"], out=tmp_path / "shipped", no_eval=True, options=SMALL)
    assert shipped.files[0].details["imatrix_dataset"] != "my_notes.jsonl"
    assert tensors(tmp_path / "shipped" / "tiny-llama-bpe-Q4_K_M.gguf") != tensors(job_gguf)


def test_the_uploaded_files_path_typed_as_text_is_still_refused(served, notes, on_space):  # noqa: F811
    from gradio_client.exceptions import AppError

    before = served.jobs_left()
    with pytest.raises(AppError) as refused:
        served.client().predict(TINY, "gguf", ["Q4_K_M"], {**SMALL, "calib_dataset": str(notes)}, "", False, False,
                                "", api_name="/quantize")
    assert str(refused.value) == f"'{notes}' {SPACE_REFUSAL}"
    assert served.jobs_left() == before


def test_calib_file_must_be_an_upload_not_a_path_on_the_disk(served, tmp_path, on_space):  # noqa: F811
    """gradio_client sends a plain dict as it is (Gradio checks only a FileData with its meta marker): a path
    on the Space's disk passed that way is refused before any job exists."""
    from gradio_client.exceptions import AppError

    secret = tmp_path / "owner-notes.txt"
    secret.write_text("the owner's private text\n\nmore of it\n")
    before = served.jobs_left()
    client = served.client()
    for value in ({"path": str(secret), "orig_name": "notes.txt"}, {"path": "/etc/hostname"}):
        with pytest.raises(AppError, match="calib_file must be a file uploaded with the call"):
            client.predict(TINY, "gguf", ["Q4_K_M"], SMALL, "", False, False, "", value, api_name="/quantize")
        with pytest.raises(AppError, match="calib_file must be a file uploaded with the call"):
            client.predict(TINY, "gguf", ["Q4_K_M"], SMALL, "", False, False, "", value, api_name="/start_job")
    assert served.jobs_left() == before


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "Found no text in empty.txt; it needs a 'text' column or chat messages."),
    ("blob.txt", b"\x7fELF\x00\x01\x02" * 40, "blob.txt is a binary file, not UTF-8 text."),
    ("table.csv", b"text\nhello\n", "Cannot read table.csv: use a .txt, .jsonl, .json or .parquet file."),
])
def test_a_bad_upload_is_one_line_before_the_job_starts(served, tmp_path, on_space, name, content,  # noqa: F811
                                                        message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    bad = tmp_path / name
    bad.write_bytes(content)
    before = served.jobs_left()
    client = served.client()
    for endpoint in ("/quantize", "/start_job"):
        with pytest.raises(AppError) as refused:
            client.predict(TINY, "gguf", ["Q4_K_M"], SMALL, "", False, False, "", handle_file(str(bad)),
                           api_name=endpoint)
        assert str(refused.value) == message
    assert served.jobs_left() == before


def test_a_too_large_upload_is_refused_before_it_is_copied(served, notes, monkeypatch, on_space):  # noqa: F811
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from quantspace.ui import jobs

    monkeypatch.setattr(jobs, "MAX_UPLOAD_BYTES", notes.stat().st_size - 1)
    before = served.jobs_left()
    with pytest.raises(AppError) as refused:
        served.client().predict(TINY, "gguf", ["Q4_K_M"], SMALL, "", False, False, "", handle_file(str(notes)),
                                api_name="/start_job")
    size_mb = f"{notes.stat().st_size / 1e6:.0f}"
    assert str(refused.value) == (f"my_notes.jsonl is {size_mb} MB; a calibration file may be at most "
                                  f"{jobs.MAX_UPLOAD_BYTES // 10**6} MB.")
    assert served.jobs_left() == before


def test_the_trust_is_one_name_in_one_context(notes, on_space):
    """allowed_files opens exactly the names given, only inside, only in that context (another job's thread
    never sees it), and never opens the file's path or folder to folder_allowed."""
    from quantspace.calib import load_calibration_text
    from quantspace.errors import CalibrationError
    from quantspace.source import allowed_files, folder_allowed, trusted_file

    seen_elsewhere = []
    with allowed_files({"mine.jsonl": notes}):
        assert load_calibration_text("mine.jsonl").source == notes.name
        assert not folder_allowed(notes) and not folder_allowed(notes.parent)
        with pytest.raises(CalibrationError, match="on this Space, name a Hub dataset"):
            load_calibration_text(str(notes))
        other = threading.Thread(target=lambda: seen_elsewhere.append(trusted_file("mine.jsonl")))
        other.start()
        other.join()
    assert seen_elsewhere == [None]
    assert trusted_file("mine.jsonl") is None


@pytest.mark.parametrize("given, plain", [
    ("my notes.jsonl", "my_notes.jsonl"),
    ("../../etc/passwd.TXT", "passwd.txt"),
    ("C:\\Users\\me\\data.parquet", "data.parquet"),
    ("x.txt:secret", "x.txt_secret"),
    (".jsonl", "calibration.jsonl"),
    ("", "calibration"),
])
def test_an_upload_keeps_only_a_plain_base_name(given, plain):
    from quantspace.ui.jobs import upload_name

    assert upload_name(given) == plain


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_page_uploads_a_calibration_file_and_runs(app_url, browser, notes):  # noqa: F811
    """In a real browser: the GGUF tab's "Calibration file", an upload, Quantize: the job used that file."""
    from playwright.sync_api import expect

    url, _, _, app_log = app_url
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    model = page.locator("#model textarea, #model input").first
    model.fill(TINY)
    model.press("Enter")
    expect(page.locator("#preflight")).to_contain_text("Ready.", timeout=60_000)   # the first imports torch
    upload = page.locator("#calib-file-gguf")
    expect(upload).to_contain_text("Calibration file")
    expect(page.get_by_text("An uploaded file wins over the box above")).to_be_visible()
    upload.locator("input[type=file]").set_input_files(str(notes))
    expect(upload).to_contain_text("my notes.jsonl", timeout=30_000)
    page.locator("#advanced-gguf").get_by_text("Advanced").click()   # the imatrix's size is an advanced setting
    for label, value in (("Imatrix chunks", "2"), ("Imatrix tokens per chunk", "64")):
        page.get_by_label(label).fill(value)
    page.locator("#evaluate input").uncheck()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "calib-upload.png"), full_page=True)
    page.locator("#run").click()
    expect(page.locator("#result")).to_contain_text("Done (not pushed)", timeout=180_000)
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"calibration text: my_notes.jsonl \(uploaded\)"))
    report = next(a.get_attribute("href") for a in page.locator("#files a").all()
                  if a.get_attribute("href").endswith("quantspace.json"))
    with urllib.request.urlopen(urllib.parse.urljoin(url, report)) as r:
        data = json.load(r)
    assert {f["details"].get("imatrix_dataset") for f in data["files"] if f["variant"] != "Q8_0"} == {"my_notes.jsonl"}
    page.close()
    log = app_log.read_text(errors="replace")   # no handler failed silently (Gradio logs a traceback then)
    assert not re.search(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", log, re.M), log[-4000:]
