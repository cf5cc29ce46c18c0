"""`loraforge push`: the plan, the model cards, every HfApi call, and the errors, all without a network.

Success paths use a recording HfApi (unittest.mock's autospec, so every call must match the real
method's signature); error paths run the real huggingface_hub client against a stand-in HTTP server
on 127.0.0.1 (or a closed port), so the real exceptions are mapped.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from unittest import mock

import pytest
from adapter_helpers import fake_train, front_matter, one_torch_thread  # noqa: F401 (autouse fixture)
from conftest import invoke

from loraforge import InitConfig, LoraforgeError, init_adapter
from loraforge.ship.hub import PushConfig, plan_push, push


@pytest.fixture(scope="module")
def inits(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    return {
        m: init_adapter(str(tiny_models["llama"]), root / m, InitConfig(method=m, r=4, seed=3)).out
        for m in ("pissa", "rlpo")
    }


def recording_api():
    from huggingface_hub import HfApi

    api = mock.create_autospec(HfApi, instance=True)
    api.token = "hf_secret_token_value"
    api.endpoint = "https://huggingface.co"
    api.create_commit.return_value.commit_url = "https://huggingface.co/me/x/commit/abc"
    api.create_commit.return_value.oid = BASE_COMMIT
    return api


BASE_COMMIT = "0123456789abcdef0123456789abcdef01234567"  # what the recording Hub answers for every commit


def pushed_files(api, repo):
    """{path_in_repo: bytes} of the create_commit call for REPO."""
    from pathlib import Path

    (call,) = [c for c in api.create_commit.call_args_list if c.kwargs["repo_id"] == repo]
    out = {}
    for op in call.kwargs["operations"]:
        src = op.path_or_fileobj
        out[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()
    return out


# ---- plan, cards and calls -------------------------------------------------------------------


def test_residual_init_pushes_base_repo_first_then_adapter(inits, tiny_models):
    config = PushConfig("me/tiny-pissa", base_model="org/tiny-llama", private=True, revision="exp1")
    api = recording_api()
    result = push(plan_push(inits["pissa"], config), config, api=api)

    calls = [(c[0], c.kwargs["repo_id"]) for c in api.method_calls]
    base = "me/tiny-pissa-residual-base"
    assert calls == [
        ("create_repo", base),
        ("create_branch", base),
        ("create_commit", base),
        ("create_repo", "me/tiny-pissa"),
        ("create_branch", "me/tiny-pissa"),
        ("create_commit", "me/tiny-pissa"),
    ]
    for c in api.create_repo.call_args_list:
        assert c.kwargs == {"repo_id": c.kwargs["repo_id"], "private": True, "exist_ok": True, "repo_type": "model"}
    for c in api.create_branch.call_args_list:
        assert c.kwargs["branch"] == "exp1" and c.kwargs["exist_ok"] is True
    for c in api.create_commit.call_args_list:
        assert c.kwargs["revision"] == "exp1" and c.kwargs["repo_type"] == "model"
        assert c.kwargs["commit_message"] == "Upload me/tiny-pissa with loraforge"
    assert list(result.commits) == [base, "me/tiny-pissa"]

    adapter = pushed_files(api, "me/tiny-pissa")
    assert set(adapter) == {"adapter_model.safetensors", "adapter_config.json", "loraforge.json", "README.md"}
    assert adapter["adapter_model.safetensors"] == (inits["pissa"] / "adapter_model.safetensors").read_bytes()
    cfg = json.loads(adapter["adapter_config.json"])
    # the adapter loads the residual base this push committed, not whatever the branch holds later
    assert cfg["base_model_name_or_path"] == base and cfg["revision"] == BASE_COMMIT and cfg["init_lora_weights"]
    manifest = json.loads(adapter["loraforge.json"])
    assert manifest["source"] == {
        "model_id": "org/tiny-llama",
        "revision": None,
        "local": False,
        "local_copy_at_init": True,
    }
    assert manifest["hub"] == {
        "repo_id": "me/tiny-pissa",
        "base_repo": base,
        "revision": "exp1",
        "base_revision": BASE_COMMIT,
    }
    assert manifest["files"]["adapter_config.json"] == hashlib.sha256(adapter["adapter_config.json"]).hexdigest()

    base_files = pushed_files(api, base)
    local_base = inits["pissa"] / "base"
    assert set(base_files) == {p.name for p in local_base.iterdir()} | {"README.md"}
    assert base_files["model.safetensors"] == (local_base / "model.safetensors").read_bytes()

    # Nothing pushed carries a local path or the token.
    for content in list(adapter.values()) + list(base_files.values()):
        assert str(tiny_models["llama"]).encode() not in content
        assert str(inits["pissa"].parent).encode() not in content
        assert b"hf_secret_token_value" not in content


def test_what_is_pushed_verifies_after_download(inits, tiny_models, tmp_path):
    """Lay the two pushed repositories out as `hf download` would (adapter, then base/) and verify."""
    from loraforge.ship.verify import verify_adapter

    config = PushConfig("me/tiny-pissa", base_model="org/tiny-llama")
    api = recording_api()
    push(plan_push(inits["pissa"], config), config, api=api)
    for repo, where in (("me/tiny-pissa", tmp_path / "dl"), ("me/tiny-pissa-residual-base", tmp_path / "dl" / "base")):
        where.mkdir(parents=True, exist_ok=True)
        for name, content in pushed_files(api, repo).items():
            (where / name).write_bytes(content)
    report = verify_adapter(tmp_path / "dl", base=str(tiny_models["llama"]))
    assert report.ok, {c.name: c.failures for c in report.checks}
    assert report.modules and "residual base" in report.serve


def test_b0_zero_init_pushes_one_repo_naming_the_original_model(tiny_models, tmp_path):
    # A Hub-sourced init (resolved offline from a cache laid out as huggingface_hub does): no --base-model needed.
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / sha
    shutil.copytree(tiny_models["llama"], snap)
    (tmp_path / "hub" / "models--org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-llama" / "refs" / "main").write_text(sha)
    with mock.patch("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub")):
        out = init_adapter("org/tiny-llama", tmp_path / "rlpo", InitConfig(method="rlpo", r=4)).out

    config = PushConfig("me/tiny-rlpo")
    api = recording_api()
    push(plan_push(out, config), config, api=api)
    assert [c[0] for c in api.method_calls] == ["create_repo", "create_commit"]
    assert api.create_repo.call_args.kwargs["private"] is None  # the owner's default visibility
    assert api.create_commit.call_args.kwargs["revision"] is None
    files = pushed_files(api, "me/tiny-rlpo")
    cfg = json.loads(files["adapter_config.json"])
    assert cfg["base_model_name_or_path"] == "org/tiny-llama" and cfg["revision"] == sha
    meta = front_matter(files["README.md"].decode())
    assert meta["base_model"] == "org/tiny-llama"
    card = files["README.md"].decode()
    assert f"source revision | {sha}" in card and "load it on the original model `org/tiny-llama`" in card


def test_card_metadata_and_text(inits):
    plan = plan_push(inits["pissa"], PushConfig("me/tiny-pissa", base_model="org/tiny-llama"))
    card = plan.cards["me/tiny-pissa"]
    meta = front_matter(card)
    assert meta["base_model"] == "me/tiny-pissa-residual-base" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"loraforge", "pissa", "lora", "peft"} <= set(meta["tags"])
    for text in [
        "`A0 = (S_r/s)^1/2 V_r^T`",
        "`B0 = U_r (S_r/s)^1/2`",
        "r / alpha / scaling | 4 / 8 / 2",
        "| seed | 3 |",
        "source revision",
        "**Load this adapter on the residual base `me/tiny-pissa-residual-base`, not on `org/tiny-llama`.**",
        "loraforge convert",
        'PeftModel.from_pretrained(base, "me/tiny-pissa"',
        "GRPOTrainer(model=model",
        "actor_rollout_ref.model.lora_adapter_path=./adapter",
        "vllm serve me/tiny-pissa-residual-base --enable-lora --max-lora-rank 8",
        "loraforge verify DIR",
    ]:
        assert text in card, text
    base_meta = front_matter(plan.cards["me/tiny-pissa-residual-base"])
    assert base_meta["base_model"] == "org/tiny-llama" and base_meta["base_model_relation"] == "finetune"
    assert base_meta["library_name"] == "transformers" and "residual-base" in base_meta["tags"]
    assert "not a usable model on its own" in plan.cards["me/tiny-pissa-residual-base"]

    rlpo = plan_push(inits["rlpo"], PushConfig("me/tiny-rlpo", base_model="org/tiny-llama")).cards["me/tiny-rlpo"]
    assert front_matter(rlpo)["base_model"] == "org/tiny-llama" and "rlpo" in front_matter(rlpo)["tags"]
    assert "`A0 = V_r^T`, `B0 = 0`" in rlpo and "exact no-op" in rlpo


def test_cards_name_the_paper_as_the_readme_does_and_link_the_repository(inits):
    """The paper's title and arXiv id are the README's; loraforge is linked to its repository (it is installed from a
    clone, not from the package index), on every card a push writes."""
    from pathlib import Path

    from loraforge.adapters.card import ARXIV_ID, REPOSITORY

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    title = "Geometry-Preserving Orthonormal Initialization for Low-Rank Adaptation in RLVR"
    assert f'"{title}", arXiv {ARXIV_ID}' in " ".join(readme.split())
    plan = plan_push(inits["pissa"], PushConfig("me/tiny-pissa", base_model="org/tiny-llama"))
    for repo, card in plan.cards.items():
        assert "pypi.org" not in card and f"[loraforge]({REPOSITORY})" in card, repo
    adapter_card = plan.cards["me/tiny-pissa"]
    assert f'"{title}" ([arXiv {ARXIV_ID}](https://arxiv.org/abs/{ARXIV_ID}))' in adapter_card
    assert f"arxiv:{ARXIV_ID}" in front_matter(adapter_card)["tags"]  # the Hub links the paper page from this tag


def test_local_init_card_parses_too(inits):
    meta = front_matter((inits["rlpo"] / "README.md").read_text())
    assert meta["library_name"] == "peft" and "loraforge" in meta["tags"] and "rlpo" in meta["tags"]


def test_dry_run_lists_files_and_cards_without_network(inits, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", mock.Mock(side_effect=AssertionError("network client created")))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    res = invoke("push", inits["pissa"], "me/tiny-pissa", "--dry-run", "--base-model", "org/tiny-llama")
    assert res.exit_code == 0, res.output
    assert "Dry run, nothing sent" in res.output
    assert "me/tiny-pissa-residual-base (residual base; branch main" in res.output
    assert "model.safetensors" in res.output and f"<- {inits['pissa']}/base/model.safetensors" in res.output
    assert (
        "adapter_config.json" in res.output
        and "rewritten: base_model_name_or_path = me/tiny-pissa-residual-base" in res.output
    )
    assert "----- README.md for me/tiny-pissa -----\n---\nbase_model:" in res.output


def test_converted_and_trained_adapters_push_as_plain_lora(inits, tmp_path):
    from loraforge.ship.convert import convert_adapter

    trained = fake_train(inits["pissa"], inits["pissa"] / "base", tmp_path / "trained")
    conv = convert_adapter(trained, inits["pissa"], tmp_path / "conv").out
    plan = plan_push(conv, PushConfig("me/conv", base_model="org/tiny-llama"))
    assert plan.repos == ["me/conv"]
    cfg = json.loads(next(u.content for u in plan.uploads if u.path_in_repo == "adapter_config.json"))
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == "org/tiny-llama"
    assert "Load it on the original model `org/tiny-llama`" in plan.cards["me/conv"]
    # a PEFT checkpoint with no manifest: base from adapter_config.json, which is a local path here
    with pytest.raises(LoraforgeError, match="--base-model"):
        plan_push(trained, PushConfig("me/trained"))
    plan = plan_push(trained, PushConfig("me/trained", base_model="org/tiny-llama"))
    assert front_matter(plan.cards["me/trained"])["base_model"] == "org/tiny-llama"


# ---- bad input -------------------------------------------------------------------------------


def test_local_source_needs_base_model(inits):
    res = invoke("push", inits["rlpo"], "me/x", "--dry-run")
    assert res.exit_code == 1 and "a local path must not be pushed" in res.output and "--base-model" in res.output


def test_a_local_path_in_any_pushed_file_is_refused(inits, tmp_path):
    import shutil

    out = tmp_path / "p"
    shutil.copytree(inits["pissa"], out)
    cfg = json.loads((out / "base" / "tokenizer_config.json").read_text())
    cfg["name_or_path"] = "/home/someone/models/llama"
    (out / "base" / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        LoraforgeError, match=r"tokenizer_config.json would carry the local path '/home/someone/models/llama'"
    ):
        plan_push(out, PushConfig("me/x", base_model="org/tiny-llama"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["me/x", "--base-repo", "me/x"], "--base-repo must differ from REPO_ID"),
        (["just-a-name"], "must be OWNER/NAME"),
        (["me/bad--name"], "not a valid Hub repository id"),
    ],
)
def test_bad_repo_ids(inits, args, message):
    res = invoke("push", inits["pissa"], *args, "--base-model", "org/tiny-llama", "--dry-run")
    assert res.exit_code == 1 and message in res.output


def test_base_repo_for_a_method_without_residual_base(inits):
    res = invoke("push", inits["rlpo"], "me/x", "--base-repo", "me/y", "--base-model", "org/m", "--dry-run")
    assert res.exit_code == 1 and "has no residual base" in res.output


def test_not_an_adapter_directory(tiny_models, tmp_path):
    res = invoke("push", tiny_models["llama"], "me/x", "--dry-run")
    assert res.exit_code == 1 and "not a PEFT adapter directory" in res.output and "model directory" in res.output
    res = invoke("push", tmp_path / "missing", "me/x", "--dry-run")
    assert res.exit_code == 1 and "no such directory" in res.output


def test_no_token_fails_before_any_call(inits, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = recording_api()
    api.token = None
    config = PushConfig("me/x", base_model="org/tiny-llama")
    with pytest.raises(LoraforgeError, match=r"`hf auth login`.*HF_TOKEN"):
        push(plan_push(inits["rlpo"], config), config, api=api)
    assert api.method_calls == []


def test_failed_adapter_commit_after_base_says_what_was_pushed(inits):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    api = recording_api()
    response = httpx2.Response(
        500, request=httpx2.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
    )

    def commit(**kwargs):
        if kwargs["repo_id"] == "me/x":
            raise HfHubHTTPError("500 Server Error", response=response)
        return mock.Mock(commit_url="https://huggingface.co/me/x-residual-base/commit/1")

    api.create_commit.side_effect = commit
    config = PushConfig("me/x", base_model="org/tiny-llama")
    with pytest.raises(LoraforgeError) as err:
        push(plan_push(inits["pissa"], config), config, api=api)
    message = str(err.value)
    assert "Could not commit the files for me/x: the Hub answered 500" in message
    assert "No commit was made to me/x. Already pushed: me/x-residual-base." in message
    assert "Re-running the same command is safe" in message


# ---- the real client against a stand-in on 127.0.0.1 -----------------------------------------


class StandIn(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status configured for its method, the Hub's JSON error body."""

    answers: dict = {}
    seen: list = []

    def _answer(self):
        self.seen.append((self.command, self.path))
        status = self.answers.get(self.command, 404)
        if status == "hang":
            time.sleep(5)
            return
        body = json.dumps({"error": f"stand-in says {status}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # conftest sets offline mode
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    StandIn.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def real_api(endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token="hf_fake")


def run_push(out, endpoint, **kw):
    config = PushConfig("me/x", base_model="org/tiny-llama", **kw)
    started = time.monotonic()
    with pytest.raises(LoraforgeError) as err:
        push(plan_push(out, config), config, api=real_api(endpoint))
    return str(err.value), time.monotonic() - started


def test_no_write_access_403(inits, stand_in):
    StandIn.answers = {"POST": 403, "GET": 404}  # create refused; the repo is not visible either
    message, seconds = run_push(inits["rlpo"], stand_in)
    assert "no write access to me/x (403)" in message and "namespace you own" in message
    assert "No commit was made to me/x" in message and seconds < 10
    assert ("POST", "/api/repos/create") in StandIn.seen


def test_invalid_token_401(inits, stand_in):
    StandIn.answers = {"POST": 401, "GET": 401}
    message, _ = run_push(inits["rlpo"], stand_in)
    assert "rejected the token (401" in message and "hf auth login" in message and "hf_fake" not in message


def test_hub_error_500(inits, stand_in):
    StandIn.answers = {"POST": 500}
    message, seconds = run_push(inits["rlpo"], stand_in)
    assert "the Hub answered 500" in message and "stand-in says 500" in message and seconds < 10


def test_unreachable_hub_fails_within_seconds(inits, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    message, seconds = run_push(inits["rlpo"], f"http://127.0.0.1:{port}")
    assert "could not be reached" in message and "ConnectError" in message and "HF_ENDPOINT" in message
    assert seconds < 10


def test_hub_that_never_answers_times_out(inits, stand_in):
    StandIn.answers = {"POST": "hang"}
    message, seconds = run_push(inits["rlpo"], stand_in, read_timeout_s=0.5)
    assert "did not answer in time" in message and seconds < 4


def test_offline_mode_is_named(inits, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    message, _ = run_push(inits["rlpo"], "http://127.0.0.1:9")
    assert "HF_HUB_OFFLINE is set" in message


def test_timeouts_are_restored_after_a_push(inits, stand_in):
    from huggingface_hub.utils import _http

    before = _http._GLOBAL_CLIENT_FACTORY
    StandIn.answers = {"POST": 500}
    run_push(inits["rlpo"], stand_in)
    assert _http._GLOBAL_CLIENT_FACTORY is before
