"""`loraforge train` and `loraforge plot` through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from loraforge.cli import main
from loraforge.rl.metrics import read_metrics


def _args(model_dir, adapter_dir, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--adapter",
        str(adapter_dir),
        "-o",
        str(out),
        "--data",
        "synthetic:n=40,max=2,style=bare",
        "--reward",
        "rl_helpers:answer_scorer",
        "--max-response-length",
        "1",
        "--overlong-buffer",
        "0",
        "--group-size",
        "4",
        "--prompt-batch",
        "4",
        "--mini-batch",
        "2",
        "--lr",
        "1e-2",
        "--max-gen-batches",
        "0",
        "--no-tensorboard",
        *extra,
    ]


def test_help_lists_the_commands_and_every_flag():
    r = CliRunner().invoke(main, ["--help"])
    assert "train" in r.output and "plot" in r.output
    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0
    for flag in (
        "--algo",
        "--group-size",
        "--prompt-batch",
        "--mini-batch",
        "--epochs",
        "--lr-schedule",
        "--warmup-steps",
        "--weight-decay",
        "--grad-clip",
        "--eps-low",
        "--eps-high",
        "--clip-c",
        "--loss-agg",
        "--kl-beta",
        "--dynamic-sampling",
        "--max-gen-batches",
        "--overlong-buffer",
        "--overlong-penalty",
        "--max-prompt-length",
        "--max-response-length",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--steps",
        "--save-every",
        "--eval-every",
        "--resume",
        "--config",
    ):
        assert flag in r.output, flag


def test_every_train_setting_has_help():
    import dataclasses

    from loraforge.rl.config import TrainConfig

    missing = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help")]
    assert not missing, f"TrainConfig fields without metadata help: {missing}"


def test_train_help_shows_each_settings_metadata_help():
    import dataclasses

    from loraforge.rl.config import TrainConfig

    r = CliRunner().invoke(main, ["train", "--help"])
    assert r.exit_code == 0
    shown = " ".join(r.output.split())  # click wraps the help column
    for f in dataclasses.fields(TrainConfig):
        assert " ".join(f.metadata["help"].split()) in shown, f.name
    # spot check one by its text, so the test does not pass if both sides went empty
    assert "responses per prompt G [paper 8] [default: 8]" in shown


def test_train_resume_and_plot(model_dir, adapter_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(main, _args(model_dir, adapter_dir, out, "--steps", "2", "--save-every", "1"))
    assert r.exit_code == 0, r.output
    assert "step 1/2 | reward " in r.output and "finished at step 2" in r.output
    r = runner.invoke(main, ["train", "--resume", str(out), "--steps", "3"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "step 3/3" in r.output
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    # other flags with --resume are refused, naming them
    r = runner.invoke(main, ["train", "--resume", str(out), "--lr", "1"])
    assert r.exit_code == 1 and "--lr" in r.output
    assert "only --steps, --max-gen-batches and --dynamic-sampling/--no-dynamic-sampling may change" in r.output
    pytest.importorskip("matplotlib")
    r = runner.invoke(main, ["plot", str(out), str(out), "--label", "a", "--label", "b", "-o", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_yaml_config_and_flag_precedence(model_dir, adapter_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("steps: 1\nlr-schedule: cosine\nseed: 5\ngroup_size: 2\n")
    r = CliRunner().invoke(main, _args(model_dir, adapter_dir, tmp_path / "run", "--config", str(cfg), "--seed", "6"))
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # YAML over defaults, flags over YAML (group_size 4 from the flags wins over the file's 2)
    assert saved["steps"] == 1 and saved["lr_schedule"] == "cosine" and saved["seed"] == 6 and saved["group_size"] == 4


def test_bad_values_name_the_flag(model_dir, adapter_dir, tmp_path):
    r = CliRunner().invoke(main, _args(model_dir, adapter_dir, tmp_path / "run", "--mini-batch", "3"))
    assert r.exit_code == 1 and "--mini-batch must be between 1 and --prompt-batch (4) and divide it" in r.output
    r = CliRunner().invoke(main, _args(model_dir, adapter_dir, tmp_path / "run", "--clip-c", "0.5"))
    assert r.exit_code == 1 and "--clip-c must be > 1" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    r = CliRunner().invoke(main, _args(model_dir, adapter_dir, tmp_path / "run", "--config", str(bad)))
    assert r.exit_code == 1 and "unknown key(s) ['learning_rate']" in r.output


def test_missing_field_in_data_file(model_dir, adapter_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "solution": "4"}\n')
    args = _args(model_dir, adapter_dir, tmp_path / "run")
    args[args.index("--data") + 1] = str(data)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    assert "row 2 has no field answer" in r.output and "solution" in r.output


def test_plot_without_runs_or_matplotlib(tmp_path, hide_package):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "no metrics.jsonl" in r.output
    hide_package("matplotlib")
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "pip install -e '.[plots]'" in r.output


def test_docs_list_every_flag():
    import dataclasses
    from pathlib import Path

    from loraforge.cli.train_options import flag_of
    from loraforge.rl.config import TrainConfig

    text = (Path(__file__).parents[2] / "docs" / "train.md").read_text()
    missing = [flag_of(f.name) for f in dataclasses.fields(TrainConfig) if f"`{flag_of(f.name)}" not in text]
    assert not missing, f"docs/train.md does not describe {missing}"


def test_plot_ticks_whole_steps_and_plain_log_labels(tmp_path, monkeypatch):
    """Two steps used to get x ticks 1.25, 1.5, ...; a grad norm between 1.2 and 1.4 (under a decade on a log
    axis) got minor labels like 1.28×10⁰."""
    figure = pytest.importorskip("matplotlib.figure")
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 1, "reward": -1.0, "grad_norm": 1.2, "kl": 2e-4},
        {"step": 2, "reward": 0.5, "grad_norm": 1.4, "kl": 5e-3},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = []
    real_savefig = figure.Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as written, to read its tick labels
        fig.canvas.draw()
        figures.append(
            [(ax.get_xticklabels(), ax.get_yticklabels() + ax.get_yticklabels(minor=True)) for ax in fig.axes]
        )
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(figure.Figure, "savefig", keep)
    r = CliRunner().invoke(main, ["plot", str(run), "-o", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    (panels,) = figures
    for xs, _ in panels:
        assert all(float(t.get_text().replace("−", "-")).is_integer() for t in xs if t.get_text())
    grad_labels = [t.get_text() for t in panels[1][1] if t.get_text()]
    assert "1.3" in grad_labels and not any("10^" in t or "times" in t for t in grad_labels), grad_labels
    kl_labels = [t.get_text() for t in panels[2][1] if t.get_text()]
    assert "0.001" in kl_labels and not any("mathdefault" in t for t in kl_labels), kl_labels


def test_train_base_model_relative_path_that_does_not_exist(adapter_dir, tmp_path, monkeypatch):
    """`--model models/nope` beside a models/ directory: no such directory, not a network error from the Hub."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    r = CliRunner().invoke(main, _args("models/nope", adapter_dir, tmp_path / "run"))
    assert r.exit_code == 1 and "--model models/nope: No such directory: models/nope" in r.output, r.output


def test_plot_draws_labels_and_run_names_as_text_not_mathtext(tmp_path):
    """`--label '$\\foo$'` (or a run directory called so) was parsed as mathtext by matplotlib, and one that does
    not parse raised ParseFatalException from inside savefig: a traceback. Labels are names: drawn as written."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "lr$\\eta$"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5, "grad_norm": 1.0, "kl": 0.01}\n')
    out = tmp_path / "p.png"
    r = CliRunner().invoke(main, ["plot", str(run), str(run), "--label", "$\\foo$", "--label", "$x", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 10_000
    r = CliRunner().invoke(main, ["plot", str(run), "-o", str(tmp_path / "q.png")])  # the directory's own name
    assert r.exit_code == 0, r.output


def test_a_number_past_64_bits_on_the_command_line_is_one_line(model_dir, adapter_dir, tmp_path):
    """`--seed 18446744073709551616`, `--steps 10**40`: torch cannot hold them (ValueError) and float() of a longer
    one overflows: refused by the typed settings before anything loads, naming the setting."""
    for flag, value in (("--seed", str(2**64)), ("--steps", "1" + "0" * 40)):
        r = CliRunner().invoke(main, _args(model_dir, adapter_dir, tmp_path / "run", flag, value))
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert "expected a whole number (64-bit)" in r.output and flag[2:] in r.output, r.output
        assert not (tmp_path / "run").exists()
