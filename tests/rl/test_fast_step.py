"""The fast step against the plain one: first-mini-batch old log-probs from its update pass, shared prefixes."""

import pytest
import torch
from rl_helpers import answer_scorer
from safetensors.torch import load_file
from test_trainer import tiny_cfg

from loraforge.rl.metrics import read_metrics
from loraforge.rl.policy import response_logprobs
from loraforge.rl.trainer import Trainer


def cfg(model_dir, adapter_dir, out, **over):
    # test_trainer's tiny run, with responses long enough that prefixes are shared and no dynamic sampling
    return tiny_cfg(model_dir, adapter_dir, out, **{"max_response_length": 3, "dynamic_sampling": False, **over})


def run(config, plain_old: bool, share_prefix: bool, monkeypatch):
    import loraforge.rl.update as update_mod

    with monkeypatch.context() as m:
        if plain_old:  # the straightforward way: one no-grad pass over every row before any update
            m.setattr(Trainer, "_old_logprobs", lambda self, samples, first: self._logprobs(samples, entropy=True))
        if not share_prefix:
            m.setattr(
                update_mod, "response_logprobs", lambda *a, **k: response_logprobs(*a, **{**k, "share_prefix": False})
            )
        Trainer(config, scorer=answer_scorer, echo=lambda s: None).run()
    return read_metrics(config.output_dir), load_file(f"{config.output_dir}/adapter/adapter_model.safetensors")


@pytest.mark.parametrize("over", [dict(), dict(mini_batch=4), dict(epochs=2, micro_batch=4)])
def test_first_minibatch_old_logprobs_from_its_update_pass_change_nothing(
    model_dir, adapter_dir, tmp_path, monkeypatch, over
):
    fast = run(cfg(model_dir, adapter_dir, tmp_path / "fast", **over), False, True, monkeypatch)
    plain = run(cfg(model_dir, adapter_dir, tmp_path / "plain", **over), True, True, monkeypatch)
    for a, b in zip(fast[0], plain[0]):
        for key in ("reward", "ppo_kl", "clipfrac", "kl", "grad_norm", "entropy"):
            assert a[key] == b[key], (a["step"], key)
    assert all(torch.equal(fast[1][k], plain[1][k]) for k in fast[1])
    if over.get("mini_batch") == 4:  # one update per step: on-policy, the ratio is exactly 1
        assert all(m["ppo_kl"] == 0.0 and m["clipfrac"] == 0.0 for m in fast[0])


def test_shared_prefix_step_matches_the_plain_step(model_dir, adapter_dir, tmp_path, monkeypatch):
    # float rounding apart (different matrix shapes), the same training: same samples, metrics to 1e-4
    fast = run(cfg(model_dir, adapter_dir, tmp_path / "fast"), False, True, monkeypatch)
    plain = run(cfg(model_dir, adapter_dir, tmp_path / "plain"), True, False, monkeypatch)
    for a, b in zip(fast[0], plain[0]):
        assert a["reward"] == b["reward"] and a["response_len"] == b["response_len"]
        for key in ("ppo_kl", "kl", "grad_norm", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-6), (a["step"], key)
    for k in fast[1]:
        assert torch.allclose(fast[1][k], plain[1][k], rtol=1e-3, atol=1e-5), k
