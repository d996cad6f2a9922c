"""The Space's build configuration (README front matter + requirements.txt) stays inside what ZeroGPU runs,
asks for the sign-in scopes the product needs, and local/CI installs keep a CPU torch.

These read the real files: a pin moved outside ZeroGPU's list fails here, not at the Space's build.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# What ZeroGPU builds, from the Hub's documentation ("Spaces ZeroGPU", section "Supported Versions";
# docs/hub/spaces-zerogpu.md in huggingface/hub-docs). The lists came with its Blackwell update of 2026-05-13
# and were unchanged in the version read on 2026-12-02 (last changed 2026-07-21). Any other version fails the
# build with "No candidate PyTorch version found for ZeroGPU". Update both lists and these dates together.
ZEROGPU_PYTHON = {"3.10.13", "3.12.12"}
ZEROGPU_TORCH = {"2.8.0", "2.9.1", "2.10.0", "2.11.0"}

# The Hub's OAuth scopes the product needs ("Sign-In with HF" docs, section "Scopes"), and why; asking for
# more (manage-repos, inference-api...) is as wrong as asking for less.
NEEDED_SCOPES = {
    "read-repos": "quantize the visitor's private models",
    "gated-repos": "quantize public gated models (Llama, Gemma...) the visitor was granted",
    "write-repos": "push results to the visitor's existing repos",
    "contribute-repos": "create the target repo (write-repos alone cannot create one)",
    "jobs": "run a job on Hugging Face Jobs, billed to the visitor (or an organisation of theirs)",
}


def front_matter(readme: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", readme, re.S)
    assert m, "README.md must start with the Space's YAML front matter"
    return yaml.safe_load(m[1])


def pins(requirements: str) -> dict[str, str]:
    """name -> exact version of every `name==version` line (extras dropped, names normalised)."""
    out = {}
    for line in requirements.splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            spec = str(req.specifier)
            assert spec.startswith("==") and "," not in spec, f"'{line}' is not an exact pin"
            out[req.name.lower().replace("_", "-")] = spec[2:]
    return out


def zerogpu_problems(meta: dict, pinned: dict[str, str]) -> list[str]:
    """Why this configuration would not build or run on ZeroGPU (empty when it would)."""
    problems = []
    if str(meta.get("sdk_version")) != pinned.get("gradio"):
        problems.append(f"sdk_version {meta.get('sdk_version')} differs from the gradio pin {pinned.get('gradio')}")
    if not str(meta.get("suggested_hardware", "")).startswith("zero-"):
        return problems
    if meta.get("sdk") != "gradio":
        problems.append(f"ZeroGPU runs Gradio Spaces only, not sdk {meta.get('sdk')}")
    if str(meta.get("python_version")) not in ZEROGPU_PYTHON:
        problems.append(f"python_version {meta.get('python_version')} is not one of {sorted(ZEROGPU_PYTHON)}")
    if pinned.get("torch") not in ZEROGPU_TORCH:
        problems.append(f"torch {pinned.get('torch')} is not one of {sorted(ZEROGPU_TORCH, key=Version)}")
    if "spaces" not in pinned:
        problems.append("the spaces package (the @spaces.GPU decorator) is not pinned")
    return problems


def read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def test_the_space_builds_on_zerogpu():
    meta, pinned = front_matter(read("README.md")), pins(read("requirements.txt"))
    assert meta["suggested_hardware"].startswith("zero-"), "the Space is meant for ZeroGPU"
    assert zerogpu_problems(meta, pinned) == []
    # pyproject's floor must admit the Space's Python too.
    requires = tomllib.loads(read("pyproject.toml"))["project"]["requires-python"]
    assert Version(str(meta["python_version"])) in SpecifierSet(requires)


def test_the_check_rejects_what_zerogpu_refuses():
    """The configuration the issue found (Python 3.11, torch 2.13.0) is reported, point by point."""
    meta, pinned = front_matter(read("README.md")), pins(read("requirements.txt"))
    old = zerogpu_problems({**meta, "python_version": "3.11"}, {**pinned, "torch": "2.13.0"})
    assert len(old) == 2 and "python_version 3.11" in old[0] and "torch 2.13.0" in old[1]
    # A bare minor version is not what the builder lists either.
    assert zerogpu_problems({**meta, "python_version": "3.12"}, pinned) != []
    # Off ZeroGPU the version lists do not apply; the Gradio pin still has to match the SDK.
    assert zerogpu_problems({**meta, "suggested_hardware": "cpu-basic", "python_version": "3.11"}, pinned) == []
    assert zerogpu_problems(meta, {**pinned, "gradio": "0.0.1"}) != []


def test_the_pinned_libraries_accept_the_space_torch_and_python():
    """The pinned packages (installed here at the same pins, torch aside) allow the Space's Python, and
    transformers, accelerate, peft, bitsandbytes and spaces allow its torch, so its build resolves."""
    pinned = pins(read("requirements.txt"))
    space_torch = Version(pinned["torch"])
    space_python = Version(str(front_matter(read("README.md"))["python_version"]))
    for name, version in pinned.items():
        if name == "torch":
            continue
        assert metadata.version(name) == version, f"{name} installed here is not the pinned version"
        requires_python = metadata.metadata(name).get("Requires-Python")
        assert requires_python is None or space_python in SpecifierSet(requires_python), name
    for name in ("transformers", "accelerate", "peft", "bitsandbytes", "spaces"):
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
                assert space_torch in req.specifier, f"{name} {pinned[name]} requires torch{req.specifier}"


def test_sign_in_asks_for_what_the_product_needs():
    meta = front_matter(read("README.md"))
    assert meta["hf_oauth"] is True
    assert set(meta["hf_oauth_scopes"]) == set(NEEDED_SCOPES)


def test_local_installs_keep_a_cpu_torch():
    """setup.sh installs scripts/local-requirements.sh's list: requirements.txt with the torch line swapped for
    requirements-cpu.txt's CPU build, every other pin unchanged."""
    space = read("requirements.txt")
    assert "+" not in pins(space)["torch"], "the Space's torch must be the plain (CUDA) build, no local label"
    assert not re.search(r"^\s*--(index-url|extra-index-url|find-links)", space, re.M), \
        "the Space installs from the default index only"
    out = subprocess.run(["bash", str(ROOT / "scripts" / "local-requirements.sh")], capture_output=True, text=True,
                         check=True).stdout
    local, cpu = pins(out), pins(read("requirements-cpu.txt"))
    assert list(cpu) == ["torch"] and Version(cpu["torch"]).local == "cpu"
    assert local == {**pins(space), "torch": cpu["torch"]}
    assert sum(1 for line in out.splitlines() if re.match(r"\s*torch\b", line)) == 1
    setup = read("scripts/setup.sh")
    assert "scripts/local-requirements.sh" in setup and "-r requirements.txt" not in setup
