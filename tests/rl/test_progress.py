"""What `loraforge train` shows while a step runs (loraforge/rl/progress.py): the reporter on a fake clock, the
run's banner, and a real run on the tiny model whose progress lines must count what the run did."""

import functools
import io
import re

from rl_helpers import answer_scorer
from test_trainer import tiny_cfg

from loraforge.rl import trainer as trainer_module
from loraforge.rl.metrics import read_metrics
from loraforge.rl.progress import StepProgress, banner, duration
from loraforge.rl.trainer import resume, train


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_duration_reads_as_a_person_waits():
    assert [duration(s) for s in (0, 44.6, 61, 599, 601, 3600 + 5 * 60 + 29)] == [
        "0 s",
        "45 s",
        "1 min 01 s",
        "9 min 59 s",
        "10 min",
        "1 h 05 min",
    ]


def test_banner_of_a_resumed_run_says_how_many_steps_remain():
    assert banner("dapo", 4, 0, "8 tensors") == "training dapo for 4 steps (8 tensors)"
    assert banner("dapo", 4, 3, "8 tensors") == "training dapo: 1 of 4 steps remains (resumed after step 3; 8 tensors)"
    assert (
        banner("grpo", 10, 4, "x", world=2)
        == "training grpo: 6 of 10 steps remain on 2 processes (resumed after step 4; x)"
    )


def test_lines_come_every_interval_with_rows_tokens_updates_and_eta():
    clock, out = Clock(), io.StringIO()
    p = StepProgress(10, 0, stream=out, interval=10, clock=clock)
    p.step_started(1, 4)
    clock.t = 5
    p.rollout(8, 64, 100)  # before the interval: nothing
    assert out.getvalue() == ""
    clock.t = 11
    p.rollout(16, 64, 200)
    assert out.getvalue() == "step 1/10: rollout 16/64 rows, 200 tokens | updates 0/4 | ETA after the first step\n"
    clock.t = 20
    p.updated(4)  # 9 s after the last line: nothing
    p.step_finished()  # step 1 took 20 s
    p.step_started(2, 4)
    clock.t = 31
    p.rollout(64, 64, 1234)
    # ETA: 20 s per step x 9 steps left (2..10) - 11 s of step 2 already spent = 169 s
    assert (
        out.getvalue().splitlines()[-1] == "step 2/10: rollout 64/64 rows, 1,234 tokens | updates 0/4 | ETA 2 min 49 s"
    )


def test_on_a_terminal_the_state_goes_into_the_bar():
    class Bar:
        disable = False
        postfix = None

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

    clock, bar, out = Clock(), Bar(), io.StringIO()
    p = StepProgress(3, 1, bar, stream=out, interval=0, clock=clock)  # resumed after step 1
    p.step_started(2, 2)
    p.rollout(3, 8, 17)
    assert (
        bar.postfix == "rollout 3/8 rows, 17 tokens | updates 0/2 | ETA after the first step" and out.getvalue() == ""
    )
    p.updated(1)
    assert bar.postfix == "rollout 3/8 rows, 17 tokens | updates 1/2 | ETA after the first step"
    clock.t = 6
    p.step_finished()
    assert bar.postfix == "ETA 6 s"  # 6 s per step x steps 2..3, less the 6 s step 2 took: step 3 is left


def test_a_run_reports_every_row_token_and_update_it_did(model_dir, adapter_dir, tmp_path, monkeypatch, capsys):
    """Lines after every hook call (interval 0): each step's last rollout line counts all prompt_batch x group_size
    rows and exactly the response tokens the metrics record, and its updates reach prompt_batch / mini_batch."""
    monkeypatch.setattr(trainer_module, "StepProgress", functools.partial(StepProgress, interval=0))
    cfg = tiny_cfg(
        model_dir, adapter_dir, tmp_path / "run", max_response_length=3, steps=2, save_every=1, dynamic_sampling=False
    )
    lines = []
    train(cfg, scorer=answer_scorer, echo=lines.append)
    err = capsys.readouterr().err.splitlines()
    metrics = read_metrics(tmp_path / "run")
    rows = cfg.prompt_batch * cfg.group_size  # 4 x 8 = 32: one generation batch (no dynamic sampling)
    for m in metrics:
        mine = [ln for ln in err if ln.startswith(f"step {m['step']}/2: ")]
        rollout = [re.search(r"rollout (\d+)/(\d+) rows, ([\d,]+) tokens", ln) for ln in mine]
        done, total, tokens = (int(x.replace(",", "")) for x in rollout[-1].groups())
        assert m["gen_batches"] == 1 and done == total == rows
        assert tokens == round(m["response_len"] * rows)  # mean response length x rows = tokens sampled
        assert mine[-1].split(" | ")[-2] == "updates 2/2"  # prompt_batch 4 / mini_batch 2
    assert "ETA after the first step" in [ln for ln in err if ln.startswith("step 1/2")][-1]
    assert re.search(r"ETA \d+ s$", [ln for ln in err if ln.startswith("step 2/2")][0])
    # a resumed run's banner counts the steps left
    lines.clear()
    resume(tmp_path / "run", steps=3, scorer=answer_scorer, echo=lines.append)
    started = [ln for ln in lines if ln.startswith("training ")]
    assert started[0].startswith("training dapo: 1 of 3 steps remains (resumed after step 2; "), lines
