"""The bundled RLVR training flow (DAPO, GRPO) for LoRA adapters.

data -> rollout (loraforge.sampling.generation) -> reward -> advantage (+ dynamic sampling) -> loss ->
optimizer step -> metrics / checkpoints. Each arrow is a small module with a pure core:
data.py, rewards.py, advantage.py, loss.py, trainer.py (the loop; policy.py, rollout_side.py, update.py,
inputs.py and failsafe.py hold its parts), checkpoint.py, metrics.py; config.py holds the run's settings. Scaling out
(docs/scale.md): rollout.py (rollout backends and the sampler log-prob check), vllm_rollout.py,
distributed.py (several processes), verl_launch.py (`--backend verl`).
Modules are imported lazily by their users (torch/transformers are heavy).
"""
