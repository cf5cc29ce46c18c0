"""No command writes where it reads: the path guard, tried on every output of every command.

The generative test walks the click command tree. For every command and every output it declares
(cli/_paths.py), it builds an ordinary invocation from fixtures (a tiny model, a pissa and an rlpo init,
an adapter trained from the pissa init with its lineage record, a run directory, data, benchmark and
YAML files), then points that output at each path the invocation reads (the flags' own paths and the
paths they name: the init's residual base, the model a manifest or adapter_config names, the init a
lineage record names, a run's model/adapter/data, a --config YAML's keys): equal to it, inside it, at its
parent, through a symlink to it, and below a symlink loop. Every case must be refused in one line with
exit 1, with --overwrite given where the command has it, and leave every file of the fixtures
byte-for-byte as it was. A new command, flag or kind of path is tried without a new test; a command
without a declaration does not run at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from loraforge import InitConfig, init_adapter
from loraforge.cli import COMMANDS, main
from loraforge.cli._paths import declared_paths
from loraforge.core.paths import check_paths

# the fixture each input kind gets in the ordinary invocation (per parameter name where one kind has several)
FIXTURE_FOR = {"model": "M", "adapter": "T", "run": "RUN", "data": "D", "benchmarks": "B", "file": "Y"}
FIXTURE_FOR_PARAM = {"init": "P"}  # convert/inspect --init: the init T was trained from


def tree_digest(root: Path) -> str:
    """sha256 over every path under ROOT (name, kind, content), symlinks as their target: any change shows."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix().encode()
        if p.is_symlink():
            h.update(b"L" + rel + b"\0" + os.readlink(p).encode())
        elif p.is_file():
            h.update(b"F" + rel + b"\0" + p.read_bytes())
        else:
            h.update(b"D" + rel)
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory):
    """Everything a command could read, in one tree whose digest the cases compare."""
    root = tmp_path_factory.mktemp("world")
    fx = {"root": root, "M": root / "M"}
    shutil.copytree(tiny_models["llama"], fx["M"])
    fx["P"] = init_adapter(str(fx["M"]), root / "P", InitConfig(method="pissa", r=2)).out
    fx["R"] = init_adapter(str(fx["M"]), root / "R", InitConfig(method="rlpo", r=2)).out
    # an adapter trained from P, as `loraforge train` leaves it: PEFT's files naming P/base, and the lineage record
    fx["T"] = root / "T"
    fx["T"].mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(fx["P"] / name, fx["T"] / name)
    (fx["T"] / "loraforge-lineage.json").write_text(
        json.dumps({"format": "loraforge-lineage/1", "init": {"path": str(fx["P"]), "method": "pissa"}})
    )
    fx["D"] = root / "data.jsonl"
    fx["D"].write_text('{"prompt": "t1 t2", "answer": "3"}\n')
    fx["B"] = root / "bench.jsonl"
    fx["B"].write_text('{"problem": "t1 t2", "answer": "3"}\n')
    fx["Y"] = root / "run.yaml"
    fx["Y"].write_text(f"model: {fx['M']}\nadapter: {fx['R']}\ndata: {fx['D']}\n")
    fx["RUN"] = root / "RUN"
    fx["RUN"].mkdir()
    (fx["RUN"] / "config.json").write_text(
        json.dumps({"model": str(fx["M"]), "adapter": str(fx["R"]), "data": str(fx["D"]), "output_dir": "RUN"})
    )
    (fx["RUN"] / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5, "grad_norm": 1.0, "kl": 0.01}\n')
    return fx


def commands() -> dict[str, click.Command]:
    ctx = click.Context(main)
    return {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}


def _filler(param: click.Parameter) -> str:
    """A value click accepts for a required parameter that is not a path (the guard runs before it is used)."""
    t = param.type
    if isinstance(t, click.Choice):
        return str(t.choices[0])
    if isinstance(t, click.IntRange):
        return str(max(t.min or 1, 1))
    if t in (click.INT, click.FLOAT):
        return "1"
    return "owner/name"


def ordinary_args(command: click.Command, fx: dict, outs: Path) -> dict[str, str]:
    """{parameter name: value}: every declared input from the fixtures, every output a fresh path in OUTS,
    every other required parameter a value click accepts."""
    declared = command.loraforge_paths
    values = {}
    for name, kind in declared.reads.items():
        values[name] = str(fx[FIXTURE_FOR_PARAM.get(name, FIXTURE_FOR[kind])])
    for name, kind in declared.writes.items():
        values[name] = str(outs / f"{command.name}-{name}" / ("out.json" if kind in ("file", "report") else "out"))
    for p in command.params:
        if p.required and p.name not in values:
            values[p.name] = _filler(p)
    return values


def argv(command: click.Command, values: dict[str, str]) -> list[str]:
    args, positional = [], []
    for p in command.params:
        if p.name not in values:
            continue
        if isinstance(p, click.Argument):
            positional.append(values[p.name])
        else:
            args += [p.opts[0], values[p.name]]
    if any(p.name == "overwrite" for p in command.params):
        args.append("--overwrite")  # it must never override the guard
    return [command.name, *positional, *args]


def params_of(command: click.Command, values: dict[str, str]) -> dict:
    return command.make_context(command.name, argv(command, values)[1:]).params


def refused_in_one_line(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (args, r.output)
    return lines[0]


def test_every_command_declares_its_paths():
    for name, command in commands().items():
        declared = command.loraforge_paths
        # every parameter that takes a path is declared: a new path flag cannot slip past the guard
        for p in command.params:
            if isinstance(p.type, click.Path):
                assert p.name in {**declared.reads, **declared.writes}, f"{name} {p.name} is a path, undeclared"
    assert set(commands()) == set(COMMANDS)


def test_a_command_without_a_declaration_does_not_run(monkeypatch):
    import loraforge.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "bare", "loraforge.core.paths:NamedPath")  # anything without one
    r = CliRunner().invoke(main, ["bare"])
    assert isinstance(r.exception, RuntimeError) and "declares no paths" in str(r.exception)


def test_the_ordinary_invocations_pass_the_guard(world, tmp_path):
    for name, command in commands().items():
        inputs, outputs = declared_paths(command, params_of(command, ordinary_args(command, world, tmp_path)))
        check_paths(inputs, outputs)
        assert inputs, f"{name}: no input found"


def test_inputs_are_expanded_to_what_they_name(world, tmp_path):
    """The paths a command reads beyond its flags: the original model and the residual base behind a trained
    adapter (lineage, adapter_config), a run's model/adapter/data, a YAML's keys."""
    cmds = commands()

    def read(name, **override):
        command = cmds[name]
        values = {**ordinary_args(command, world, tmp_path), **{k: str(v) for k, v in override.items()}}
        return {p.path for p in declared_paths(command, params_of(command, values))[0]}

    w = {k: Path(v).resolve() for k, v in world.items()}
    assert {w["T"], w["P"], w["P"] / "base", w["M"]} <= read("convert")
    assert {w["RUN"], w["M"], w["R"], w["D"]} <= read("plot")
    assert {w["B"], w["D"]} <= read("eval", bench=f"gsm8k,{world['B']},synthetic:level=1,n=2,{world['D']}")
    train = cmds["train"]
    yaml_only = {"config_file": str(world["Y"]), "output_dir": str(tmp_path / "run")}
    params = params_of(train, {**yaml_only, "algo": "dapo"})
    assert {w["Y"], w["M"], w["R"], w["D"]} <= {p.path for p in declared_paths(train, params)[0]}


def cases(fx: dict, scratch: Path):
    """(command, output parameter, how, argv) for every output of every command against every input it reads."""
    loop = scratch / "loop"
    loop.mkdir()
    os.symlink(loop / "b", loop / "a")
    os.symlink(loop / "a", loop / "b")
    links = 0
    for name, command in commands().items():
        ordinary = ordinary_args(command, fx, scratch / "outs")
        inputs, _ = declared_paths(command, params_of(command, ordinary))
        for out in command.loraforge_paths.writes:
            yield name, out, "below a symlink loop", argv(command, {**ordinary, out: str(loop / "a" / "x")})
            for inp in {i.path: i for i in inputs}.values():
                links += 1
                link = scratch / f"link{links}"
                os.symlink(inp.path, link)
                for how, target in (
                    ("equal to", inp.path),
                    ("inside", inp.path / "sub"),
                    ("the parent of", inp.path.parent),
                    ("a symlink to", link),
                ):
                    yield name, out, f"{how} {inp.flag}", argv(command, {**ordinary, out: str(target)})
        for inp in command.loraforge_paths.reads:  # an input below a loop is one line too
            yield name, inp, "input below a symlink loop", argv(command, {**ordinary, inp: str(loop / "a" / "x")})


def test_every_output_against_every_input_is_refused_in_one_line(world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = tree_digest(world["root"])
    tried: dict[str, int] = {}
    for name, _param, how, args in cases(world, tmp_path):
        line = refused_in_one_line(args)
        if "loop" in how:
            assert "symlink loop" in line, (args, line)
        else:  # the rule itself, or a file where a directory is wanted on the way (inside a data file)
            assert "which this command reads" in line or "is a file, not a directory" in line, (args, line)
        assert tree_digest(world["root"]) == before, (args, line)
        tried[name] = tried.get(name, 0) + 1
    assert not (tmp_path / "outs").exists()  # no command got as far as creating its output's folder
    with capsys.disabled():  # README "Reliability" quotes these counts
        print(f"\npath guard cases per command: {tried} (total {sum(tried.values())})")
    assert set(tried) == set(COMMANDS)  # verify and push write nothing: their inputs below a loop are tried


@pytest.mark.parametrize(
    "case",
    [
        "train --model {M} --adapter {R} --data {D} -o {M}",
        "inspect {R} --json {R}/adapter_config.json",
        "convert {T} --init {P} -o {P}/base --overwrite",
        "convert {T} --init {P} -o {M} --overwrite",
        "eval --model {M} --adapter {T} --bench {B} -o {M}/report.json",
        "plot {RUN} -o {RUN}",
        "init {M} --method rlpo -r 2 -o {LOOP}/x",
        "convert {T} --init {P} -o {LOOP}/x",
    ],
)
def test_careless_invocations_are_refused_before_any_work(world, tmp_path, case):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # a link to itself
    args = case.format(**{k: v for k, v in world.items() if k != "root"}, LOOP=loop).split()
    before = tree_digest(world["root"])
    refused_in_one_line(args)
    assert tree_digest(world["root"]) == before


def test_eval_refuses_a_pissa_adapter_on_the_original_model(world, tmp_path):
    # evaluating W + s B0 A0 on the original weights, not the residual base, would be silently wrong
    for adapter in ("P", "T"):  # the init itself, and an adapter trained from it
        line = refused_in_one_line(
            ["eval", "--model", str(world["M"]), "--adapter", str(world[adapter]), "--bench", str(world["B"]),
             "-o", str(tmp_path / "r.json")]
        )  # fmt: skip
        assert "belongs on the residual base" in line and str(world["P"] / "base") in line
    assert not (tmp_path / "r.json").exists()
    # and an adapter made for the original model is refused on a residual base
    line = refused_in_one_line(
        ["eval", "--model", str(world["P"] / "base"), "--adapter", str(world["R"]), "--bench", str(world["B"]),
         "-o", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert "is the residual base of the init" in line


def test_plot_refuses_an_image_format_matplotlib_cannot_write(world, tmp_path):
    pytest.importorskip("matplotlib")
    line = refused_in_one_line(["plot", str(world["RUN"]), "-o", str(tmp_path / "curves.txt")])
    assert "cannot write .txt images" in line and ".png" in line
    assert not list(tmp_path.iterdir())


# --- the rule itself (core/paths.py) ---------------------------------------------------------------


def test_resolution_failures_are_one_line(tmp_path, monkeypatch):
    from loraforge.core.errors import LoraforgeError
    from loraforge.core.paths import resolve_path

    (tmp_path / "afile").write_text("x")
    with pytest.raises(LoraforgeError, match=r"afile is a file, not a directory"):
        resolve_path(tmp_path / "afile" / "sub" / "deeper", "-o")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(LoraforgeError, match=r"-o .*loop/x: .*loop is a symlink loop"):
        resolve_path(tmp_path / "loop" / "x", "-o")
    # a directory that cannot be searched (root ignores permissions, so the kernel's answer is stood in for)
    real = os.path.realpath

    def locked(path, strict=False):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(os.path, "realpath", locked)
    with pytest.raises(LoraforgeError, match=r"a directory on the way to .*locked cannot be searched"):
        resolve_path(tmp_path / "locked" / "out", "-o")
    monkeypatch.setattr(os.path, "realpath", real)


def test_a_dangling_symlink_is_followed_to_where_a_write_would_land(tmp_path):
    from loraforge.core.paths import resolve_path

    (tmp_path / "model").mkdir()
    os.symlink(tmp_path / "model" / "new", tmp_path / "dangling")
    assert resolve_path(tmp_path / "dangling", "-o") == (tmp_path / "model" / "new").resolve()


def test_a_hard_link_to_an_input_is_the_input(tmp_path):
    # two names of one file: the rule goes by (device, inode) too, which also sees bind mounts
    from loraforge.core.errors import LoraforgeError
    from loraforge.core.paths import check_paths, name_path

    (tmp_path / "bench.jsonl").write_text("{}\n")
    os.link(tmp_path / "bench.jsonl", tmp_path / "report.json")
    with pytest.raises(LoraforgeError, match="is the same path as --bench"):
        check_paths([name_path("--bench", tmp_path / "bench.jsonl")], [name_path("-o", tmp_path / "report.json")])


def test_two_outputs_on_one_path_are_refused(world, tmp_path):
    line = refused_in_one_line(
        ["eval", "--model", str(world["M"]), "--bench", str(world["B"]), "-o", str(tmp_path / "r.json"),
         "--samples-out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert "are the same path" in line


def test_a_file_output_ending_in_a_slash_is_refused_in_one_line(world, tmp_path, monkeypatch):
    """`plot -o figs/`, `eval -o reports/`, `inspect --json out/`: a trailing slash names a directory. Without the
    guard the slash was dropped and a FILE called `figs` was written, exit 0. Every file output of every command
    is tried, for a directory that does not exist yet; nothing is created."""
    monkeypatch.chdir(tmp_path)
    tried = []
    for name, command in commands().items():
        ordinary = ordinary_args(command, world, tmp_path / "outs")
        for out, kind in command.loraforge_paths.writes.items():
            if kind not in ("file", "report"):
                continue
            target = tmp_path / f"{name}-{out}-dir"
            line = refused_in_one_line(argv(command, {**ordinary, out: f"{target}/"}))
            assert "ends with '/'" in line and "takes a file name" in line, line
            assert not target.exists()
            tried.append((name, out))
    # eval -o and --samples-out, inspect --json, plot -o at least
    assert {("eval", "output"), ("eval", "samples_path"), ("inspect", "json_file"), ("plot", "output")} <= set(tried)
