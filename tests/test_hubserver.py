"""The local Hub (tests/hubserver.py) checked against the real huggingface_hub client."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN, hub  # noqa: F401  (fixture)
from tests.hubserver import HubServer

BIG = 10 * 1024 * 1024 + 123  # over the 10 MB LFS threshold


@pytest.fixture
def alice() -> HfApi:
    return HfApi(token=ALICE_TOKEN)


@pytest.fixture
def bob() -> HfApi:
    return HfApi(token=BOB_TOKEN)


def test_fixture_points_the_client_at_the_server(hub: HubServer) -> None:
    assert constants.ENDPOINT == hub.url and os.environ["HF_ENDPOINT"] == hub.url
    assert constants.HF_HUB_DISABLE_XET and "HF_TOKEN" not in os.environ


def test_whoami(hub: HubServer, alice: HfApi) -> None:
    me = alice.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["quantorg"]
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_wrong").whoami()
    assert err.value.response.status_code == 401
    assert ("GET", "/api/whoami-v2") in hub.requests_log


def test_create_repo(hub: HubServer, alice: HfApi, bob: HfApi) -> None:
    url = alice.create_repo("public-model")
    assert url.repo_id == "alice/public-model" and url.startswith(hub.url)
    alice.create_repo("alice/secret", private=True)
    alice.create_repo("quantorg/shared")  # org member
    assert hub.repo_info("alice/secret")["private"] and not hub.repo_info("alice/public-model")["private"]
    assert alice.model_info("alice/secret").private is True

    alice.create_repo("alice/public-model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo("alice/public-model")
    assert err.value.response.status_code == 409

    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("alice/not-yours")
    assert err.value.response.status_code == 403
    assert "don't have the rights" in str(err.value) and 'namespace "alice"' in str(err.value)
    with pytest.raises(HfHubHTTPError):
        bob.create_repo("quantorg/nope")
    # The client turns a 403 into success when the repo exists and is visible, as on the real Hub.
    bob.create_repo("alice/public-model", exist_ok=True)


def test_upload_folder_lfs_and_download(hub: HubServer, alice: HfApi, tmp_path: Path) -> None:
    alice.create_repo("alice/m")
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "config.json").write_text('{"hidden_size": 8}\n')
    weights = os.urandom(BIG)
    (src / "weights" / "model.safetensors").write_bytes(weights)

    info = alice.upload_folder(repo_id="alice/m", folder_path=src, commit_message="add model")
    assert len(hub.commits("alice/m")) == 2  # initial commit + ONE commit for both files
    last = hub.commits("alice/m")[-1]
    assert last["sha"] == info.oid and last["title"] == "add model"
    assert last["changed"] == ["config.json", "weights/model.safetensors"]
    assert any(p.endswith(".git/info/lfs/objects/batch") for _, p in hub.requests_log)  # classic LFS, not Xet
    assert hub.files("alice/m")["weights/model.safetensors"] == weights

    assert alice.list_repo_files("alice/m") == [".gitattributes", "config.json", "weights/model.safetensors"]
    tree = {f.path: f for f in alice.list_repo_tree("alice/m", recursive=True)}
    assert tree["weights/model.safetensors"].lfs.size == BIG and tree["config.json"].lfs is None
    assert [f.path for f in alice.list_repo_tree("alice/m")] == [".gitattributes", "config.json", "weights"]
    sizes = {s.rfilename: s.size for s in alice.model_info("alice/m", files_metadata=True).siblings}
    assert sizes["weights/model.safetensors"] == BIG

    hub.requests_log.clear()
    local = Path(snapshot_download("alice/m", token=ALICE_TOKEN))
    assert (local / "config.json").read_text() == '{"hidden_size": 8}\n'
    assert (local / "weights" / "model.safetensors").read_bytes() == weights
    assert ("GET", f"/alice/m/resolve/{info.oid}/weights/model.safetensors") in hub.requests_log

    # Pinned to a commit sha, or to a branch, one file at a time.
    one = hf_hub_download("alice/m", "config.json", revision=info.oid, token=ALICE_TOKEN, cache_dir=tmp_path / "c")
    assert Path(one).read_text() == '{"hidden_size": 8}\n'

    # Unchanged files are skipped by the client thanks to the oids preupload reports.
    again = alice.upload_folder(repo_id="alice/m", folder_path=src)
    assert again.oid == info.oid and len(hub.commits("alice/m")) == 2


def test_upload_file_update_and_delete(hub: HubServer, alice: HfApi) -> None:
    alice.create_repo("alice/m")
    alice.upload_file(path_or_fileobj=b"v1", path_in_repo="a.txt", repo_id="alice/m")
    alice.upload_file(path_or_fileobj=b"v2", path_in_repo="a.txt", repo_id="alice/m")
    assert hub.files("alice/m")["a.txt"] == b"v2"
    assert Path(hf_hub_download("alice/m", "a.txt", token=ALICE_TOKEN)).read_bytes() == b"v2"
    alice.delete_file("a.txt", repo_id="alice/m")
    assert "a.txt" not in hub.files("alice/m") and hub.commits("alice/m")[-1]["deleted"] == ["a.txt"]


def test_missing_repo_file_and_revision(hub: HubServer, alice: HfApi) -> None:
    hub.create_repo("alice/m")
    hub.put_file("alice/m", "config.json", b"{}")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/nothing-here")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nothing-here", "config.json", token=ALICE_TOKEN)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/m", "missing.bin", token=ALICE_TOKEN)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/m", "config.json", revision="no-such-branch", token=ALICE_TOKEN)
    with pytest.raises(RevisionNotFoundError):
        alice.model_info("alice/m", revision="no-such-branch")


def test_private_repo_is_invisible_to_others(hub: HubServer, alice: HfApi, bob: HfApi) -> None:
    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id="alice/secret")
    for api in (bob, HfApi(token=False)):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/secret", "f.txt", token=BOB_TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        bob.upload_file(path_or_fileobj=b"y", path_in_repo="g.txt", repo_id="alice/secret")
    assert [m.id for m in bob.list_models(search="secret")] == []
    assert [m.id for m in alice.list_models(search="secret")] == ["alice/secret"]


def test_public_repo_is_read_only_for_others(hub: HubServer, bob: HfApi) -> None:
    hub.create_repo("alice/m")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"y", path_in_repo="g.txt", repo_id="alice/m")
    assert err.value.response.status_code == 403
    assert hub.files("alice/m").keys() == {".gitattributes"}


def test_gated_repo(hub: HubServer, alice: HfApi, bob: HfApi) -> None:
    hub.create_repo("alice/gated", gated=True)
    hub.put_file("alice/gated", "model.safetensors", b"\0weights")
    assert bob.model_info("alice/gated").gated == "auto"  # metadata stays visible
    with pytest.raises(GatedRepoError):
        hf_hub_download("alice/gated", "model.safetensors", token=BOB_TOKEN)
    path = hf_hub_download("alice/gated", "model.safetensors", token=ALICE_TOKEN)
    assert Path(path).read_bytes() == b"\0weights"


def test_failed_commit_leaves_repo_unchanged(hub: HubServer, alice: HfApi) -> None:
    alice.create_repo("alice/m")
    before = (hub.files("alice/m"), hub.commits("alice/m"))

    # An LFS file the client believes uploaded (skipping the LFS upload), next to a good regular file.
    ghost = CommitOperationAdd("model.safetensors", b"\0never uploaded")
    ghost._upload_mode, ghost._should_ignore, ghost._is_uploaded = "lfs", False, True
    ok = CommitOperationAdd("config.json", b"{}")
    with pytest.raises(BadRequestError, match="never uploaded"):
        alice.create_commit("alice/m", [ok, ghost], commit_message="broken")
    assert (hub.files("alice/m"), hub.commits("alice/m")) == before

    # A stale parent commit is refused too.
    stale = before[1][-1]["sha"]
    alice.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id="alice/m")
    with pytest.raises(HfHubHTTPError) as err:
        alice.upload_file(path_or_fileobj=b"2", path_in_repo="b.txt", repo_id="alice/m", parent_commit=stale)
    assert err.value.response.status_code == 412 and "b.txt" not in hub.files("alice/m")


def test_seeding_helpers_and_range_requests(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo("quantorg/base")
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "config.json").write_bytes(b'{"a": 1}')
    (tmp_path / "seed" / "model.safetensors").write_bytes(b"0123456789")
    sha = hub.upload_folder("quantorg/base", tmp_path / "seed")
    assert hub.commits("quantorg/base")[-1]["sha"] == sha == hub.repo_info("quantorg/base")["sha"]
    v1 = hub.put_file("quantorg/base", "config.json", b'{"a": 2}', revision="v1")

    # Anonymous downloads work on public repos, by branch or by sha.
    assert Path(hf_hub_download("quantorg/base", "config.json", token=False)).read_bytes() == b'{"a": 1}'
    on_v1 = hf_hub_download("quantorg/base", "config.json", revision="v1", token=False)
    assert Path(on_v1).read_bytes() == b'{"a": 2}'
    assert hub.files("quantorg/base", revision=v1)["config.json"] == b'{"a": 2}'

    url = f"{hub.url}/quantorg/base/resolve/main/model.safetensors"
    head = get_session().head(url)
    assert head.headers["X-Linked-Size"] == "10" and head.headers["X-Repo-Commit"] == sha
    part = get_session().get(url, headers={"Range": "bytes=2-4"})
    assert part.status_code == 206 and part.content == b"234"
    assert part.headers["Content-Range"] == "bytes 2-4/10"
