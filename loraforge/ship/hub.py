"""`loraforge push`: upload an adapter directory (and its residual base) to the Hugging Face Hub.

Two steps, so that `--dry-run` is the first one alone:
- `plan_push(out, config)` reads OUT and decides every file, its destination and its content (the
  adapter_config.json, loraforge.json and model cards are rewritten), without any network;
- `push(plan, config, api)` creates the repositories and makes ONE commit per repository through
  huggingface_hub's HfApi (large files go through its LFS/Xet upload, as the Hub expects).

Where the residual base goes: its OWN model repository (default `REPO_ID-residual-base`, or
--base-repo), pushed first; the adapter repository is committed last and its adapter_config.json
names the base repository. Why not a `base/` subfolder: vLLM (`vllm serve MODEL`), verl
(`model.path`) and PEFT's `AutoPeftModel` (`base_model_name_or_path`) all take a model as a
repository id or a directory, not a subfolder of another repository. Committing the adapter last
means an adapter repository never points at a base that is not there.

Safety: the token comes from huggingface_hub (`hf auth login` or HF_TOKEN) and is never printed or
written; nothing pushed carries a local absolute path (base_model_name_or_path and the manifest's
source are rewritten to Hub ids, and every text file is scanned before anything is sent).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraforge.adapters.directory import Adapter, load_adapter
from loraforge.adapters.writers import ADAPTER_CONFIG, MANIFEST
from loraforge.core.errors import LoraforgeError
from loraforge.models.source import is_network_error

INIT_FORMAT = "loraforge-manifest/1"
CONVERTED_FORMAT = "loraforge-converted/1"
BASE_REPO_SUFFIX = "-residual-base"
# Files scanned for local paths before pushing (everything else is binary weights).
TEXT_SUFFIXES = {".json", ".md", ".txt", ".jinja", ".yaml", ".yml", ".py", ".model", ".tiktoken"}


@dataclass
class PushConfig:
    """Where to push. Every field has a flag of the same name in `loraforge push`."""

    repo_id: str  # owner/name of the adapter repository
    private: bool = False  # create new repositories as private (an existing repo keeps its visibility)
    revision: Optional[str] = None  # branch to commit to (created if missing); None: main
    base_repo: Optional[str] = None  # residual base repository; None: REPO_ID-residual-base
    base_model: Optional[str] = None  # Hub id of the original model when OUT was made from a local directory
    commit_message: Optional[str] = None
    connect_timeout_s: float = 10.0  # fail within seconds when the Hub cannot be reached
    read_timeout_s: float = 300.0  # a large commit can take the Hub a while to answer

    def __post_init__(self):
        _check_repo_id(self.repo_id, "REPO_ID")
        if self.base_repo is not None:
            _check_repo_id(self.base_repo, "--base-repo")
            if self.base_repo == self.repo_id:
                raise LoraforgeError("--base-repo must differ from REPO_ID: the residual base is its own repository.")
        if self.base_model is not None:
            _check_repo_id(self.base_model, "--base-model")


def _check_repo_id(repo_id: str, flag: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise LoraforgeError(
            f"{flag} {repo_id!r} must be OWNER/NAME (your user or organisation name, then the repository name)."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LoraforgeError(f"{flag} {repo_id!r} is not a valid Hub repository id: {e}") from None


@dataclass
class Upload:
    """One file to upload: a local file as is, or rewritten content."""

    repo_id: str
    path_in_repo: str
    local: Optional[Path] = None
    content: Optional[bytes] = None
    note: str = ""  # why the content differs from the local file, for --dry-run
    seen: Optional[tuple] = None  # the local file's (device, inode, size, mtime) when planned

    def __post_init__(self):
        if self.local is not None:
            self.seen = _stat_key(self.local)

    def changed(self) -> bool:
        """True when the local file is no longer the one planned (replaced, or written to since)."""
        try:
            return self.local is not None and _stat_key(self.local) != self.seen
        except OSError:
            return True

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.local.stat().st_size

    def text(self) -> Optional[str]:
        """The content as text when it is a text file (for the local-path scan), else None."""
        if self.content is not None:
            return self.content.decode("utf-8", errors="replace")
        if Path(self.path_in_repo).suffix in TEXT_SUFFIXES or Path(self.path_in_repo).name.startswith("tokenizer"):
            return self.local.read_bytes().decode("utf-8", errors="replace")
        return None


@dataclass
class PushPlan:
    """Everything `push` will send, decided locally."""

    out: Path
    adapter_repo: str
    base_repo: Optional[str]  # None unless the method residualised the base
    revision: Optional[str]
    private: bool
    uploads: list[Upload]
    cards: dict[str, str]  # repo id -> README.md text
    skipped: list[str] = field(default_factory=list)  # files in OUT that are not pushed

    @property
    def repos(self) -> list[str]:
        """Repositories in commit order: the residual base first, the adapter last."""
        return [r for r in (self.base_repo, self.adapter_repo) if r]

    def uploads_for(self, repo_id: str) -> list[Upload]:
        return [u for u in self.uploads if u.repo_id == repo_id]

    def describe(self) -> str:
        """The --dry-run listing: every file, its size, where it comes from and where it goes."""
        branch = self.revision or "main"
        visibility = "private" if self.private else "public unless the owner defaults to private"
        lines = []
        for repo in self.repos:
            role = "residual base" if repo == self.base_repo else "adapter"
            lines.append(f"{repo} ({role}; branch {branch}; {visibility}):")
            for u in self.uploads_for(repo):
                origin = f"<- {u.local}" if u.local is not None else f"({u.note})"
                lines.append(f"  {u.path_in_repo:<40} {_human(u.size):>10}  {origin}")
        if self.skipped:
            lines.append(f"not pushed (not part of the adapter): {', '.join(self.skipped)}")
        return "\n".join(lines)


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _looks_local(model_id: str) -> bool:
    # Hub ids are NAME or OWNER/NAME; anything else, or a path that exists here, is local.
    return (
        model_id.startswith(("/", ".", "~"))
        or "\\" in model_id
        or model_id.count("/") > 1
        or Path(model_id).expanduser().exists()
    )


def plan_push(out: str | Path, config: PushConfig) -> PushPlan:
    """Decide what `push` uploads where, reading only local files."""
    from loraforge.adapters.card import (
        CardRefs,
        render_base_card,
        render_converted_card,
        render_model_card,
        render_plain_card,
    )

    out = Path(out)
    adapter = load_adapter(out, "OUT")
    manifest = adapter.manifest
    kind = (manifest or {}).get("format")
    if manifest is not None and kind not in (INIT_FORMAT, CONVERTED_FORMAT):
        raise LoraforgeError(
            f"{out}/{MANIFEST} has format {kind!r}, which this loraforge does not know; upgrade loraforge."
        )

    original, original_rev = _original_model(adapter, config)
    residual = kind == INIT_FORMAT and manifest.get("base") is not None
    if config.base_repo is not None and not residual:
        raise LoraforgeError(
            f"--base-repo was given, but {out} has no residual base (its method keeps the original weights): "
            "drop --base-repo."
        )
    base_repo = (config.base_repo or config.repo_id + BASE_REPO_SUFFIX) if residual else None
    if residual:
        _check_repo_id(base_repo, "the residual base repository (REPO_ID-residual-base; choose one with --base-repo)")
        if not adapter.base_dir.is_dir():
            raise LoraforgeError(
                f"{out} is a {manifest['method']} init but its residual base {adapter.base_dir} is missing; "
                "re-run loraforge init."
            )

    refs = CardRefs(
        adapter=config.repo_id,
        base=base_repo or original,
        original=original,
        revision=config.revision,
        original_revision=original_rev,
        base_is_repo=residual,
    )
    repo = config.repo_id
    uploads = [Upload(repo, adapter.weights_file.name, local=adapter.weights_file)]

    cfg = dict(adapter.config)
    cfg["base_model_name_or_path"] = base_repo or original
    # PEFT's AutoPeftModel loads the base at config["revision"]: the commit of the residual base this push
    # makes (pinned by `push` once the base repository's commit exists; the branch until then), or the
    # commit of the original model the init read.
    cfg["revision"] = (config.revision if residual else original_rev) or None
    pinned = "; revision: the residual base's new commit" if residual else ""
    uploads.append(
        Upload(
            repo,
            ADAPTER_CONFIG,
            content=_json_bytes(cfg),
            note=f"rewritten: base_model_name_or_path = {cfg['base_model_name_or_path']}{pinned}",
        )
    )

    cards = {}
    if manifest is not None:
        pushed = json.loads(json.dumps(manifest))
        if pushed["source"].get("local"):
            # The pushed manifest names a Hub model (so verify/inspect of a downloaded copy resolve it);
            # that the init read a local copy of it stays on record.
            pushed["source"] = dict(
                pushed["source"], model_id=original, revision=original_rev, local=False, local_copy_at_init=True
            )
        else:
            pushed["source"] = dict(pushed["source"], model_id=original)
        pushed["hub"] = {"repo_id": repo, "base_repo": base_repo, "revision": config.revision}
        _rehash_rewritten(pushed, _json_bytes(cfg), residual)
        uploads.append(
            Upload(
                repo,
                MANIFEST,
                content=_json_bytes(pushed, sort_keys=False),
                note=f"rewritten: source.model_id = {original}; hub repos added",
            )
        )
    if kind == INIT_FORMAT:
        cards[repo] = render_model_card(manifest, refs)
    elif kind == CONVERTED_FORMAT:
        cards[repo] = render_converted_card(pushed, refs)
    else:
        cards[repo] = render_plain_card(adapter.config, refs)
    uploads.append(Upload(repo, "README.md", content=cards[repo].encode(), note="generated model card"))

    pushed_names = {adapter.weights_file.name, ADAPTER_CONFIG, MANIFEST, "README.md"}
    skipped = sorted(
        p.name for p in out.iterdir() if p.name not in pushed_names and not (residual and p == adapter.base_dir)
    )

    if residual:
        for f in sorted(p for p in adapter.base_dir.rglob("*") if p.is_file()):
            rel = f.relative_to(adapter.base_dir).as_posix()
            if rel != "README.md" and not rel.startswith("."):
                uploads.append(Upload(base_repo, rel, local=f))
        cards[base_repo] = render_base_card(manifest, refs)
        uploads.append(Upload(base_repo, "README.md", content=cards[base_repo].encode(), note="generated model card"))

    plan = PushPlan(out, repo, base_repo, config.revision, config.private, uploads, cards, skipped)
    _refuse_local_paths(plan, adapter)
    return plan


def _original_model(adapter: Adapter, config: PushConfig) -> tuple[str, Optional[str]]:
    """The Hub id (and commit, when known) of the pretrained model the adapter belongs to."""
    manifest = adapter.manifest
    if manifest is not None and "source" in manifest:
        src = manifest["source"]
        model_id, revision, local = src["model_id"], src.get("revision"), src.get("local", False)
    else:
        model_id, revision = adapter.config.get("base_model_name_or_path") or "", adapter.config.get("revision")
        local = _looks_local(model_id)
    if config.base_model is not None:
        # The user names the Hub model explicitly; a commit recorded for another id would not apply.
        return config.base_model, revision if config.base_model == model_id else None
    if local or not model_id:
        where = f"the local directory {model_id}" if model_id else "an unnamed model"
        raise LoraforgeError(
            f"{adapter.path} was made from {where}, and a local path must not be pushed. "
            "Pass --base-model with the Hub id of that model (e.g. --base-model Qwen/Qwen2.5-1.5B-Instruct): "
            "the card and adapter_config.json will name it."
        )
    return model_id, revision


def _rehash_rewritten(pushed: dict, config_bytes: bytes, residual: bool) -> None:
    """The pushed manifest records what is pushed: the rewritten adapter_config.json's sha256, and the
    residual base's generated model card among the files it does not hash (verify of a download passes)."""
    files = pushed.get("files") or {}
    if ADAPTER_CONFIG in files:
        files[ADAPTER_CONFIG] = hashlib.sha256(config_bytes).hexdigest()
    if residual and "files_unhashed" in pushed:
        pushed["files_unhashed"] = list(dict.fromkeys([*pushed["files_unhashed"], "base/README.md"]))


def _json_bytes(data: dict, sort_keys: bool = True) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=sort_keys) + "\n").encode()


def _refuse_local_paths(plan: PushPlan, adapter: Adapter) -> None:
    """Refuse to push any text that contains a local absolute path (the output dir, the model, home)."""
    forbidden = {str(plan.out.resolve()), str(adapter.path.resolve())}
    src = (adapter.manifest or {}).get("source", {})
    if src.get("local"):
        forbidden.add(str(Path(src["model_id"]).expanduser().resolve()))
        if src["model_id"].startswith(("/", "~")):
            forbidden.add(src["model_id"])
    home = str(Path.home())
    if len(home) > 1:
        forbidden.add(home)
    # Keys that tools fill with the path a model was loaded from.
    path_key = re.compile(r'"(?:\w*_name_or_path|name_or_path)"\s*:\s*"((?:/|~|[A-Za-z]:\\\\)[^"]*)"')
    for u in plan.uploads:
        text = u.text()
        if text is None:
            continue
        hit = next((p for p in sorted(forbidden, key=len, reverse=True) if p in text), None)
        if hit is None and (m := path_key.search(text)):
            hit = m.group(1)
        if hit is not None:
            source = u.local or f"the rewritten {u.path_in_repo}"
            raise LoraforgeError(
                f"{u.repo_id}/{u.path_in_repo} would carry the local path {hit!r} (from {source}); nothing was pushed. "
                "Remove the path from that file (or pass --base-model for the model id) and push again."
            )


@dataclass
class PushResult:
    commits: dict[str, str]  # repo id -> commit URL (or oid)


def push(plan: PushPlan, config: PushConfig, api=None) -> PushResult:
    """Create the repositories and commit PLAN's files, the residual base first, the adapter last."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi()
    _require_token(api)
    message = config.commit_message or f"Upload {plan.adapter_repo} with loraforge"
    endpoint = getattr(api, "endpoint", None) or "the configured endpoint"
    commits: dict[str, str] = {}
    base_commit = None  # the residual base's commit, pinned in the adapter's config
    with hub_timeouts(config.connect_timeout_s, config.read_timeout_s):
        for repo in plan.repos:
            done = f" Already pushed: {', '.join(commits)}." if commits else ""
            _hub_call(
                api.create_repo,
                "create the repository",
                repo,
                done,
                endpoint,
                repo_id=repo,
                private=True if config.private else None,
                exist_ok=True,
                repo_type="model",
            )
            if config.revision and config.revision != "main":
                _hub_call(
                    api.create_branch,
                    f"create branch {config.revision}",
                    repo,
                    done,
                    endpoint,
                    repo_id=repo,
                    branch=config.revision,
                    exist_ok=True,
                    repo_type="model",
                )
            _refuse_changed(plan, repo, f"Nothing was committed to {repo}.{done}")
            ops = [
                CommitOperationAdd(
                    path_in_repo=u.path_in_repo, path_or_fileobj=u.content if u.content is not None else str(u.local)
                )
                for u in _pinned(plan, repo, base_commit)
            ]
            info = _hub_call(
                api.create_commit,
                "commit the files",
                repo,
                done,
                endpoint,
                repo_id=repo,
                operations=ops,
                commit_message=message,
                revision=config.revision,
                repo_type="model",
            )
            commits[repo] = str(getattr(info, "commit_url", None) or getattr(info, "oid", None) or info)
            if repo == plan.base_repo and isinstance(getattr(info, "oid", None), str):
                base_commit = info.oid
            _refuse_changed(plan, repo, f"{repo} was committed, but may mix old and new files.")
    return PushResult(commits)


def _refuse_changed(plan: PushPlan, repo: str, what: str) -> None:
    """What was planned (and scanned for local paths) is what is sent: a local file replaced or written
    since the plan (a training run still saving into OUT?) stops the push before the commit."""
    changed = [str(u.local) for u in plan.uploads_for(repo) if u.changed()]
    if changed:
        raise LoraforgeError(
            f"{changed[0]} changed while pushing ({len(changed)} file(s) of {plan.out} differ from when the push "
            f"was planned); is something still writing {plan.out}? {what} Push again once it is finished."
        )


def _pinned(plan: PushPlan, repo: str, base_commit: Optional[str]) -> list[Upload]:
    """REPO's uploads; for the adapter repository of a residual init, adapter_config.json's revision pinned to
    the residual base's commit this push made (and the manifest's hash of it updated): the adapter loads the
    base it was pushed with, and an adapter pushed earlier keeps loading its own base, not this new one."""
    uploads = plan.uploads_for(repo)
    if repo != plan.adapter_repo or base_commit is None:
        return uploads
    out = []
    for u in uploads:
        if u.path_in_repo == ADAPTER_CONFIG:
            config = json.loads(u.content)
            config["revision"] = base_commit
            u = Upload(repo, ADAPTER_CONFIG, content=_json_bytes(config), note=u.note)
            config_sha = hashlib.sha256(u.content).hexdigest()
        out.append(u)
    for i, u in enumerate(out):
        if u.path_in_repo == MANIFEST:
            manifest = json.loads(u.content)
            if ADAPTER_CONFIG in (manifest.get("files") or {}):
                manifest["files"][ADAPTER_CONFIG] = config_sha
            manifest.setdefault("hub", {})["base_revision"] = base_commit
            out[i] = Upload(repo, MANIFEST, content=_json_bytes(manifest, sort_keys=False), note=u.note)
    return out


def _require_token(api) -> None:
    """Fail before any network call when no token is configured; the token itself is never shown."""
    import huggingface_hub

    token = api.token if isinstance(getattr(api, "token", None), str) else None
    if token is None and huggingface_hub.get_token() is None:
        raise LoraforgeError(
            "No Hugging Face token found, so nothing can be pushed. Log in with `hf auth login` (with a token that has "
            "write access) or set the HF_TOKEN environment variable, then run the command again."
        )


@contextlib.contextmanager
def hub_timeouts(connect_s: float, read_s: float):
    """Give huggingface_hub's HTTP client timeouts for the duration of a push.

    huggingface_hub's shared client has no timeout, so an unreachable network would hang until the
    OS gives up; a connect timeout of seconds turns that into a clear error. The previous client
    factory is restored afterwards (it is process-global state).
    """
    import huggingface_hub
    from huggingface_hub.utils import _http

    httpx = getattr(_http, "httpx2", None) or getattr(_http, "httpx", None)
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if httpx is None or previous is None or not hasattr(huggingface_hub, "set_client_factory"):
        yield  # an older huggingface_hub (requests based): keep its defaults
        return

    def factory():
        client = previous()
        client.timeout = httpx.Timeout(read_s, connect=connect_s)
        return client

    huggingface_hub.set_client_factory(factory)
    try:
        yield
    finally:
        huggingface_hub.set_client_factory(previous)


def _hub_call(fn, what: str, repo: str, done: str, endpoint: str, **kwargs):
    """Call an HfApi method; turn what can go wrong into a LoraforgeError that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    nothing = f" No commit was made to {repo}.{done}"
    rerun = " Re-running the same command is safe: repositories are reused and files re-uploaded."
    try:
        return fn(**kwargs)
    except OfflineModeIsEnabled:
        raise LoraforgeError(
            f"HF_HUB_OFFLINE is set, so huggingface_hub refuses to contact the Hub. Unset it to push.{nothing}"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if getattr(e, "response", None) is not None else None
        server = (getattr(e, "server_message", None) or str(e)).strip().splitlines()[0][:300]
        if status == 401:
            msg = (
                "the Hub rejected the token (401: invalid or expired). "
                "Log in again with `hf auth login` or set HF_TOKEN to a valid token with write access"
            )
        elif status == 403:
            msg = (
                f"no write access to {repo} (403): it belongs to another user or organisation, or the token is "
                "read-only. Push to a namespace you own (YOUR_NAME/...) or use a token with write access"
            )
        elif isinstance(e, RepositoryNotFoundError) or status == 404:
            msg = (
                f"the Hub cannot find {repo} for this token (404). "
                "Check the id and that the token can see the repository"
            )
        else:
            msg = f"the Hub answered {status} ({server}). Retry later"
        raise LoraforgeError(
            f"Could not {what} for {repo}: {msg}.{nothing}{rerun if status not in (401, 403) else ''}"
        ) from None
    except OSError as e:
        raise LoraforgeError(_network_message(what, repo, e, endpoint) + nothing + rerun) from None
    except Exception as e:  # httpx transport errors are not OSErrors
        if is_network_error(e):
            raise LoraforgeError(_network_message(what, repo, e, endpoint) + nothing + rerun) from None
        raise


def _network_message(what: str, repo: str, e: Exception, endpoint: str) -> str:
    kind = "did not answer in time" if "Timeout" in type(e).__name__ else "could not be reached"
    return (
        f"Could not {what} for {repo}: the Hub at {endpoint} {kind} ({type(e).__name__}: {e}). Check the network, "
        f"a proxy or HF_ENDPOINT."
    )
