"""Where a model comes from: a local directory or a Hugging Face Hub repository.

`resolve_source` returns a local directory with the config and checkpoint files, plus what the
manifest needs to say where they came from (the id the user gave and, for the Hub, the resolved
commit). Hub downloads go through huggingface_hub, so the usual login, HF_TOKEN, HF_HOME and
HF_HUB_OFFLINE all apply; the token itself never reaches our outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraforge.core.errors import LoraforgeError
from loraforge.core.readers import loads
from loraforge.models.checkpoint import SafetensorsFile

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ot", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files a residual base needs besides weights (config, tokenizer, generation config, chat template).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]


@dataclass
class Source:
    """A model checkpoint on local disk and where it came from."""

    model_id: str  # what the user passed: a Hub id, or a local path as given
    path: Path  # local directory holding config.json and the weights
    revision: Optional[str]  # resolved commit sha for Hub models; None for local directories
    is_local: bool
    config: dict  # config.json as a dict
    weight_format: str  # "safetensors" or "bin"
    shards: list[str] = field(default_factory=list)  # weight file names, in index order
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor key -> shard file name

    _open: dict = field(default_factory=dict, repr=False)  # shard name -> SafetensorsFile (header parsed once)

    def open_shard(self, name: str) -> SafetensorsFile:
        if name not in self._open:
            self._open[name] = SafetensorsFile(self.path / name)
        return self._open[name]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.endswith("/")
        or model.count("/") > 1
        or os.sep in model.replace("/", "")
    )


def check_local_or_hub(model: str) -> None:
    """Refuse MODEL when it names a local directory that is not there; a Hub id passes.

    `org/name` is both a Hub id and a relative path. It is taken for a path (and refused with "no such
    directory" rather than sent to the Hub, whose failure would be a network or not-found error) when it
    looks like one (`./x`, `/x`, `a/b/c`, `x/`) or when its first part is a directory here (`models/nope` next
    to a `models/` directory). The one rule for every command that takes a model (init, verify, inspect, and
    the base of `train` through adapters.directory.resolve_base)."""
    local = Path(model).expanduser()
    if local.exists():
        return
    parts = Path(model).parts
    if _looks_like_path(model):
        raise LoraforgeError(
            f"No such directory: {model}. "
            "Pass a model directory or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    if len(parts) > 1 and Path(parts[0]).is_dir():
        raise LoraforgeError(
            f"No such directory: {model} ({parts[0]}/ is a directory here, but holds no {Path(*parts[1:])}). Pass a "
            f"model directory; a Hub id of the same form is taken for a path while a directory {parts[0]}/ is here."
        )


def resolve_source(
    model: str, revision: Optional[str] = None, token: Optional[str] = None, trust_remote_code: bool = False
) -> Source:
    """Find the checkpoint for MODEL (a local directory or a Hub id) and read its index."""
    local = Path(model).expanduser()
    if local.exists():
        if not local.is_dir():
            raise LoraforgeError(
                f"{model} is a file; expected a model directory (with config.json and weights) or a Hub id."
            )
        if revision:
            raise LoraforgeError(f"--revision {revision} was given, but {model} is a local directory; drop --revision.")
        return _read_dir(model, local, None, True)
    check_local_or_hub(model)
    path, sha = _download(model, revision, token, trust_remote_code)
    return _read_dir(model, path, sha, False)


def _download(repo_id: str, revision: Optional[str], token: Optional[str], trust_remote_code: bool) -> tuple[Path, str]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            path = snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
            return Path(path), Path(path).name
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        files = {s.rfilename for s in info.siblings or []}
        if not any(f.endswith(".safetensors") for f in files):
            patterns = patterns + ["*.bin"]
        path = snapshot_download(repo_id, revision=info.sha, token=token, allow_patterns=patterns)
        return Path(path), info.sha
    except hf_errors.RepositoryNotFoundError:
        raise LoraforgeError(
            f"No local directory {repo_id} and no model {repo_id!r} on the Hugging Face Hub, or it is private or "
            "gated. Check the id; for a private "
            "model log in with `hf auth login` or set HF_TOKEN; for a local model pass its directory."
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise LoraforgeError(
            f"Revision {revision!r} not found in {repo_id}. Pass a branch, tag or commit that exists."
        ) from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
        raise LoraforgeError(
            f"Could not get {repo_id!r}: it is not a local directory, the Hub is unreachable or offline mode is on, "
            "and it is not in the local "
            f"cache ({type(e).__name__}). Connect to the network, or pass a local model directory."
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise LoraforgeError(
            f"Could not download {repo_id!r} from the Hub: {e}. Retry, or pass a local model directory."
        ) from None
    except Exception as e:
        # A network that is down surfaces as the HTTP client's own transport error (httpx, or httpx2
        # in huggingface_hub 2.x), which is neither an HfHubHTTPError nor an OSError.
        if not is_network_error(e):
            raise
        raise LoraforgeError(
            f"Could not reach the Hugging Face Hub to get {repo_id!r} ({type(e).__name__}: {e}), and it is not a "
            "local directory. Check the network, "
            "pass a local model directory, or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from None


def is_network_error(e: BaseException) -> bool:
    """True for the HTTP client's transport errors (connection refused, DNS failure, timeouts)."""
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def read_json_object(path: Path, what: str) -> dict:
    """PATH parsed as a JSON object, or a LoraforgeError naming the file (WHAT says what it should be)."""
    try:
        data = loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LoraforgeError(
            f"{path} is not valid JSON ({type(e).__name__}: {e}); {what} is damaged. Re-download or re-save it."
        ) from None
    if not isinstance(data, dict):
        raise LoraforgeError(f"{path} holds a JSON {type(data).__name__}, not an object; {what} is damaged.")
    return data


def _read_dir(model_id: str, path: Path, revision: Optional[str], is_local: bool) -> Source:
    config_path = path / "config.json"
    if not config_path.exists():
        raise LoraforgeError(
            f"{model_id} has no config.json; expected a transformers model directory (config.json + weights)."
        )
    config = read_json_object(config_path, "the model config")
    for index_name, fmt in zip(INDEX_NAMES, ("safetensors", "bin")):
        if (path / index_name).exists():
            weight_map = _read_index(path / index_name)
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise LoraforgeError(
                    f"{model_id}: {index_name} names {missing[0]}, which is not in the directory. "
                    "Re-download the model."
                )
            source = Source(model_id, path, revision, is_local, config, fmt, shards, weight_map)
            if fmt == "safetensors":
                check_index(source, index_name)
            return source
    if (path / "model.safetensors").exists():
        keys = SafetensorsFile(path / "model.safetensors").keys()
        return Source(
            model_id,
            path,
            revision,
            is_local,
            config,
            "safetensors",
            ["model.safetensors"],
            {k: "model.safetensors" for k in keys},
        )
    if (path / "pytorch_model.bin").exists():
        return Source(model_id, path, revision, is_local, config, "bin", ["pytorch_model.bin"], {})
    found = sorted(p.name for p in path.iterdir())[:10]
    raise LoraforgeError(
        f"{model_id} has no weights: expected model.safetensors, a sharded model.safetensors.index.json or "
        f"pytorch_model.bin; found {found}. Point at the directory that save_pretrained wrote."
    )


def _read_index(index_path: Path) -> dict[str, str]:
    index = read_json_object(index_path, "the checkpoint index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
        for k, v in weight_map.items()
    ):
        raise LoraforgeError(
            f"{index_path} has no valid weight_map ({{tensor name: shard file name}}); the index is damaged. "
            "Re-download the model."
        )
    return weight_map


def check_index(source: Source, index_name: str) -> None:
    """Every key of the index is in the shard it names (reads the shards' headers, which checks them too)."""
    held: dict[str, set[str]] = {s: set(source.open_shard(s).tensors) for s in source.shards}
    for key, shard in source.weight_map.items():
        if key not in held[shard]:
            where = [s for s, keys in held.items() if key in keys]
            also = f" (it is in {where[0]})" if where else " (no shard holds it)"
            raise LoraforgeError(
                f"{source.path / index_name} maps {key} to {shard}, which does not hold it{also}; the index and "
                "the shards disagree. Re-download the model."
            )


def companion_files(source: Source, trust_remote_code: bool = False) -> list[Path]:
    """Non-weight files a residual base directory needs too: tokenizer, generation config, chat
    template, license... (not config.json or the index, which are rewritten; not the model card)."""
    skip = {"config.json", "README.md", *INDEX_NAMES}
    files = []
    for p in sorted(source.path.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in skip or p.name.endswith(WEIGHT_SUFFIXES):
            continue
        if p.suffix == ".py" and not trust_remote_code:
            continue
        files.append(p)
    return files
