"""Run in a subprocess by tests/rl/test_verl_real.py, with hydra-core, omegaconf, antlr4 4.9 (and verl's other
dependencies) first on PYTHONPATH: for each real verl release given, compose Hydra override lists strictly against
that release's shipped configuration, and score responses with verl's own DAPO reward manager built from a
composed config.

stdin: {"releases": [{"version": "0.9.1", "path": ".cache/verl/0.9.1",     # the directory holding its package
                      "compose": [[override, ...], ...],                   # each composed with ppo_trainer.yaml
                      "rewards": [{"overrides": [...], "cases": [[response, ground_truth, valid_len], ...],
                                   "response_length": R}]}, ...]}
stdout (last line): [{"version": ..., "composed": [{"config": {...}} | {"error": "..."}, ...],
                      "rewards": [{"manager": "module.Class", "overlong_buffer_cfg": {...}, "max_resp_len": ...,
                                   "scores": [{"reward": float, "extra": {...}}, ...]}, ...]}, ...]

One process for all releases: importing verl is mostly importing torch, tensordict and ray (seconds), which the
releases share. Each release's package is on the path only while its own work runs: every composition first
(Hydra reads the release's YAML; verl is not imported), then per release, with the previous release's verl
modules dropped, its reward manager, imported from its own package, on the configs composed from its files.

Kept out of the pytest process: hydra-core needs antlr4 4.9, math-verify in the test venv needs 4.13.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path


def verl_root(expected: str) -> Path:
    """The directory holding the verl package on the path, checked to be release EXPECTED (not imported)."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("verl is not on PYTHONPATH")
    pkg = Path(list(spec.submodule_search_locations)[0])
    found = (pkg / "version" / "version").read_text().strip()
    if found != expected:
        sys.exit(f"expected verl {expected} on PYTHONPATH, found {found} at {pkg}")
    return pkg


def compose(config_dir: Path, overrides: list[str]):
    """ppo_trainer.yaml + OVERRIDES the way verl's @hydra.main does; struct mode: an unknown key raises."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def compose_result(config_dir: Path, overrides: list[str], kept: dict) -> dict:
    """The composed config as plain data, or the error; a config that composes is also kept (by its overrides)
    for the reward managers."""
    from omegaconf import OmegaConf

    try:
        cfg = kept[tuple(overrides)] = compose(config_dir, overrides)
    except Exception as e:  # hydra's ConfigCompositionException; the cause names the key
        cause = f" | {e.__cause__}" if e.__cause__ is not None else ""
        return {"error": f"{type(e).__name__}: {e}{cause}"}
    assert OmegaConf.is_struct(cfg)
    return {"config": OmegaConf.to_container(cfg, resolve=False)}


class TextTokenizer:
    """Decodes a response whose token ids all equal k to the k-th case's text: the tokenizer is not under test,
    the reward manager's length arithmetic and its call of compute_score are."""

    def __init__(self, texts: list[str]):
        self.texts = texts

    def decode(self, ids, skip_special_tokens=True):
        return self.texts[int(ids[0])]


def score(cfg, spec: dict) -> dict:
    import numpy as np
    import torch
    from verl import DataProto
    from verl.trainer.ppo.reward import load_reward_manager

    cases = spec["cases"]
    R, P = spec["response_length"], 4

    async def run():
        # verl's reward loop builds its manager with load_reward_manager(config, tokenizer): that resolves
        # reward.reward_manager.name and loads reward.custom_reward_function with get_custom_reward_fn
        manager = load_reward_manager(cfg, TextTokenizer([c[0] for c in cases]))
        out = []
        for k, (_, ground_truth, valid_len) in enumerate(cases):
            attention = torch.zeros(1, P + R, dtype=torch.long)
            attention[0, : P + valid_len] = 1
            data = DataProto.from_dict(
                tensors={
                    "prompts": torch.ones(1, P, dtype=torch.long),
                    "responses": torch.full((1, R), k, dtype=torch.long),
                    "attention_mask": attention,
                },
                non_tensors={
                    "data_source": np.array(["loraforge"], dtype=object),
                    "reward_model": np.array([{"ground_truth": ground_truth}], dtype=object),
                    "extra_info": np.array([{"index": k}], dtype=object),
                },
            )
            result = await manager.run_single(data)
            extra = {key: _plain(v) for key, v in result["reward_extra_info"].items()}
            out.append({"reward": float(result["reward_score"]), "extra": extra})
        return manager, out

    manager, scores = asyncio.run(run())
    from omegaconf import OmegaConf

    ob = manager.overlong_buffer_cfg
    return {
        "manager": f"{type(manager).__module__}.{type(manager).__name__}",
        "overlong_buffer_cfg": OmegaConf.to_container(ob) if ob is not None else None,
        "max_resp_len": manager.max_resp_len,
        "scores": scores,
    }


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


@contextlib.contextmanager
def release(path: str, version: str):
    """RELEASE's package first on sys.path (no other verl imported), yielding its config directory."""
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        del sys.modules[name]  # the previous release's modules: `import verl` below reads this one's files
    sys.path.insert(0, path)
    importlib.invalidate_caches()
    try:
        yield verl_root(version) / "trainer" / "config"
    finally:
        sys.path.remove(path)


def main() -> None:
    releases = json.loads(sys.stdin.read())["releases"]
    results, configs = [], []
    for rel in releases:  # every composition before any verl import
        with release(rel["path"], rel["version"]) as config_dir:
            kept = {}
            composed = [compose_result(config_dir, o, kept) for o in rel["compose"]]
            results.append({"version": rel["version"], "composed": composed})
            rewards = rel.get("rewards", [])
            configs.append([kept.get(tuple(r["overrides"])) or compose(config_dir, r["overrides"]) for r in rewards])
    for rel, result, cfgs in zip(releases, results, configs):
        with release(rel["path"], rel["version"]):
            result["rewards"] = [score(cfg, spec) for cfg, spec in zip(cfgs, rel.get("rewards", []))]
            import verl  # the manager above came from this release's files

            assert Path(verl.__file__).resolve().is_relative_to(Path(rel["path"]).resolve()), verl.__file__
    print(json.dumps(results))


if __name__ == "__main__":
    main()
