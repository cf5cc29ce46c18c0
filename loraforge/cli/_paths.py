"""What every command reads and writes, declared once on the command, and the guard that applies it.

    @paths(reads={"model": "model"}, writes={"out": "dir"})
    @click.command()
    ...

names each parameter that is a path and its kind. Before the command's body runs, the guard expands
every input to the paths it really reads (an adapter's residual base, the model its manifest or
adapter_config names, the init its lineage record names, a run's model/adapter/data; the keys of a
`--config` YAML count as the flags they stand for) and every output to the paths it writes (eval's
samples file beside the report), resolves each once (core/paths.resolve_path) and applies the rule
(core/paths.check_paths): an output that is, contains or lies inside an input is refused in one line,
with exit 1, whatever --overwrite says. The group (cli/__init__.LazyGroup) refuses to run a command
without a declaration, so a new command or flag cannot skip the guard; tests/test_path_guard.py
walks the command tree and tries every output against every input.
"""

from __future__ import annotations

import errno
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from loraforge.cli._common import user_errors
from loraforge.core.errors import LoraforgeError
from loraforge.core.paths import NamedPath, UnresolvablePath, check_paths, name_path

# keys of a training run's config.json that name what the run read
RUN_INPUTS = {"model": "model", "adapter": "adapter", "data": "data", "eval_data": "data", "tokenizer": "model"}


def _itself(value: str) -> list[tuple[str, str]]:
    return [("", value)]


def _adapter(value: str) -> list[tuple[str, str]]:
    from loraforge.adapters.directory import related_paths

    return [("", value)] + [(what, str(p)) for what, p in related_paths(value)]


def _run(value: str) -> list[tuple[str, str]]:
    """A training run directory, and what its config.json says the run read."""
    found = [("", value)]
    try:
        config = json.loads((Path(value) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return found  # no run there (yet), or a damaged config: the command's reader reports it
    if not isinstance(config, dict):
        return found
    for key, kind in RUN_INPUTS.items():
        named = config.get(key)
        if isinstance(named, str) and named:
            found += [(what or f"the {key} of the run {value}", p) for what, p in READ_KINDS[kind](named)]
    return found


def _benchmarks(value: str) -> list[tuple[str, str]]:
    from loraforge.eval.config import parse_benchmarks  # the --bench list as eval reads it (synthetic:k=v,...)

    try:
        names = parse_benchmarks(value) or ()
    except LoraforgeError:  # eval itself reports a bad list
        names = ()
    return [("", name) for name in names]


# what an input of each kind reads: [(what, path)]; what "" is the flag itself
READ_KINDS: dict[str, Callable[[str], list[tuple[str, str]]]] = {
    "model": _itself,  # a model directory (or a Hub id: not a local path, nothing to guard)
    "adapter": _adapter,  # an adapter directory and what it names
    "run": _run,  # a training run directory and what it was trained from
    "data": _itself,  # a data file (or a Hub dataset id, or synthetic:...)
    "benchmarks": _benchmarks,  # eval's comma-separated benchmark names and files
    "file": _itself,
}


def _samples_beside(value: str, params: dict) -> list[tuple[str, str]]:
    """eval's report: REPORT.samples.jsonl is written beside it unless --samples-out names another file."""
    if params.get("samples_path"):
        return []
    from loraforge.eval.report import samples_path_for

    return [("the samples file of", str(samples_path_for(value)))]


def _nothing_more(value: str, params: dict) -> list[tuple[str, str]]:
    return []


# what an output of each kind writes besides itself: a directory (replaced whole, or written into), a file, a
# run directory (written into; what its config.json names is read: see declared_paths), eval's report
WRITE_KINDS: dict[str, Callable[[str, dict], list[tuple[str, str]]]] = {
    "dir": _nothing_more,
    "file": _nothing_more,
    "run": _nothing_more,
    "report": _samples_beside,
}


@dataclass(frozen=True)
class Declared:
    """The paths one command reads and writes: {parameter name: kind}."""

    reads: dict[str, str] = field(default_factory=dict)
    writes: dict[str, str] = field(default_factory=dict)
    settings: str | None = None  # a parameter naming a YAML file whose keys stand for the flags (train --config)


def paths(
    reads: dict[str, str] | None = None, writes: dict[str, str] | None = None, settings: str | None = None
) -> Callable[[click.Command], click.Command]:
    """Declare the paths a click command reads and writes, and guard its body with the rule."""
    declared = Declared(dict(reads or {}), dict(writes or {}), settings)

    def apply(command: click.Command) -> click.Command:
        names = {p.name for p in command.params}
        for name, kind in {**declared.reads, **declared.writes}.items():
            known = READ_KINDS if name in declared.reads else WRITE_KINDS
            if name not in names or kind not in known:
                raise TypeError(f"{command.name}: @paths names {name!r} ({kind!r}), not a parameter of a known kind")
        body = command.callback

        @functools.wraps(body)
        def guarded(**params):
            with user_errors():
                guard(command, declared, params)
            return body(**params)

        command.callback = guarded
        command.loraforge_paths = declared  # read by LazyGroup and by tests/test_path_guard.py
        return command

    return apply


def flag_of(command: click.Command, name: str) -> str:
    """How the user names parameter NAME: its long option (-o if that is all it has), or its metavar."""
    param = next(p for p in command.params if p.name == name)
    if isinstance(param, click.Argument):
        return param.human_readable_name
    if "-o" in param.opts:
        return "-o"
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs or param.opts)[-1]


def _values(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [os.fspath(v) for v in value if v not in (None, "")]
    return [os.fspath(value)]


def _settings_file(declared: Declared, params: dict) -> dict:
    """The keys of the YAML settings file that stand for declared path flags not given on the command line."""
    name = declared.settings
    if not name or not params.get(name):
        return {}
    try:
        from loraforge.rl.config import load_yaml

        values, _lines = load_yaml(params[name])
    except Exception:  # unreadable or damaged: the command's own reader reports it in one line
        return {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()} if isinstance(values, dict) else {}
    wanted = {**declared.reads, **declared.writes}
    return {k: v for k, v in values.items() if k in wanted and params.get(k) in (None, "") and isinstance(v, str)}


def declared_paths(command: click.Command, params: dict) -> tuple[list[NamedPath], list[NamedPath]]:
    """(inputs, outputs) of COMMAND called with PARAMS, each resolved once. Inputs that do not exist are
    no local path (a Hub id, synthetic data) and are left out; an output is resolved whatever it is."""
    declared: Declared = command.loraforge_paths
    params = {**params, **_settings_file(declared, params)}
    inputs = list(_inputs(command, declared, params))
    outputs = []
    for name, kind in declared.writes.items():
        flag = flag_of(command, name)
        for value in _values(params.get(name)):
            out = name_path(flag, value)
            outputs.append(out)
            outputs += [name_path(f"{what} {flag}", path) for what, path in WRITE_KINDS[kind](value, params)]
            if kind == "run":  # --resume RUN_DIR: what the run was trained from is read again
                inputs += [p for p in _expand_inputs(flag, value, _run) if p.path != out.path]
    return inputs, outputs


def _inputs(command: click.Command, declared: Declared, params: dict) -> Iterable[NamedPath]:
    for name, kind in declared.reads.items():
        for value in _values(params.get(name)):
            yield from _expand_inputs(flag_of(command, name), value, READ_KINDS[kind])


def _expand_inputs(flag: str, value: str, expand) -> Iterable[NamedPath]:
    """The local paths VALUE stands for (itself, or each part of a --bench list) and what they name, resolved."""
    for what, path in expand(value):
        try:
            named = _local(what or flag, path)
        except UnresolvablePath:
            if not what:
                raise  # a path the user gave: one line
            continue  # a path a file names (a manifest, a run's config) that leads nowhere: nothing is read there
        if named is not None:
            yield named


def _local(label: str, path: str) -> NamedPath | None:
    """PATH resolved, or None when it is no local path (a Hub id, synthetic:..., a file not written yet)."""
    try:
        named = name_path(label, path)
    except UnresolvablePath as e:
        if os.path.lexists(path) or e.errno not in (errno.ENOENT, errno.ENOTDIR):  # a loop, a locked directory
            raise
        return None
    return named if os.path.exists(named.path) else None


def _check_kind(out: NamedPath, kind: str) -> None:
    """A file where a directory is wanted, or the other way round: one line."""
    if kind in ("dir", "run") and out.path.exists() and not out.path.is_dir():
        raise LoraforgeError(f"{out.flag} {out.given} is a file; {out.flag} takes a directory. Choose another path.")
    if kind in ("file", "report") and out.given.endswith(("/", os.sep)) and not out.path.is_dir():
        # `-o figs/` names a directory; the path without the slash would silently become a file called `figs`
        raise LoraforgeError(
            f"{out.flag} {out.given} ends with '/', which names a directory, but {out.flag} takes a file name; "
            f"give one, e.g. {out.given}out{_suffix_hint(kind)} (create the directory first if it is missing)."
        )
    if kind in ("file", "report") and out.path.is_dir():
        raise LoraforgeError(
            f"{out.flag} {out.given} is a directory; {out.flag} takes a file name, "
            f"e.g. {out.given.rstrip('/')}/out.json."
        )


def _suffix_hint(kind: str) -> str:
    return ".json" if kind == "report" else ""


def guard(command: click.Command, declared: Declared, params: dict) -> None:
    """Resolve COMMAND's declared paths and apply the rule (core/paths.check_paths), before any work."""
    inputs, outputs = declared_paths(command, params)
    check_paths(inputs, outputs)
    kinds = {flag_of(command, name): kind for name, kind in declared.writes.items()}
    for out in outputs:
        _check_kind(out, kinds.get(out.flag, "file"))  # a derived output (eval's samples file) is a file
