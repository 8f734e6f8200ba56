"""The real huggingface_hub client pushes to and pulls from FakeHub, and never leaves the loopback interface."""

import json
import os
import random
from pathlib import Path

import pytest
from hub_server import FakeHub, NetworkAccessError, fake_hub, use_hub  # noqa: F401  (fake_hub is a fixture)
from huggingface_hub import HfApi, constants, get_token, hf_api, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

ALICE, BOB = "hf_alice_token", "hf_bob_token"  # FakeHub's default users


def read(path: str) -> bytes:
    return Path(path).read_bytes()


def test_upload_folder_round_trip(fake_hub: FakeHub, tmp_path: Path) -> None:
    files = {
        "model.bin": random.Random(0).randbytes(100_000),
        "config.json": json.dumps({"num_labels": 7}).encode(),
        "sub/notes.txt": b"nested",
    }
    for name, data in files.items():
        (tmp_path / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "model" / name).write_bytes(data)
    api = HfApi()

    url = api.create_repo("weights", token=ALICE)
    assert url.repo_id == "alice/weights" and url.startswith(fake_hub.endpoint)
    assert api.create_repo("weights", token=ALICE, exist_ok=True).repo_id == "alice/weights"
    commit = api.upload_folder(folder_path=tmp_path / "model", repo_id="alice/weights", token=ALICE)

    assert api.model_info("alice/weights").sha == commit.oid
    assert sorted(api.list_repo_files("alice/weights")) == [".gitattributes", *sorted(files)]
    for name, data in files.items():
        assert read(hf_hub_download("alice/weights", name)) == data
    assert all(host == "127.0.0.1" for host, _, _ in fake_hub.request_log)


def test_history_and_snapshots(fake_hub: FakeHub) -> None:
    api = HfApi()
    api.create_repo("history", token=ALICE)
    for version in (b"v1", b"v2"):
        api.upload_file(path_or_fileobj=version, path_in_repo="weights.txt", repo_id="alice/history",
                        token=ALICE, commit_message=version.decode())
    api.upload_file(path_or_fileobj=b"late", path_in_repo="extra.txt", repo_id="alice/history", token=ALICE,
                    commit_message="extra")

    commits = api.list_repo_commits("alice/history")  # newest first
    assert [commit.title for commit in commits] == ["extra", "v2", "v1", "initial commit"]
    assert api.list_repo_refs("alice/history").branches[0].target_commit == commits[0].commit_id
    sha = {commit.title: commit.commit_id for commit in commits}
    assert read(hf_hub_download("alice/history", "weights.txt", revision=sha["v1"])) == b"v1"
    assert read(hf_hub_download("alice/history", "weights.txt")) == b"v2"

    old, new = Path(snapshot_download("alice/history", revision=sha["v1"])), Path(snapshot_download("alice/history"))
    assert sorted(p.name for p in old.iterdir()) == [".gitattributes", "weights.txt"]
    assert (old / "weights.txt").read_bytes() == b"v1"
    assert sorted(p.name for p in new.iterdir()) == [".gitattributes", "extra.txt", "weights.txt"]
    assert (new / "weights.txt").read_bytes() == b"v2"


def test_private_repo_needs_owner_token(fake_hub: FakeHub) -> None:
    api = HfApi()
    api.create_repo("secret", token=ALICE, private=True)
    api.upload_file(path_or_fileobj=b"hidden", path_in_repo="s.txt", repo_id="alice/secret", token=ALICE)

    # Refusals first: once downloaded, the client would serve the cached copy whatever the server says.
    for token in (None, BOB, "hf_unknown_token"):
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download("alice/secret", "s.txt", token=token)
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("alice/secret", token=token)
    with pytest.raises(RepositoryNotFoundError):  # bob cannot write either, nor see that the repo exists
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/secret", token=BOB)
    assert read(hf_hub_download("alice/secret", "s.txt", token=ALICE)) == b"hidden"
    assert api.model_info("alice/secret", token=ALICE).private


def test_write_permissions(fake_hub: FakeHub) -> None:
    api = HfApi()
    api.create_repo("public", token=ALICE)
    with pytest.raises(HfHubHTTPError, match="403"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/public", token=BOB)
    with pytest.raises(HfHubHTTPError, match="403"):
        api.create_repo("alice/mine", token=BOB)
    with pytest.raises(HfHubHTTPError, match="401"):
        api.create_repo("anonymous")
    assert api.create_repo("lab/shared", token=BOB).repo_id == "lab/shared"  # organizations are open to all
    assert api.whoami(token=BOB)["name"] == "bob"


def test_missing_things_raise_the_clients_errors(fake_hub: FakeHub) -> None:
    HfApi().create_repo("there", token=ALICE)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/there", "missing.bin")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nowhere", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/nowhere")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/there", ".gitattributes", revision="0" * 40)


def test_fixture_blocks_other_hosts(fake_hub: FakeHub) -> None:
    with pytest.raises(NetworkAccessError):
        hf_hub_download("gpt2", "config.json", endpoint="https://huggingface.co")


def test_use_hub_patches_then_restores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", BOB)  # a machine token must not leak into requests
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nor may a proxy intercept the loopback traffic
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE, hf_api.api.endpoint)
    environ = dict(os.environ)

    with FakeHub() as hub, use_hub(hub, tmp_path):
        assert (constants.ENDPOINT, hf_api.api.endpoint) == (hub.endpoint, hub.endpoint)
        assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub.endpoint + "/")
        assert constants.HF_HUB_CACHE == str(tmp_path / "hub") and constants.HF_HUB_DISABLE_TELEMETRY
        assert get_token() is None and "HF_TOKEN" not in os.environ
        HfApi().create_repo("probe", token=ALICE)
        with pytest.raises(RepositoryNotFoundError, match="401"):  # 401: anonymous, HF_TOKEN was not sent
            hf_hub_download("alice/nowhere", "x")

    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE,
            hf_api.api.endpoint) == before
    assert dict(os.environ) == environ
    assert [(host, method) for host, method, _ in hub.request_log] == [("127.0.0.1", "POST"), ("127.0.0.1", "HEAD")]
