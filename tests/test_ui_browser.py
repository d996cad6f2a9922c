"""The page in a real browser: Debian's chromium driven by Playwright against `python app.py` and the local Hub.

Signed out (no push, an empty model id), sign in (Gradio's mocked OAuth, backed by alice's token), bad models
and a target alice cannot write to, then the tiny model: preflight, a GGUF run that pushes, the result link
and the size-vs-accuracy plot; the job's link reopening it (for alice only), a job that goes on after its tab
closes, and Cancel. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.hubserver import HubServer
from tests.test_app import NEWER, TINY, UNKNOWN, launch_app_env

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, tiny_bpe):
    """`python app.py` in its own process group, against a local Hub seeded with the tiny model."""
    tmp = tmp_path_factory.mktemp("browser")
    port = free_port()
    with pytest.MonkeyPatch.context() as mp, HubServer(root=tmp / "hub") as hub:
        launch_app_env(tmp, mp, hub, tiny_bpe)
        env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
        log = open(tmp / "app.log", "wb")
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_http(url, proc)
            yield url, hub, tmp / "jobs", tmp / "app.log"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_sign_in_preflight_quantize_and_see_the_result(app_url, browser):
    from playwright.sync_api import expect

    url, hub, jobs, _ = app_url
    ARTIFACTS.mkdir(exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900})   # one visitor, several tabs
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    expect(page.get_by_text("Not signed in.")).to_be_visible()
    expect(page.locator("#push input")).to_be_disabled()          # signed out: nothing can be pushed
    page.locator("#run").click()                                   # no model given: a readable error
    # The first job imports the pipeline (torch...): seconds on a busy machine.
    expect(page.get_by_text("No model given").first).to_be_visible(timeout=60_000)

    page.get_by_role("button", name=re.compile("Sign in with Hugging Face")).click()
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    expect(page.get_by_role("button", name=re.compile(r"Logout \(alice\)"))).to_be_visible()
    expect(page.locator("#push input")).to_be_checked()

    model = page.locator("#model textarea, #model input").first
    preflight = page.locator("#preflight")
    # Bad models: the preflight says what is wrong and the run stays disabled.
    for bad, message in [("quantorg/does-not-exist", "was not found"), (UNKNOWN, "MysteryForCausalLM is not supported")]:
        model.fill(bad)
        model.press("Enter")
        expect(preflight).to_contain_text(message)
        expect(page.locator("#run")).to_be_disabled()

    # Gemma 3 and Qwen3 pass the preflight, saying which converter will make the GGUF.
    for repo, arch in [(r, f"{a.capitalize()}ForCausalLM") for r, (_, a) in NEWER.items()]:
        model.fill(repo)
        model.press("Enter")
        expect(preflight).to_contain_text(arch)
        expect(preflight).to_contain_text("Converted by")
        expect(preflight).to_contain_text("Ready.")
        expect(page.locator("#run")).to_be_enabled()

    model.fill(TINY)
    model.press("Enter")
    expect(preflight).to_contain_text("LlamaForCausalLM")
    expect(preflight).to_contain_text("Ready.")
    expect(preflight).to_contain_text("Q4_K_M")
    # A device budget: the preflight sizes the fitted file; a budget no file meets is refused before any work.
    fit = page.get_by_label("Best file for a size or a device")
    for value, shown in [("8GB-GPU-8k", "FIT-8GB-GPU-8k"), ("100KB", "the smallest file this model can be")]:
        fit.fill(value)
        fit.press("Enter")
        expect(preflight).to_contain_text(shown)
    expect(page.locator("#run")).to_be_disabled()
    fit.fill("")
    fit.press("Enter")
    expect(preflight).to_contain_text("Ready.")
    target = page.locator("#target input, #target textarea").first
    expect(target).to_have_value("alice/tiny-llama-GGUF")
    # A namespace alice cannot write to is refused before any work.
    target.fill("bob/tiny-llama-GGUF")
    target.blur()
    expect(preflight).to_contain_text("cannot write to 'bob'")
    expect(page.locator("#run")).to_be_disabled()
    target.fill("alice/tiny-llama-GGUF")
    target.blur()
    expect(preflight).to_contain_text("Ready.")
    page.screenshot(path=str(ARTIFACTS / "preflight.png"), full_page=True)

    page.locator("#run").click()
    result = page.locator("#result")
    expect(result).to_contain_text("Pushed to alice/tiny-llama-GGUF", timeout=240_000)
    link = result.get_by_role("link", name="alice/tiny-llama-GGUF")
    assert link.get_attribute("href").endswith("/alice/tiny-llama-GGUF")
    plot = page.locator("#plot")
    expect(plot).to_be_visible()
    expect(plot.locator("canvas, svg").first).to_be_visible()
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"download.*quantize Q4_K_M.*upload done", re.S))
    expect(page.locator("#run")).to_be_enabled()                 # ready for the next job
    expect(page.locator("#cancel")).to_be_disabled()
    page.screenshot(path=str(ARTIFACTS / "result.png"), full_page=True)

    assert {"tiny-llama-Q4_K_M.gguf", "tiny-llama-Q8_0.gguf", "quantspace.json"} <= set(hub.files("alice/tiny-llama-GGUF"))
    # Pushed: the job keeps only its report for download until its retention ends, no weights.
    assert {p.name for p in jobs.rglob("*") if p.is_file()} == {"quantspace.json"}

    # Not pushed: the files themselves are offered for download (Gradio serves its own copies).
    page.locator("#push input").uncheck()
    page.locator("#evaluate input").uncheck()
    expect(preflight).to_contain_text("Ready.")
    page.locator("#run").click()
    expect(result).to_contain_text("Done (not pushed)", timeout=120_000)
    expect(page.locator("#plot")).to_be_hidden()                  # nothing measured, nothing to plot
    links = {a.get_attribute("href").rsplit("/", 1)[-1]: a.get_attribute("href")
             for a in page.locator("#files a").all()}
    assert set(links) == {"quantspace.json", "tiny-llama-Q4_K_M.gguf", "tiny-llama-Q8_0.gguf"}
    with urllib.request.urlopen(urllib.parse.urljoin(url, links["tiny-llama-Q8_0.gguf"])) as r:
        assert r.read(4) == b"GGUF"
    assert "tiny-llama-Q8_0.gguf" in {p.name for p in jobs.rglob("*")}   # kept for the job's link
    # The job folder itself is never served by path.
    job_file = next(jobs.rglob("tiny-llama-Q8_0.gguf"))
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.parse.urljoin(url, f"gradio_api/file={job_file}"))

    # The job's link reopens it, signed in as alice, in another tab: the result and the files again.
    job_url = urllib.parse.urljoin(url, page.locator("#job-link a").first.get_attribute("href"))
    assert "?job=" in job_url
    again = context.new_page()
    again.set_default_timeout(60_000)
    again.goto(job_url)
    expect(again.locator("#result")).to_contain_text("Done (not pushed)")
    expect(again.locator("#log textarea")).to_have_value(re.compile(r"quantize Q8_0.*finished", re.S))
    expect(again.locator("#files a")).to_have_count(len(links))
    names = {a.get_attribute("href").rsplit("/", 1)[-1] for a in again.locator("#files a").all()}
    assert names == set(links)
    again.screenshot(path=str(ARTIFACTS / "job-reopened.png"), full_page=True)
    # A visitor who is not alice (a fresh browser, signed out) learns nothing about it.
    stranger = browser.new_page()
    stranger.goto(job_url)
    expect(stranger.locator("#job-link")).to_contain_text("No job with this id is visible to you")
    expect(stranger.locator("#result")).not_to_contain_text("Done")
    assert not stranger.locator("#files a").count()
    stranger.close()
    context.close()


def signed_in_page(browser, url: str, target_repo: str):
    """A fresh browser context signed in as alice, the tiny model and `target_repo` filled in and checked."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("button", name=re.compile("Sign in with Hugging Face")).click()
    expect(page.get_by_text("Signed in as alice")).to_be_visible()
    model = page.locator("#model textarea, #model input").first
    model.fill(TINY)
    model.press("Enter")
    expect(page.locator("#preflight")).to_contain_text("Ready.", timeout=60_000)   # the first imports the pipeline
    target = page.locator("#target input, #target textarea").first
    target.fill(target_repo)
    target.blur()
    expect(page.locator("#preflight")).to_contain_text("Ready.")
    return context, page


def start_signed_in_run(browser, url: str, target_repo: str):
    """signed_in_page, and the run started."""
    context, page = signed_in_page(browser, url, target_repo)
    page.locator("#run").click()
    return context, page


def test_a_job_on_hugging_face_jobs_from_the_page(app_url, browser):
    """Signed in, "Run on" Hugging Face Jobs: the preflight shows the machine, its price and the estimate; the
    run starts a Job (on the local Hub, as a subprocess), the page links it, shows its stages and the pushed
    result."""
    from playwright.sync_api import expect

    url, hub, _, _ = app_url
    context, page = signed_in_page(browser, url, "alice/tiny-page-jobs-GGUF")
    preflight = page.locator("#preflight")
    page.locator("#where input").click()
    page.get_by_role("option", name=re.compile("cheapest machine that fits")).click()
    expect(preflight).to_contain_text("Hugging Face Jobs: cpu-basic", timeout=30_000)
    expect(preflight).to_contain_text("billed to alice")
    expect(page.locator("#run")).to_be_enabled()
    page.screenshot(path=str(ARTIFACTS / "hf-jobs-preflight.png"), full_page=True)
    page.locator("#run").click()
    expect(page.locator("#job-link")).to_contain_text("Hugging Face Job", timeout=120_000)
    expect(page.locator("#result")).to_contain_text("Pushed to alice/tiny-page-jobs-GGUF", timeout=240_000)
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"Hugging Face Job .*quantize Q4_K_M", re.S))
    page.screenshot(path=str(ARTIFACTS / "hf-jobs-result.png"), full_page=True)
    [job] = [j for j in hub.jobs.jobs.values() if "alice/tiny-page-jobs-GGUF" in j.spec["command"]]
    assert job.spec["flavor"] == "cpu-basic" and job.stage == "COMPLETED"
    assert "quantspace.json" in hub.files("alice/tiny-page-jobs-GGUF")
    context.close()


def test_a_job_goes_on_after_its_tab_closes(app_url, browser):
    from playwright.sync_api import expect

    url, hub, _, _ = app_url
    context, page = start_signed_in_run(browser, url, "alice/closed-tab-GGUF")
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"download|convert"), timeout=120_000)
    job_url = urllib.parse.urljoin(url, page.locator("#job-link a").first.get_attribute("href"))
    page.close()                                    # the tab goes away mid-run
    again = context.new_page()
    again.set_default_timeout(60_000)
    again.goto(job_url)
    expect(again.locator("#result")).to_contain_text("Pushed to alice/closed-tab-GGUF", timeout=240_000)
    expect(again.locator("#log textarea")).to_have_value(re.compile(r"download.*upload done.*finished", re.S))
    assert "tiny-llama-Q8_0.gguf" in hub.files("alice/closed-tab-GGUF")
    context.close()


def test_cancel_on_the_page_stops_its_job(app_url, browser):
    from playwright.sync_api import expect

    url, hub, jobs, _ = app_url
    before = {p.name for p in jobs.iterdir()}
    context, page = start_signed_in_run(browser, url, "alice/cancelled-on-page-GGUF")
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"download"), timeout=120_000)
    page.locator("#cancel").click()
    expect(page.locator("#log textarea")).to_have_value(re.compile(r"cancelled: nothing was pushed"))
    expect(page.locator("#run")).to_be_enabled()
    assert not any(r.repo_id == "alice/cancelled-on-page-GGUF" for r in hub._repos.values())
    assert {p.name for p in jobs.iterdir()} == before
    context.close()


def test_the_page_caused_no_server_errors(app_url):
    """Every handler the clicks above triggered returned what the page expects (Gradio logs a traceback when
    one does not, while the page silently shows nothing). Readable errors shown to the user (gr.Error) are
    logged too, and are fine."""
    log = app_url[3].read_text(errors="replace")
    raised = [line for line in log.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
    assert [line for line in raised if not line.startswith("gradio.exceptions.Error:")] == [], log[-4000:]
    assert raised, "the bad-input steps above should have shown readable errors"
