"""On a Space (SPACE_ID set) a visitor names Hub repos only and acts with their own token, never the Space's:
the folders on the Space's disk and the owner's HF_TOKEN stay out of reach. The CLI and local use keep both."""

from __future__ import annotations

import os

import pytest

from quantspace.errors import SourceNotFoundError
from tests.hub_fixtures import ALICE_TOKEN, BOB_TOKEN
from tests.test_app import TINY, served  # noqa: F401  (the app fixture, launched once for this module)

pytestmark = pytest.mark.filterwarnings("ignore:Gradio does not support OAuth")
PRIVATE = "alice/private-llama"


@pytest.fixture
def on_space(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "quantorg/QuantSpace")
    monkeypatch.delenv("QUANTSPACE_ALLOWED_FOLDERS", raising=False)


def test_a_visitor_cannot_name_a_folder_on_the_spaces_disk(served, tiny_bpe, on_space):  # noqa: F811
    client = served.client()
    pre = client.predict(str(tiny_bpe), "gguf", ["Q8_0"], "", False, "", api_name="/preflight")
    assert not pre["ok"] and pre["architecture"] is None
    assert pre["problems"] == [f"'{tiny_bpe}' is not a Hub repo id; on this Space, name a model on the Hub "
                               "(owner/name), not a folder."]
    with pytest.raises(Exception, match="not a Hub repo id"):
        client.predict(str(tiny_bpe), "gguf", ["Q8_0"], {}, "", False, False, "", api_name="/quantize")
    assert served.jobs_left() == []


def test_a_relative_path_on_a_space_means_a_hub_repo(tiny_bpe, tmp_path, monkeypatch, on_space):
    """'models/tiny' exists on the disk and looks like owner/name: on a Space it names the Hub repo."""
    from quantspace.source import parse_spec

    (tmp_path / "models").mkdir()
    os.symlink(tiny_bpe, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert parse_spec("models/tiny") == ("models/tiny", None)
    monkeypatch.delenv("SPACE_ID")
    assert parse_spec("models/tiny") == tiny_bpe.resolve()     # off a Space: the folder, as before


def test_an_operator_can_allow_named_folders(tiny_bpe, tmp_path, monkeypatch, on_space):
    from quantspace.preflight import preflight

    monkeypatch.setenv("QUANTSPACE_ALLOWED_FOLDERS", str(tiny_bpe.parent))
    assert preflight(str(tiny_bpe), "gguf", ["Q8_0"], evaluate=False).ok
    # A link inside an allowed folder that leads out of it is judged by where it leads.
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.symlink(tiny_bpe, allowed / "escape")
    monkeypatch.setenv("QUANTSPACE_ALLOWED_FOLDERS", str(allowed))
    pre = preflight(str(allowed / "escape"), "gguf", ["Q8_0"], evaluate=False)
    assert not pre.ok and "not a Hub repo id" in pre.problems[0]


def seed_private(hub, tiny) -> None:
    if PRIVATE not in {r for _, r in hub._repos}:
        hub.create_repo(PRIVATE, private=True)
        hub.upload_folder(PRIVATE, tiny)


def test_a_visitor_never_reads_with_the_spaces_token(served, tiny_bpe, on_space):  # noqa: F811
    """The Space's owner (alice) set HF_TOKEN; her private model stays hidden from anonymous visitors and from
    bob, in the preflight, the search and the run; alice's own sign-in (her token) reaches it."""
    seed_private(served.hub, tiny_bpe)
    assert os.environ["HF_TOKEN"] == ALICE_TOKEN
    client = served.client()
    for token in ("", BOB_TOKEN):
        pre = client.predict(PRIVATE, "gguf", ["Q8_0"], "", False, token, api_name="/preflight")
        assert not pre["ok"] and "was not found" in pre["problems"][0], token
        assert client.predict("private-llama", token, api_name="/search_models") == []
        with pytest.raises(Exception, match="was not found"):
            client.predict(PRIVATE, "gguf", ["Q8_0"], {}, "", False, False, token, api_name="/quantize")
    assert client.predict(PRIVATE, "gguf", ["Q8_0"], "", False, ALICE_TOKEN, api_name="/preflight")["ok"]
    assert client.predict("private-llama", ALICE_TOKEN, api_name="/search_models") == [PRIVATE]
    # Public models are open to anyone.
    assert client.predict(TINY, "gguf", ["Q8_0"], "", False, "", api_name="/preflight")["ok"]
    assert served.jobs_left() == []


def test_off_a_space_the_machines_login_still_reads(served, tiny_bpe, monkeypatch):  # noqa: F811
    """Running locally, the app acts with this machine's login (HF_TOKEN) as before."""
    monkeypatch.delenv("SPACE_ID", raising=False)
    seed_private(served.hub, tiny_bpe)
    assert served.client().predict(PRIVATE, "gguf", ["Q8_0"], "", False, "", api_name="/preflight")["ok"]


def test_the_visitor_token_rule(monkeypatch):
    from quantspace.ui.jobs import MOCK_OAUTH_TOKEN, user_token

    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv("SPACE_ID", "quantorg/QuantSpace")
    assert user_token("", None) is False                  # anonymous: huggingface_hub sends no token at all
    assert user_token("", MOCK_OAUTH_TOKEN) is False
    assert user_token(" hf_x ", None) == "hf_x" and user_token("", "hf_oauth") == "hf_oauth"
    monkeypatch.delenv("SPACE_ID")
    assert user_token("", None) is None                   # locally: huggingface_hub's own fallback
    assert user_token("", MOCK_OAUTH_TOKEN) == ALICE_TOKEN


def test_an_absolute_path_is_refused_before_any_hub_call(on_space, monkeypatch):
    from quantspace.source import resolve

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")    # nothing listens: a Hub call would fail otherwise
    with pytest.raises(SourceNotFoundError, match="on this Space, name a model on the Hub"):
        resolve("/data/models/llama")


def test_a_space_never_serves_its_hub_cache_when_the_hub_is_unreachable(hub, tiny_bpe, tmp_path, monkeypatch,
                                                                          on_space):
    """Another visitor's download sits in the Space's Hub cache; with the Hub unreachable nobody gets it from
    there, since only the Hub can say who may read it."""
    from huggingface_hub import constants, snapshot_download

    from quantspace.errors import HubUnreachableError
    from quantspace.source import resolve

    hub.add_user("alice", ALICE_TOKEN)
    hub.create_repo(PRIVATE, private=True)
    hub.upload_folder(PRIVATE, tiny_bpe)
    snapshot_download(PRIVATE, token=ALICE_TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(HubUnreachableError):
        resolve(PRIVATE, token=False)
    monkeypatch.delenv("SPACE_ID")
    assert resolve(PRIVATE).revision is not None      # locally the cache is this machine's own: used


def test_a_visitor_cannot_read_the_spaces_files_as_calibration_text_or_imatrix(tiny_bpe, tmp_path, monkeypatch,
                                                                            on_space):
    """The calibration file and the imatrix path are the Space's disk too: refused in one line, unless an
    operator allowed the folder; off a Space they are read as before."""
    from quantspace.calib import load_calibration_text
    from quantspace.errors import BadOptionError, CalibrationError
    from quantspace.imatrix import read_imatrix

    secret = tmp_path / "owner-notes.txt"
    secret.write_text("the owner's private text\n\nmore of it\n")
    with pytest.raises(CalibrationError, match="on this Space, name a Hub dataset"):
        load_calibration_text(str(secret))
    with pytest.raises(CalibrationError, match="on this Space, name a Hub dataset"):
        load_calibration_text("/etc/hostname")
    with pytest.raises(BadOptionError, match="a file on this Space's disk"):
        read_imatrix(tmp_path / "imatrix.gguf")
    monkeypatch.setenv("QUANTSPACE_ALLOWED_FOLDERS", str(tmp_path))
    assert load_calibration_text(str(secret)).documents == ["the owner's private text", "more of it"]
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.delenv("QUANTSPACE_ALLOWED_FOLDERS")
    assert load_calibration_text(str(secret)).source == secret.name
