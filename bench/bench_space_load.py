"""Load on the Space: 8 gradio_client users at once, against `app.py` and a local Hub (no network).

Clients 0..J-1 each submit one /quantize job (a tiny model, a variant of their own, pushed to their own
repo with their own token) and watch its status; the others storm /preflight with their own token and
target. Reported: preflight latency p50/p95 while a job runs (and while none does), the queue positions each
job client saw, the app's peak RSS (its process tree), and isolation checks: no client sees another user's
files, progress log or result; every job folder is gone at the end.

    . .venv/bin/activate
    python bench/bench_space_load.py                  # 8 clients, 3 jobs (measuring accuracy)
    python bench/bench_space_load.py --clients 8 --jobs 3 --no-evaluate --json /tmp/load.json

Only the /preflight and /quantize endpoints are used (README, "API"), so the script keeps working while the
job API grows.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hubserver import HubServer  # noqa: E402
from tests.tiny import build_tiny  # noqa: E402

MODEL = "bench/tiny-llama"
JOB_VARIANTS = ["Q8_0", "Q4_K_M", "Q2_K", "Q6_K", "Q5_K_M", "Q3_K_M", "Q4_0", "Q5_K_S"]


def token(i: int) -> str:
    return f"hf_user{i}_token"


def target(i: int) -> str:
    return f"user{i}/tiny-llama-GGUF"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))], 1)


@dataclass
class JobWatch:
    client: int
    variant: str
    ranks: list[tuple[int | None, int | None]] = field(default_factory=list)   # (rank, queue size) seen
    log: list[str] = field(default_factory=list)                               # progress descriptions seen
    started: float | None = None     # first PROCESSING status
    finished: float | None = None
    result: dict | None = None
    error: str | None = None


def start_app(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    out = log.open("wb")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=2).read(64)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"app.py did not answer on {url} within 300 s; see {log}")


def run_job(url: str, w: JobWatch, evaluate: bool) -> None:
    from gradio_client import Client

    i = w.client
    client = Client(url, verbose=False)
    job = client.submit(MODEL, "gguf", [w.variant], {}, target(i), False, evaluate, token(i), api_name="/quantize")
    while not job.done():
        st = job.status()
        code = str(getattr(st.code, "value", st.code))
        w.ranks.append((st.rank, st.queue_size))
        if code.lower() in ("processing", "progress") and w.started is None:
            w.started = time.monotonic()
        for p in st.progress_data or []:
            if p.desc and (not w.log or w.log[-1] != p.desc):
                w.log.append(p.desc)
        time.sleep(0.1)
    w.finished = time.monotonic()
    w.started = w.started or w.finished
    try:
        w.result = job.result()
    except Exception as exc:  # reported, not raised: the other clients go on
        w.error = f"{type(exc).__name__}: {exc}"


def storm(url: str, i: int, stop: threading.Event, samples: list[tuple[float, float, int, dict]]) -> None:
    from gradio_client import Client

    client = Client(url, verbose=False)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            res = client.predict(MODEL, "gguf", ["Q4_K_M"], target(i), True, token(i), api_name="/preflight")
        except Exception as exc:  # counted as a failed preflight; the storm goes on
            res = {"ok": False, "problems": [f"{type(exc).__name__}: {exc}"]}
        samples.append((t0, time.monotonic(), i, res))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=3, help="clients that submit a quantize job (the rest storm)")
    ap.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                    help="skip the accuracy measurement in the jobs (they are then very short)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="seconds of preflights before the jobs start")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    assert 0 < args.jobs < args.clients <= len(JOB_VARIANTS)

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    tiny = Path(os.environ.get("QUANTSPACE_TEST_CACHE", ROOT / "tests" / ".cache")) / "tiny-llama-bpe"
    if not (tiny / "model.safetensors").is_file():
        build_tiny(tiny, "bpe", "llama")
    with HubServer(root=tmp / "hub") as hub:
        for i in range(args.clients):
            hub.add_user(f"user{i}", token(i), orgs=["bench"] if i == 0 else [])
        hub.create_repo(MODEL)
        hub.upload_folder(MODEL, tiny)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update({
            "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_CACHE": str(tmp / "hf_home" / "hub"),
            "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
            "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port), "QUANTSPACE_JOBS_DIR": str(tmp / "jobs"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        })
        t_launch = time.monotonic()
        app = start_app(env, port, tmp / "app.log")
        launch_s = time.monotonic() - t_launch
        url = f"http://127.0.0.1:{port}/"
        rss_peak, stop_rss = [tree_rss(app.pid)], threading.Event()

        def sample_rss() -> None:
            while not stop_rss.is_set():
                rss_peak.append(tree_rss(app.pid))
                time.sleep(0.2)

        threading.Thread(target=sample_rss, daemon=True).start()
        idle_rss = rss_peak[0]
        try:
            watches = [JobWatch(i, JOB_VARIANTS[i]) for i in range(args.jobs)]
            samples: list[tuple[float, float, int, dict]] = []
            stop = threading.Event()
            storms = [threading.Thread(target=storm, args=(url, i, stop, samples), daemon=True)
                      for i in range(args.jobs, args.clients)]
            jobs = [threading.Thread(target=run_job, args=(url, w, args.evaluate), daemon=True) for w in watches]
            t0 = time.monotonic()
            for t in storms:
                t.start()
            time.sleep(args.idle_s)   # preflights with no job running, for comparison
            for t in jobs:
                t.start()
                time.sleep(0.2)
            for t in jobs:
                t.join()
            time.sleep(1.0)
            stop.set()
            for t in storms:
                t.join(timeout=120)
            wall = time.monotonic() - t0
        finally:
            stop_rss.set()
            app.terminate()
            try:
                app.wait(timeout=30)
            except subprocess.TimeoutExpired:
                app.kill()

        # -- figures
        busy = [(w.started, w.finished) for w in watches if w.started and w.finished]

        def during_job(a: float, b: float) -> bool:
            return any(a < f and b > s for s, f in busy)

        lat_busy = [1000 * (b - a) for a, b, _, _ in samples if during_job(a, b)]
        lat_idle = [1000 * (b - a) for a, b, _, _ in samples if not during_job(a, b)]
        # -- isolation
        problems: list[str] = []
        for w in watches:
            others = [v for v in JOB_VARIANTS[: args.jobs] if v != w.variant]
            if w.error or w.result is None:
                problems.append(f"client {w.client}: job failed: {w.error}")
                continue
            if w.result.get("repo_id") != target(w.client):
                problems.append(f"client {w.client}: result names repo {w.result.get('repo_id')}")
            variants = {f["variant"] for f in w.result.get("files", [])}
            if variants != {w.variant}:
                problems.append(f"client {w.client}: result lists variants {sorted(variants)}")
            if any(v in line for line in w.log for v in others):
                problems.append(f"client {w.client}: progress log shows another job's variant: {w.log}")
            files = set(hub.files(target(w.client)))
            if any(v in name for name in files for v in others):
                problems.append(f"client {w.client}: repo holds another job's files: {sorted(files)}")
        for a, b, i, res in samples:
            text = json.dumps(res)
            if any(target(j) in text for j in range(args.clients) if j != i):
                problems.append(f"client {i}: a preflight result names another user's target")
                break
        jobs_left = sorted(p.name for p in (tmp / "jobs").iterdir()) if (tmp / "jobs").exists() else []
        if jobs_left:
            problems.append(f"job folders left behind: {jobs_left}")

        figures = {
            "clients": args.clients, "jobs": args.jobs, "evaluate": args.evaluate, "wall_s": round(wall, 1),
            "app_start_s": round(launch_s, 1),
            "preflight_calls": len(samples),
            "preflight_failed": sum(1 for *_, res in samples if not res.get("ok")),
            "preflight_problems": sorted({p for *_, res in samples for p in res.get("problems", [])})[:5],
            "preflight_ms_while_job_runs": {"n": len(lat_busy), "p50": pct(lat_busy, 50), "p95": pct(lat_busy, 95)},
            "preflight_ms_no_job": {"n": len(lat_idle), "p50": pct(lat_idle, 50), "p95": pct(lat_idle, 95)},
            "job_s": {w.variant: round((w.finished or 0) - (w.started or 0), 1) for w in watches},
            "queue_positions_seen": {w.variant: sorted({r for r, _ in w.ranks if r is not None}) for w in watches},
            "queue_size_max": max((q for w in watches for _, q in w.ranks if q is not None), default=None),
            "job_logs": {w.variant: w.log for w in watches},
            "rss_mb": {"idle": round(idle_rss / 2**20), "peak": round(max(rss_peak) / 2**20)},
            "isolation_problems": problems,
        }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
