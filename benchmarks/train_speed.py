"""Train-step speed: `loraforge train` (loraforge.rl.trainer, in process) against TRL's GRPOTrainer on the same run.

    python benchmarks/train_speed.py                      # both settings, 3 timed steps, 2 alternations
    python benchmarks/train_speed.py --quick              # setting 1x8x32 only, 2 timed steps, 1 alternation
    python benchmarks/train_speed.py --setting 8x8x128 --steps 2 --repeats 2 --threads 1 --json out.json

Needs TRL (benchmark only): pip install -e '.[bench]'.

Both sides get the same base model and adapter (a PEFT adapter dir, loaded with
PeftModel.from_pretrained(..., is_trainable=True) in float32), the same prompts (the synthetic
arithmetic task's first P questions in the DAPO-Math instruction and the model's chat template, so
every step uses exactly those P prompts), the same sampling (G completions per prompt, at most T new
tokens, temperature 1.0, top-p 1.0, no top-k, stop at EOS), the same reward (loraforge's DAPO scorer)
and the same number of steps. Every run is a fresh process; loraforge and TRL alternate (A B A B ...).
The first step of each run is a warm-up and is not counted.

Loss semantics, matched: one optimizer step per rollout batch, on-policy.
  TRL: loss_type="dapo", beta=0, epsilon 0.2 / epsilon_high 0.28, num_iterations=1,
       steps_per_generation = gradient_accumulation_steps, so its old log-probs are the current ones
       (ratio 1) and the loss is sum(mask * -A * ratio) / (completion tokens of the whole batch).
  loraforge: --mini-batch = --prompt-batch, --epochs 1, --kl-beta 0, no dynamic sampling, no overlong
       shaping: one update whose loss is the token-mean of the clip-higher/dual-clip loss over the
       whole batch; the ratio is 1 there too, so clip and dual clip never act and the gradient is
       the same sum(A * grad logp) / tokens.
  Both: group advantage (r - mean) / (std + eps), unbiased std (TRL's eps 1e-4, loraforge's 1e-6);
       AdamW lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.1, grad clip 1.0, constant lr;
       micro-batches of 8 rows (TRL: per_device_train_batch_size 8 with gradient accumulation);
       float32 (TRL: bf16=False) and no gradient checkpointing (TRL defaults to both bf16 autocast and
       gradient checkpointing; both are turned off here so the two compute the same numbers).
  loraforge also computes what TRL does not: KL(pi_new || pi_old) after the update (one more
  forward pass per step, the paper's stability diagnostic); it is inside the timed step.

Figures per run: s/step (median over the timed steps; also the process's CPU time per step, steadier
than wall time on a shared machine), completion tokens/s (generated tokens, EOS
included, over the timed steps' wall time), the time spent in the sampler (loraforge.sampling.generation.generate
/ TRL's model.generate) vs the rest of the step (log-probs, backward, optimizer, reward), and the
process's peak RSS. The summary gives medians over the alternations and the ratio loraforge / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# what examples/quickstart.sh writes (`python -m loraforge.models.smollm2 models/SmolLM2-135M-Instruct` alone)
DEFAULT_MODEL = str(REPO / "models" / "SmolLM2-135M-Instruct")
SETTINGS = {"1x8x32": (1, 8, 32), "8x8x128": (8, 8, 128)}  # prompts x completions x max new tokens
MICRO = 8  # rows per forward/backward on both sides


def prompts_and_answers(tokenizer, n: int):
    """The synthetic task's first n questions, formatted as `loraforge train` formats them."""
    from loraforge.rl.data import DAPO_TEMPLATE, format_prompt, load_examples

    examples = load_examples(f"synthetic:n={n},max=20,ops=+")
    texts = [format_prompt(e, tokenizer, "dapo", True) for e in examples]
    user = [DAPO_TEMPLATE.replace("{question}", e.prompt) for e in examples]  # TRL applies the chat template itself
    return examples, texts, user


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ------------------------------------------------------------------------------------------------
# one run, in a child process
def run_loraforge(a) -> dict:
    import loraforge.rl.trainer as trainer_mod
    from loraforge.rl.config import TrainConfig

    P, G, T = SETTINGS[a.setting]
    out = Path(tempfile.mkdtemp(prefix="fastroll-bench-lf-"))
    cfg = TrainConfig(
        model=a.model,
        adapter=a.adapter,
        output_dir=str(out / "run"),
        data=f"synthetic:n={P},max=20,ops=+",
        reward="dapo",
        prompt_template="dapo",
        chat_template=True,
        max_response_length=T,
        overlong_buffer=0,
        group_size=G,
        prompt_batch=P,
        mini_batch=P,
        micro_batch=MICRO,
        epochs=1,
        rollout_batch_size=P * G,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        kl_beta=0.0,
        dynamic_sampling=False,
        lr=1e-5,
        weight_decay=0.1,
        grad_clip=1.0,
        lr_schedule="constant",
        steps=a.warmup + a.steps,
        seed=a.seed,
        dtype="float32",
        device="cpu",
        save_every=0,
        tensorboard=False,
    )
    gen_times: list[float] = []

    def timed(fn):
        def timed_generate(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            gen_times.append(time.perf_counter() - t)
            return out

        return timed_generate

    tr = trainer_mod.Trainer(cfg, echo=lambda s: None)
    if not hasattr(trainer_mod, "generate"):
        tr.setup()
        tr.rollout.generate = timed(
            tr.rollout.generate
        )  # the rollout backend (loraforge.sampling.generation by default)
    else:  # builds before the rollout backends: the trainer called loraforge.sampling.generation.generate itself
        trainer_mod.generate = timed(trainer_mod.generate)
        tr.setup()
    steps = []
    for s in range(1, a.warmup + a.steps + 1):
        gen_times.clear()
        t, c = time.perf_counter(), time.process_time()
        m = tr.step(s)
        dt = time.perf_counter() - t
        steps.append(
            {
                "time": dt,
                "cpu": time.process_time() - c,
                "gen": sum(gen_times),
                "tokens": round(m["response_len"] * P * G),
                "reward": m["reward"],
            }
        )
    return {"steps": steps}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from loraforge.grading.dapo import dapo_score

    P, G, T = SETTINGS[a.setting]
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    examples, texts, user = prompts_and_answers(tok, P)
    # the same prompt tokens as loraforge's: TRL applies the chat template to the messages itself
    ours = tok(texts[0], add_special_tokens=False)["input_ids"]
    theirs = tok.apply_chat_template(
        [{"role": "user", "content": user[0]}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    if list(ours) != list(theirs):
        print(f"warning: prompt tokens differ ({len(ours)} vs {len(theirs)})", file=sys.stderr)
    ds = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": u}], "answer": e.ground_truth} for u, e in zip(user, examples)]
    )
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter, is_trainable=True)

    tokens: list[int] = []
    gen_times: list[float] = []
    orig_generate = model.generate

    def timed_generate(*args, **kw):
        t = time.perf_counter()
        out = orig_generate(*args, **kw)
        gen_times.append(time.perf_counter() - t)
        return out

    model.generate = timed_generate

    def reward(prompts, completions, completion_ids, answer, **kw):
        tokens.append(sum(len(c) for c in completion_ids))
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [dapo_score(t, gt) for t, gt in zip(texts, answer)]

    steps = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            now, cpu = time.perf_counter(), time.process_time()
            steps.append({"time": now - self.t, "cpu": cpu - self.c, "gen": sum(gen_times), "tokens": sum(tokens)})
            gen_times.clear()
            tokens.clear()
            self.t, self.c = now, cpu

    out = tempfile.mkdtemp(prefix="fastroll-bench-trl-")
    rows = P * G
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=min(MICRO, rows),
        gradient_accumulation_steps=max(1, rows // MICRO),
        num_generations=G,
        max_completion_length=T,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        scale_rewards="group",
        learning_rate=1e-5,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=a.warmup + a.steps,
        seed=a.seed,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
    )
    trainer.train()
    return {"steps": steps}


def child(a) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    result = run_loraforge(a) if a.child == "loraforge" else run_trl(a)
    timed = result["steps"][a.warmup :]
    total = sum(s["time"] for s in timed)
    result.update(
        {
            "impl": a.child,
            "setting": a.setting,
            "threads": torch.get_num_threads(),
            "s_per_step": statistics.median(s["time"] for s in timed),
            "cpu_s_per_step": statistics.median(s["cpu"] for s in timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / total,
            "gen_s_per_step": statistics.median(s["gen"] for s in timed),
            "rest_s_per_step": statistics.median(s["time"] - s["gen"] for s in timed),
            "tokens_per_step": statistics.mean(s["tokens"] for s in timed),
            "peak_rss_mb": peak_rss_mb(),
        }
    )
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# the parent: alternate runs, summarise
def one_run(a, impl: str, setting: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--setting",
        setting,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--model",
        a.model,
        "--adapter",
        a.adapter,
        "--seed",
        str(a.seed),
        "--threads",
        str(a.threads),
    ]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        TOKENIZERS_PARALLELISM="false",
    )
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{impl} {setting} failed (exit {proc.returncode})")
    r = json.loads(lines[-1][len("RESULT ") :])
    r["load_before"] = load
    r["wall_s"] = time.perf_counter() - t
    return r


def summarise(runs: list[dict], setting: str) -> dict:
    out = {"setting": setting}
    for impl in ("loraforge", "trl"):
        rs = [r for r in runs if r["impl"] == impl and r["setting"] == setting]
        if not rs:
            continue
        out[impl] = {
            k: statistics.median(r[k] for r in rs)
            for k in (
                "s_per_step",
                "cpu_s_per_step",
                "tokens_per_s",
                "gen_s_per_step",
                "rest_s_per_step",
                "tokens_per_step",
                "peak_rss_mb",
            )
        }
        out[impl]["runs"] = len(rs)
    if "loraforge" in out and "trl" in out:
        out["ratio_tokens_per_s"] = out["loraforge"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
        out["ratio_s_per_step"] = out["trl"]["s_per_step"] / out["loraforge"]["s_per_step"]
        lf = [r for r in runs if r["impl"] == "loraforge" and r["setting"] == setting]
        trl = [r for r in runs if r["impl"] == "trl" and r["setting"] == setting]
        out["pair_ratios"] = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(lf, trl)]
    return out


def table(summaries: list[dict]) -> str:
    rows = [
        "| setting (P x G x T) | impl | s/step | CPU s/step | completion tok/s | gen s/step | rest s/step | "
        "tokens/step | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for impl in ("loraforge", "trl"):
            if impl in s:
                v = s[impl]
                rows.append(
                    f"| {s['setting']} | {impl} | {v['s_per_step']:.2f} | {v['cpu_s_per_step']:.2f} | "
                    f"{v['tokens_per_s']:.1f} | "
                    f"{v['gen_s_per_step']:.2f} | {v['rest_s_per_step']:.2f} | {v['tokens_per_step']:.0f} | "
                    f"{v['peak_rss_mb']:.0f} |"
                )
    lines = ["\n".join(rows), ""]
    for s in summaries:
        if "ratio_tokens_per_s" in s:
            pairs = ", ".join(f"{x:.2f}" for x in s["pair_ratios"])
            lines.append(
                f"{s['setting']}: loraforge / TRL completion tokens/s = {s['ratio_tokens_per_s']:.2f}x "
                f"(per alternation: {pairs}); s/step ratio {s['ratio_s_per_step']:.2f}x"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument(
        "--adapter", help="a PEFT adapter dir for --model (e.g. `loraforge init MODEL --method rlpo -r 16`)"
    )
    ap.add_argument("--setting", choices=[*SETTINGS, "both"], default="both")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="alternations: loraforge, TRL, loraforge, TRL, ...")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both (0: torch's default)")
    ap.add_argument("--only", choices=["loraforge", "trl"], help="run one side only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1x8x32 only, 2 timed steps, 1 alternation")
    ap.add_argument("--json", help="write every run and the summary here")
    ap.add_argument("--child", choices=["loraforge", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.adapter:
        ap.error("--adapter is required")
    if a.child:
        child(a)
        return
    out_json = report.ResultFile(a.json) if a.json else None  # a taken or unwritable path: refused before the runs
    if a.quick:
        a.setting, a.steps, a.repeats = "1x8x32", 2, 1
    settings = list(SETTINGS) if a.setting == "both" else [a.setting]
    impls = [a.only] if a.only else ["loraforge", "trl"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}; "
        f"load average at start {os.getloadavg()}",
        flush=True,
    )
    runs = []
    for setting in settings:
        for rep in range(a.repeats):
            for impl in impls:
                r = one_run(a, impl, setting)
                runs.append(r)
                print(
                    f"  {setting} {impl} #{rep + 1}: {r['s_per_step']:.2f} s/step (CPU {r['cpu_s_per_step']:.2f} s), "
                    f"{r['tokens_per_s']:.1f} tok/s, "
                    f"gen {r['gen_s_per_step']:.2f} s, rest {r['rest_s_per_step']:.2f} s, "
                    f"{r['tokens_per_step']:.0f} tokens/step, peak RSS {r['peak_rss_mb']:.0f} MB, "
                    f"{r['threads']} threads, load {r['load_before']:.2f}",
                    flush=True,
                )
    summaries = [summarise(runs, s) for s in settings]
    print(table(summaries))
    print(f"load average at end {os.getloadavg()}")
    if out_json:
        out_json.write({"runs": runs, "summary": summaries})


if __name__ == "__main__":
    main()
