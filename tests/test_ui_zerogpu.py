"""The ZeroGPU code path: app.py with SPACES_ZERO_GPU=true, in its own process group, against a fake device API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.zerogpu_fake import FakeZeroGPU

ROOT = Path(__file__).resolve().parent.parent
PARAMETERS = 1_500_000_000   # a 1.5B model asks for a longer window than the 60 s default


def run_probe(tmp_path: Path, fake: FakeZeroGPU) -> dict:
    cgroup = tmp_path / "cgroup"
    cgroup.write_text("0::/\n1:devices:/fake-space\n")
    env = {**os.environ, "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": fake.url,
           "ZEROGPU_PROC_SELF_CGROUP_PATH": str(cgroup), "ZEROGPU_OFFLOAD_DIR": str(tmp_path / "offload"),
           "HOME": str(tmp_path), "PROBE_PARAMETERS": str(PARAMETERS), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests.zerogpu_fake"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the probe and the ZeroGPU worker it forked
        except ProcessLookupError:
            pass
        proc.wait()
    text = out.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("PROBE ")]
    assert lines, text[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def test_gpu_stages_run_in_zerogpu_windows(tmp_path):
    with FakeZeroGPU() as fake:
        probe = run_probe(tmp_path, fake)
        calls = list(fake.calls)
    # The stage ran in the forked ZeroGPU worker, not in the app's process.
    assert probe["worker_pid"] != probe["parent_pid"]
    schedules = [params for path, params in calls if path == "/schedule"]
    assert schedules and all(int(p["durationSeconds"]) == probe["expected_seconds"] for p in schedules)
    assert probe["expected_seconds"] > 60   # computed from the model size, not the default
    allows = [params for path, params in calls if path == "/allow"]
    assert allows and allows[0]["pid"] == str(probe["worker_pid"])
    releases = [params for path, params in calls if path == "/release"]
    assert releases[0]["fail"] == "false"          # the first window succeeded
    # Failures come back as readable gr.Error messages, and the window is released as failed.
    assert probe["error"] == {"type": "gr.Error", "message": "llama.cpp could not quantize the model (test)."}
    assert "true" in [r["fail"] for r in releases[1:]]
    assert probe["unpicklable"]["type"] == "gr.Error"
    assert "arguments must pickle" in probe["unpicklable"]["message"]
    assert probe["unpicklable_result"]["type"] == "gr.Error"
    assert "result cannot leave the ZeroGPU window" in probe["unpicklable_result"]["message"]
