"""The replication study's tables (table.md) and held-out figure, from study_analysis's numbers."""

from __future__ import annotations

import math
from pathlib import Path

from study_layout import LABELS, read_metrics, run_dir

TRAIN_COLUMNS = [
    ("kl_mean", "mean KL"),
    ("kl_max", "max KL"),
    ("grad_mean", "mean grad norm"),
    ("acc_first", "train acc first {w}"),
    ("acc_final", "train acc last {w}"),
    ("entropy_final", "entropy last {w}"),
    ("len_final", "length last {w}"),
    ("sim_top", "A in top-r"),
    ("sim_bottom", "A in bottom-r"),
    ("p_top", "ΔW on top-r"),
    ("update_norm", "‖ΔW‖"),
    ("s_per_step", "s / step"),
    ("rollout_share", "rollout share"),
]


def kind_label(kind: str, samples: int) -> str:
    return "greedy accuracy" if kind == "greedy" else f"mean@{samples} ({samples} samples at T = 1)"


def fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e3):
        return f"{x:.1e}"
    return f"{x:.2f}"


def spread(values: list[float]) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return fmt(mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt(mean)} ± {fmt(sd)}"


def pct(iv: dict) -> str:
    return f"{100 * iv['mean']:.1f} [{100 * iv['low']:.1f}, {100 * iv['high']:.1f}]"


def training_table(args, runs: list, summaries: dict) -> list[str]:
    w = args.window
    header = ["lr", "method", "seeds"] + [label.format(w=w) for _, label in TRAIN_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in sorted({r.grid for r in runs}):
        mine = [r for r in runs if r.grid == entry]
        for method in dict.fromkeys(r.method for r in mine):
            rows = [summaries[r.name] for r in mine if r.method == method and r.name in summaries]
            if rows:
                cells = [f"{mine[0].lr:g}", LABELS[method], str(len(rows))]
                cells += [spread([row.get(key, float("nan")) for row in rows]) for key, _ in TRAIN_COLUMNS]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def heldout_table(entry: dict, kind: str, label: str) -> list[str]:
    per_step = entry["heldout"][kind]
    steps = sorted(per_step, key=int)
    lines = [
        f"Held-out {label}, lr {entry['lr']:g}, in percent: mean over seeds [95% bootstrap interval "
        "over seeds and problems]; (n): a step only n of the method's seeds have reached",
        "",
        "| method | seeds | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for m in entry["methods"]:
        counts = {s: per_step[s]["methods"][m]["seeds"] for s in steps if m in per_step[s]["methods"]}
        seeds = max(counts.values(), default=0)
        cells = [
            "–"
            if s not in counts
            else pct(per_step[s]["methods"][m]["boot"]) + (f" ({counts[s]})" if counts[s] < seeds else "")
            for s in steps
        ]
        lines.append(f"| {LABELS[m]} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def contrast_table(entry: dict, kind: str, label: str) -> list[str]:
    per_step = entry["heldout"][kind]
    steps = [s for s in sorted(per_step, key=int) if int(s) > 0]
    lines = [
        f"Differences in held-out {label}, lr {entry['lr']:g}, in points: estimate [95% bootstrap "
        "interval], two-sided bootstrap p; * where the interval excludes 0",
        "",
        "| difference | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    names = dict.fromkeys(c for s in steps for c in per_step[s]["contrasts"])
    for name in names:
        a, b = name.split("-")
        cells = []
        for s in steps:
            c = per_step[s]["contrasts"].get(name)
            cells.append(
                "–"
                if c is None
                else f"{100 * c['diff']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] p={c['p_boot']:.2f}"
                + ("*" if c["significant"] else "")
            )
        lines.append(f"| {LABELS[a]} − {LABELS[b]} | " + " | ".join(cells) + " |")
    return lines


def collapse_lines(collapsed: dict, samples: int) -> list[str]:
    lines = [
        "Collapse criterion, stated before the study: held-out mean@"
        f"{samples} at an evaluated step at least 10 points below the run's own highest value at an earlier "
        "evaluated step. The same rule on greedy accuracy was added with the stress entry (mean@"
        f"{samples} starts at a few percent, so a fall from the start cannot reach 10 points on it).",
    ]
    for kind, label in (("mean", f"mean@{samples}"), ("greedy", "greedy accuracy")):
        hit = {name: c for name, c in collapsed[kind].items() if c}
        lines += ["", f"Runs meeting it on {label}: {len(hit)} of {len(collapsed[kind])}" + (":" if hit else ".")]
        for name, c in hit.items():
            peak = f"peak {100 * c['peak']:.1f}% at step {c['peak_step']}"
            lines.append(f"- {name}: {100 * c['value']:.1f}% at step {c['step']}, {peak}")
    dead = {name: step for name, step in collapsed["rollout_dead_from"].items() if step is not None}
    lines += [
        "",
        "Rollout accuracy 0 (every response of every group wrong, so no learning signal) from a step to the end of "
        f"the run, for at least 3 steps: {len(dead)} of {len(collapsed['rollout_dead_from'])} runs"
        + (":" if dead else "."),
    ]
    lines += [f"- {name}: from step {step}" for name, step in dead.items()]
    return lines


def write_tables(args, runs: list, summaries: dict, stats: dict, collapsed: dict, out: Path) -> str:
    lines = ["## Training (rollout) metrics, mean ± standard deviation over seeds", ""]
    lines += training_table(args, runs, summaries)
    for entry in stats.values():
        for kind in ("mean", "greedy"):
            label = kind_label(kind, args.eval_samples)
            lines += ["", f"## Held-out, lr {entry['lr']:g}: {label}", ""]
            lines += heldout_table(entry, kind, label) + [""] + contrast_table(entry, kind, label)
    lines += ["", "## Collapse", ""] + collapse_lines(collapsed, args.eval_samples)
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def per_step_mean(args, runs: list, key: str) -> tuple[list[int], list[float]]:
    """A training metric averaged, at every step, over the runs (seeds) that have reached it."""
    cols = [{m["step"]: float(m[key]) for m in read_metrics(run_dir(args, r)) if key in m} for r in runs]
    steps = sorted(set().union(*cols))
    means = []
    for s in steps:
        values = [c[s] for c in cols if s in c]
        means.append(sum(values) / len(values))
    return steps, means


def heldout_figure(args, runs: list, entry: dict, path: Path) -> None:
    """Held-out greedy accuracy and mean@4 per method over steps (mean over seeds, 95% bootstrap band),
    beside the training KL(new || old) and gradient norm (mean over seeds) of the same runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for m in entry["methods"]:
        mine = [r for r in runs if r.method == m]
        for ax, kind in zip(axes[:2], ("greedy", "mean")):
            per_step = entry["heldout"][kind]
            steps = [int(s) for s in sorted(per_step, key=int) if m in per_step[s]["methods"]]
            ivs = [per_step[str(s) if str(s) in per_step else s]["methods"][m]["boot"] for s in steps]
            (line,) = ax.plot(steps, [100 * iv["mean"] for iv in ivs], marker="o", label=LABELS[m])
            ax.fill_between(
                steps,
                [100 * iv["low"] for iv in ivs],
                [100 * iv["high"] for iv in ivs],
                alpha=0.15,
                color=line.get_color(),
            )
        for ax, key in zip(axes[2:], ("kl", "grad_norm")):
            steps, values = per_step_mean(args, mine, key)
            ax.plot(steps, values, label=LABELS[m])
    titles = [
        "held-out greedy accuracy (%)",
        f"held-out mean@{args.eval_samples} (%)",
        "KL(π_new ‖ π_old) per step",
        "gradient norm",
    ]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[3].set_yscale("log")
    axes[0].legend()
    seeds = sorted(
        {
            st["seeds"]
            for per_step in entry["heldout"].values()
            for x in per_step.values()
            for st in x["methods"].values()
        }
    )
    shown = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    fig.suptitle(
        f"lr {entry['lr']:g}: mean over {shown} seed(s) per method and step; bands: 95% bootstrap over seeds and "
        "held-out problems"
    )
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
