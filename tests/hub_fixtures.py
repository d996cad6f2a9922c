"""Pytest fixture running a fresh local Hub (tests/hubserver.py) per test, with the real client pointed at it.

Use it from a conftest or test module with `from tests.hub_fixtures import hub`.

Function scope: each test gets its own server (own port, own temp storage, no repos), so no state leaks
between tests; starting one costs a few milliseconds. Users: `alice` (token `hf_alice_token`, member of
org `quantorg`) and `bob` (token `hf_bob_token`).

huggingface_hub reads its environment variables once, at import time, into `huggingface_hub.constants`
(and `huggingface_hub.hf_api.api`, behind the module-level functions such as `huggingface_hub.whoami`,
keeps the endpoint it saw at import). Setting the env vars alone is therefore not enough once the library
has been imported: `point_client_at` sets both the env vars (for subprocesses and late imports) and the
already-read values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hubserver import CLIENT_ENV, HubServer

ALICE_TOKEN = "hf_alice_token"
BOB_TOKEN = "hf_bob_token"


def point_client_at(url: str, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make huggingface_hub talk to `url` only, without Xet, tokens or caches from the machine."""
    hf_home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        **CLIENT_ENV,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # A real token or a staging/OIDC setup on the machine must not leak into tests.
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE",
                "HUGGINGFACE_CO_STAGING", "HF_ASSETS_CACHE", "HUGGINGFACE_HUB_CACHE", "HUGGINGFACE_ASSETS_CACHE"):
        monkeypatch.delenv(key, raising=False)

    import huggingface_hub.hf_api
    from huggingface_hub import constants

    patched = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",  # used by hf_hub_url
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {urlsplit(url).hostname},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_HUB_DOWNLOAD_TIMEOUT": 10,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running local Hub with users alice (org quantorg) and bob; the client is pointed at it."""
    with HubServer(root=tmp_path / "hubserver") as server:
        server.add_user("alice", ALICE_TOKEN, orgs=["quantorg"])
        server.add_user("bob", BOB_TOKEN)
        point_client_at(server.url, tmp_path / "hf_home", monkeypatch)
        yield server
