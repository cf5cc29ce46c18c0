"""`--rollout vllm`: sample with vLLM, handing it the current adapter every step (adapter only, no merge).

A thin layer: everything that can be checked without a GPU lives in pure functions (rollout.py:
`generation_from_tokens`, `logprob_gap`, `sampler_verdict`; core/clients.py: `vllm_max_lora_rank`;
adapters/directory.py: `resolve_base`; verl_launch.py: `read_lora_settings`), tested on CPU. What only runs on a
CUDA machine is here:

  - one vLLM engine per process (`LLM(..., enable_lora=True)`), on the process's GPU; under
    accelerate/torchrun vLLM's "external_launcher" executor (the colocated layout TRL uses), each engine
    with tensor parallel size 1;
  - `sync(model, version)`: PeftModel.save_pretrained of the adapter alone (MBs) into
    RUN_DIR/.rollout_adapter/rankR/vNNNNNN and a LoRARequest with a NEW integer id, so vLLM loads the
    new weights instead of serving its cached copy of an older id; the base model is never merged or
    reloaded;
  - `generate`: token-id prompts (tokenised and left-truncated as the trainer does), G samples each,
    vLLM's log-prob of every sampled token returned for the trainer's comparison (logprobs=0: the
    sampled token only; vLLM V1 reports raw-model log-probs, before temperature and top-k/top-p).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loraforge.adapters.directory import resolve_base
from loraforge.core.clients import vllm_max_lora_rank
from loraforge.core.errors import LoraforgeError
from loraforge.rl.rollout import SampledGeneration, generation_from_tokens
from loraforge.rl.verl_launch import read_lora_settings
from loraforge.sampling.generation import SamplingParams, pad_id, prompt_ids

VLLM_MISSING = (
    "--rollout vllm needs vLLM, which is not installed: pip install -e '.[vllm]' "
    "(on a Linux machine with a CUDA GPU), or use --rollout transformers"
)


def require_vllm():
    """Import vllm or raise the install hint."""
    try:
        import vllm  # noqa: F401
        from vllm.lora.request import LoRARequest  # noqa: F401
    except ImportError as e:
        raise LoraforgeError(VLLM_MISSING) from e
    return vllm


class VLLMRollout:
    separate = True

    def __init__(self, trainer):
        vllm = require_vllm()
        import torch

        cfg = trainer.cfg
        if not torch.cuda.is_available():
            raise LoraforgeError("--rollout vllm needs a CUDA GPU; on this machine use --rollout transformers")
        if cfg.gguf_file:
            raise LoraforgeError("--rollout vllm loads the base from a model directory, not --gguf-file")
        base = resolve_base(cfg.adapter, cfg.model)
        lora = read_lora_settings(cfg.adapter)
        if lora.use_dora:
            raise LoraforgeError("--rollout vllm: vLLM does not serve DoRA adapters; use --rollout transformers")
        self.tokenizer = trainer.tokenizer
        self.pad = pad_id(self.tokenizer)
        self.rank = trainer.dist.rank
        self.dir = Path(cfg.output_dir) / ".rollout_adapter" / f"rank{self.rank}"
        kwargs = dict(
            model=base.path,
            tokenizer=cfg.tokenizer or base.path,
            trust_remote_code=cfg.trust_remote_code,
            dtype=cfg.dtype,
            enable_lora=True,
            max_loras=1,
            max_lora_rank=vllm_max_lora_rank(lora.max_rank),
            gpu_memory_utilization=cfg.vllm_gpu_memory,
            max_model_len=cfg.max_prompt_length + cfg.max_response_length,
            seed=cfg.seed + self.rank,
            tensor_parallel_size=1,
            enable_prefix_caching=True,
        )
        if trainer.dist.enabled:
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kwargs)
        self.request = None
        self._next_id = 1

    def sync(self, model, version: int) -> None:
        from vllm.lora.request import LoRARequest

        path = self.dir / f"v{version:06d}"
        if path.exists():
            shutil.rmtree(path)
        model.save_pretrained(str(path))  # adapter weights and config only
        self.request = LoRARequest(f"loraforge-r{self.rank}-v{version}", self._next_id, str(path))
        self._next_id += 1  # a new id: vLLM caches adapters by id
        for old in self.dir.glob("v*"):
            if old != path:
                shutil.rmtree(old, ignore_errors=True)

    def generate(self, prompts: list[str], params: SamplingParams) -> SampledGeneration:
        from vllm import SamplingParams as VSampling

        params.check()
        ids = []
        for p in prompts:  # cut by characters, then tokenised and left-truncated, as the transformers sampler does
            ids.append(prompt_ids(self.tokenizer, p, params.max_prompt_tokens))
        sampling = VSampling(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k and params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            logprobs=0,
        )
        outs = self.llm.generate(
            [{"prompt_token_ids": t} for t in ids], sampling, lora_request=self.request, use_tqdm=False
        )
        rows, logps = [], []
        for pi, out in enumerate(outs):
            for c in out.outputs:
                toks = list(c.token_ids)
                rows.append((pi, toks, c.finish_reason == "length"))
                logps.append([c.logprobs[j][t].logprob for j, t in enumerate(toks)] if c.logprobs else None)
        return generation_from_tokens(
            ids, rows, self.tokenizer, self.pad, None if any(lp is None for lp in logps) else logps
        )
