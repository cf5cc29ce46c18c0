"""The verl hand-off against the real verl releases it supports: every override run_verl.sh passes is composed
with Hydra in strict mode against the configuration each release ships, and verl's own DAPO reward manager,
built from that composed configuration the way verl's reward loop builds it, scores the DAPO test vectors
with loraforge's reward.py and applies the overlong penalty the run asked for.

verl itself is never imported here: scripts/verl_cache.sh installs each release's package (--no-deps; its own
requirements are GPU-scale) into .cache/verl/VERSION and the few packages its configuration and reward code
import into .cache/verl/deps, run by this test when they are missing (so the suite's set-up does not wait for them);
tests/rl/verl_probe.py runs in a subprocess with them first on PYTHONPATH (hydra-core needs antlr4 4.9, while
math-verify in the test venv needs 4.13), one process for every release (each release's package on its path in
turn).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_rewards import RLVR_VECTORS

import loraforge
from loraforge.cli import main
from loraforge.rl.rewards import overlong_penalty
from loraforge.rl.verl_launch import ADDED_PREFIX, SUPPORTED_VERL, VERL_ENTRY

ROOT = Path(loraforge.__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "verl"
PROBE = Path(__file__).with_name("verl_probe.py")

# The hand-offs composed for each release: both algorithms, with and without the overlong buffer.
RUNS = {
    "dapo": ["--algo", "dapo", "--overlong-buffer", "64", "--overlong-penalty", "0.5", "--max-response-length", "256"],
    "dapo-no-buffer": ["--algo", "dapo", "--overlong-buffer", "0"],
    "grpo": ["--algo", "grpo"],
    "grpo-buffer": ["--algo", "grpo", "--overlong-buffer", "128", "--max-response-length", "512"],
}
# Keys each release must refuse: the pre-0.9 overlong key (what loraforge used to emit), a DAPO manager key
# without `++` (the shipped config lacks it), a misspelt key. Refusals prove the composition is strict.
REFUSED = [
    "reward_model.overlong_buffer.enable=True",
    "reward.reward_kwargs.max_resp_len=256",
    "actor_rollout_ref.model.lora_rnak=4",
]


def _runtime(version: str) -> list[Path]:
    paths = [CACHE / version, CACHE / "deps"]
    why = _fill_cache() if any(not p.is_dir() for p in paths) else ""
    missing = [p for p in paths if not p.is_dir()]
    if missing:
        pytest.skip(
            f"{missing[0]} is missing and could not be installed: bash scripts/verl_cache.sh installs verl "
            f"{version}'s package and its config dependencies there ({why})"
        )
    return paths


def _fill_cache() -> str:
    """scripts/verl_cache.sh, once: other test processes wait on the lock, then find the directories made. Returns
    the end of its error output (why it failed, when it did)."""
    import fcntl

    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        env = dict(os.environ, PYTHON=sys.executable)
        p = subprocess.run(
            ["bash", str(ROOT / "scripts" / "verl_cache.sh")], env=env, capture_output=True, text=True, timeout=900
        )
    return p.stderr.strip()[-500:]


def _probe(releases: list[dict]) -> list[dict]:
    """verl_probe.py on RELEASES (each with its package's directory), in one process: see its docstring."""
    paths = [str(CACHE / "deps"), str(ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    p = subprocess.run(
        [sys.executable, str(PROBE)],
        input=json.dumps({"releases": releases}),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def script_overrides(script: Path) -> list[str]:
    """run_verl.sh's Hydra overrides, as the shell passes them to verl."""
    text = script.read_text()
    argv = shlex.split(text[text.index(f"python3 -m {VERL_ENTRY}") :].replace("\\\n", " "))
    assert argv[:3] == ["python3", "-m", VERL_ENTRY] and argv[-1] == "$@"
    return argv[3:-1]


def documented_overrides() -> list[str]:
    """The generated command docs/scale.md shows, as a shell would pass it."""
    text = (ROOT / "docs" / "scale.md").read_text()
    block = text[text.index(f"```bash\npython3 -m {VERL_ENTRY}") + len("```bash\n") :]
    argv = shlex.split(block[: block.index("```")].replace("\\\n", " "))
    return argv[3:]


def _hand_off(version, model_dir, adapter_dir, out, extra):
    args = ["train", "--backend", "verl", "--verl-version", version, "--model", str(model_dir)]
    args += ["--adapter", str(adapter_dir), "-o", str(out), "--data", "synthetic:n=40,max=2"]
    args += ["--prompt-batch", "4", "--mini-batch", "4", "--group-size", "2", "--verl-gpus-per-node", "1", *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return script_overrides(out / "verl" / "run_verl.sh"), json.loads((out / "verl" / "overrides.json").read_text())


def _at(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no {part!r} in the composed config"
        node = node[part]
    return node


@pytest.fixture(scope="module")
def probed(model_dir, adapter_dir, tmp_path_factory):
    """Every release's RUNS hand-offs, composed and scored by one verl_probe.py process for all releases (most of
    a probe is importing torch, tensordict and ray, which the releases share): version -> what `composed` gives,
    or the reason its release is missing."""
    # (response, ground truth, valid response length): the DAPO vectors well inside the length limit, then
    # "Answer: 5" (right) and "Answer: 4" (wrong) at lengths reaching into the overlong buffer
    vectors = [[r, gt, 10] for r, gt, _ in RLVR_VECTORS]
    lengths = [192, 224, 256]
    vectors += [["Answer: 5", "5", n] for n in lengths] + [["Answer: 4", "5", n] for n in lengths]
    out, jobs = {}, {}
    for version in SUPPORTED_VERL:
        try:
            _runtime(version)
        except pytest.skip.Exception as e:
            out[version] = str(e)
            continue
        runs = {
            name: _hand_off(version, model_dir, adapter_dir, tmp_path_factory.mktemp(name), extra)
            for name, extra in RUNS.items()
        }
        out[version] = {"runs": runs, "vectors": vectors}
        jobs[version] = {
            "version": version,
            "path": str(CACHE / version),
            "compose": [argv for argv, _ in runs.values()] + [[key] for key in REFUSED] + [documented_overrides()],
            "rewards": [
                {"overrides": runs[name][0], "cases": vectors, "response_length": 256} for name in ("dapo", "grpo")
            ],
        }
    for version, result in zip(jobs, _probe(list(jobs.values())) if jobs else []):
        assert result["version"] == version
        runs = out[version]["runs"]
        out[version].update(
            configs=dict(zip(runs, result["composed"][: len(runs)])),
            refused=result["composed"][len(runs) : -1],
            documented=result["composed"][-1],
            rewards=dict(zip(("dapo", "grpo"), result["rewards"])),
        )
    return out


@pytest.fixture(scope="module", params=SUPPORTED_VERL)
def composed(request, probed):
    """For one release: each RUNS hand-off (its overrides, overrides.json, the composed config or error), the
    REFUSED errors, and verl's DAPO reward manager run on the "dapo" and "grpo" hand-offs."""
    found = probed[request.param]
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.mark.parametrize("run", sorted(RUNS))
def test_every_emitted_override_composes_strictly(composed, run):
    argv, overrides = composed["runs"][run]
    result = composed["configs"][run]
    assert "error" not in result, result.get("error")
    config = result["config"]
    # each value the hand-off set is the composed value verl will read (lists, numbers and null included)
    for key, value in overrides.items():
        assert _at(config, key) == value, key
    # only the DAPO manager's settings are added with ++; every other key exists in the shipped config
    added = [a.split("=", 1)[0][2:] for a in argv if a.startswith("++")]
    assert added and all(k.startswith(ADDED_PREFIX) for k in added)
    assert len(argv) == len(overrides)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_overlong_settings_reach_the_reward_config(composed, run):
    _, overrides = composed["runs"][run]
    config = composed["configs"][run]["config"]
    buffer = int(dict(zip(RUNS[run][::2], RUNS[run][1::2])).get("--overlong-buffer", "0"))  # grpo preset: 0
    assert config["reward"]["reward_manager"]["name"] == "dapo"
    assert config["reward"]["custom_reward_function"] == {
        "path": overrides["reward.custom_reward_function.path"],
        "name": "compute_score",
    }
    penalty = 0.5 if run == "dapo" else 1.0
    assert config["reward"]["reward_kwargs"] == {
        "overlong_buffer_cfg": {"enable": buffer > 0, "len": buffer, "penalty_factor": penalty, "log": buffer > 0},
        "max_resp_len": config["data"]["max_response_length"],
    }
    # nothing set at the recipe-era paths, which verl 0.9's main_ppo composes and ignores
    assert (config.get("custom_reward_function") or {}).get("path") is None
    assert (config.get("reward_model") or {}).get("reward_manager") is None
    assert "overlong_buffer" not in (config.get("reward_model") or {})


def test_the_shipped_config_refuses_unknown_keys(composed):
    errors = [r.get("error", "") for r in composed["refused"]]
    assert all(errors), errors
    assert "Could not override 'reward_model.overlong_buffer.enable'" in errors[0]
    assert "Could not override 'reward.reward_kwargs.max_resp_len'" in errors[1]
    assert "lora_rnak" in errors[2]


def test_verl_dapo_manager_scores_with_our_reward(composed):
    """verl's DAPO reward manager, built by verl's load_reward_manager from the composed "dapo" hand-off
    (max response 256 tokens, buffer 64, factor 0.5, so the penalty starts after 256 - 64 = 192 tokens)."""
    reward = composed["rewards"]["dapo"]
    assert reward["manager"] == "verl.experimental.reward_loop.reward_manager.dapo.DAPORewardManager"
    assert reward["overlong_buffer_cfg"] == {"enable": True, "len": 64, "penalty_factor": 0.5, "log": True}
    assert reward["max_resp_len"] == 256
    scores = reward["scores"]
    # the DAPO test vectors at 10 tokens: loraforge's reward.py score, unchanged (+1 right, -1 wrong)
    for (response, _, expected), got in zip(RLVR_VECTORS, scores):
        assert got["reward"] == expected, response
        assert got["extra"]["score"] == expected and got["extra"]["acc"] == (expected == 1.0)
        assert got["extra"]["overlong_reward"] == 0 and got["extra"]["overlong"] is False
    # into the buffer: penalty = min(-(L - 192) / 64 * 0.5, 0), added to the score
    #   192 tokens: 0;  224: -(32/64)*0.5 = -0.25;  256: -(64/64)*0.5 = -0.5
    tail = scores[len(RLVR_VECTORS) :]
    expected = [1.0, 0.75, 0.5, -1.0, -1.25, -1.5]
    assert [s["reward"] for s in tail] == expected
    assert [s["extra"]["overlong"] for s in tail] == [False, True, True, False, True, True]
    # the same numbers as loraforge's own trainer computes
    for (_, _, length), got in zip(composed["vectors"][len(RLVR_VECTORS) :], tail):
        assert got["extra"]["overlong_reward"] == overlong_penalty(length, 256, 64, 0.5)


def test_verl_dapo_manager_without_buffer(composed):
    """The "grpo" hand-off (no overlong shaping): the reward is the score at every length."""
    reward = composed["rewards"]["grpo"]
    assert reward["overlong_buffer_cfg"] == {"enable": False, "len": 0, "penalty_factor": 1.0, "log": False}
    assert reward["max_resp_len"] == 1024
    rewards = [s["reward"] for s in reward["scores"]]
    assert rewards == [v[2] for v in RLVR_VECTORS] + [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]
    assert all("overlong" not in s["extra"] for s in reward["scores"])


def test_the_documented_command_composes(composed):
    """docs/scale.md's generated command composes strictly and sets the keys the hand-off writes."""
    assert "error" not in composed["documented"], composed["documented"].get("error")
    documented = {a.split("=", 1)[0] for a in documented_overrides()}
    written = {a.split("=", 1)[0] for a in composed["runs"]["dapo"][0]}
    assert documented == written
