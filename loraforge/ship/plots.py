"""PNG figures of `loraforge inspect --plots DIR`, one message each (matplotlib, an optional extra).

- spectrum.png    where the top-r and bottom-r singular values sit in W0's spectrum, per layer (paper Fig. 9)
- init_norm.png   the init norm ||B0 A0||_F per layer (paper Table 4); not drawn when B0 = 0 everywhere
- similarity.png  how much of A lies in the principal / minor right singular subspace, per layer (Fig. 7)
- update.png      a trained adapter's update along W0's singular directions: p_i and cumulative energy (Fig. 3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from loraforge.core.atomic import FileStaging
from loraforge.core.errors import LoraforgeError
from loraforge.ship.inspect import InspectReport

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoraforgeError(
            "--plots needs matplotlib, which is not installed. Install it with `pip install -e '.[plots]'` "
            "(or `pip install matplotlib`), or drop --plots."
        ) from None
    return plt


def write_plots(report: InspectReport, out_dir: str | Path, kinds: Optional[list[str]] = None) -> list[Path]:
    """Draw the figures that apply to REPORT into OUT_DIR; return the files written.

    KINDS: module kinds (or suffixes such as q_proj) for the spectrum and update figures; None: all.
    """
    plt = require_matplotlib()
    out_dir = Path(out_dir)
    chosen = _choose_kinds(report, kinds)
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8})
    label = f"{report.method or 'adapter'} r={report.r}"
    figures = [("spectrum.png", lambda path: _spectrum(plt, report, chosen, path, label))]
    if any(m.init_norm for m in report.modules):
        figures.append(("init_norm.png", lambda path: _init_norm(plt, report, path, label)))
    if any(m.init_sim_top is not None or m.sim_top is not None for m in report.modules):
        figures.append(("similarity.png", lambda path: _similarity(plt, report, path, label)))
    if report.trained:
        figures.append(("update.png", lambda path: _update(plt, report, chosen, path, label)))
    # Every figure is drawn into a staging file first and the set renamed into place at the end: a failure
    # or a kill while drawing leaves the previous figures as they were.
    # Names (method, modules) are text, not TeX: `$...$` in one would be parsed as mathtext and could raise.
    with plt.rc_context({"text.parse_math": False}), FileStaging() as stage:
        for name, draw in figures:
            draw(stage.add(out_dir / name))
    return [out_dir / name for name, _ in figures]


def _choose_kinds(report: InspectReport, kinds: Optional[list[str]]) -> list[str]:
    all_kinds = report.kinds()
    if not kinds:
        return all_kinds
    chosen = [k for k in all_kinds if any(k == w or k.endswith("." + w) or k.endswith(w) for w in kinds)]
    if not chosen:
        raise LoraforgeError(
            f"--plot-modules {','.join(kinds)} matches none of the inspected modules: {', '.join(all_kinds)}."
        )
    return chosen


def _layer_x(report: InspectReport, rows) -> list[float]:
    return [m.layer if m.layer is not None else i for i, m in enumerate(rows)]


def _grid(plt, n: int, width_each: float = 3.6, height_each: float = 3.0):
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width_each * cols, height_each * rows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _spectrum(plt, report, kinds, path, label) -> Path:
    fig, axes = _grid(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        rows = [m for m in report.modules if m.kind == kind]
        # First, middle and last layer, as the paper's Fig. 9 shows.
        picks = [rows[i] for i in sorted({0, len(rows) // 2, len(rows) - 1})]
        for color, m in zip(COLORS, picks):
            sig = [s for s in m.sigma if s > 0]
            ax.semilogy(range(1, len(sig) + 1), sig, color=color, lw=1.4, label=f"layer {m.layer}")
        m = rows[0]
        ax.axvspan(0.5, m.r + 0.5, color="#f4b400", alpha=0.25, lw=0, label=f"top-{m.r}")
        ax.axvspan(m.rank - m.r + 0.5, m.rank + 0.5, color="#4285f4", alpha=0.25, lw=0, label=f"bottom-{m.r}")
        ax.set_title(f"{kind} ({m.shape[0]}x{m.shape[1]})")
        ax.set_xlabel("singular value index i")
        ax.set_ylabel(r"singular value $\sigma_i$")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower left")
    fig.suptitle(rf"Singular values of the pretrained weights $W_0$, with the r directions the inits use ({label})")
    return _save(plt, fig, path)


def _init_norm(plt, report, path, label) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for color, kind in zip(COLORS * 4, report.kinds()):
        rows = [m for m in report.modules if m.kind == kind and m.init_norm is not None]
        ax.plot(_layer_x(report, rows), [m.init_norm for m in rows], marker="o", ms=4, color=color, label=kind)
    mean = report.mean().get("init_norm")
    ax.set_title(rf"Init norm $\Vert B_0 A_0 \Vert_F$ per layer ({label}; mean {mean:.3g})")
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\Vert B_0 A_0 \Vert_F$")
    _integer_x(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, path)


def _similarity(plt, report, path, label) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    series = [("A0 (init)", "init_sim", "#7f7f7f", "--")]
    if report.trained:
        series.append(("A (trained)", "sim", "#d62728", "-"))
    for ax, which, title in (
        (axes[0], "top", rf"principal: $V_r$ (top {report.r})"),
        (axes[1], "bottom", rf"minor: $V_{{-r}}$ (bottom {report.r} nonzero)"),
    ):
        for name, prefix, color, style in series:
            by_layer: dict = {}
            for i, m in enumerate(report.modules):
                v = getattr(m, f"{prefix}_{which}")
                if v is not None:
                    by_layer.setdefault(m.layer if m.layer is not None else i, []).append(v)
            if not by_layer:
                continue
            xs = sorted(by_layer)
            mean = [sum(by_layer[x]) / len(by_layer[x]) for x in xs]
            ax.plot(
                xs,
                mean,
                style,
                color=color,
                marker="o",
                ms=4,
                lw=1.6,
                label=f"{name}: mean {sum(mean) / len(mean):.2f}",
            )
            ax.fill_between(
                xs, [min(by_layer[x]) for x in xs], [max(by_layer[x]) for x in xs], color=color, alpha=0.15, lw=0
            )
        ax.set_title(title)
        ax.set_xlabel("layer")
        _integer_x(ax)
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[0].set_ylabel(r"similarity $\Vert A V \Vert_F \,/\, \Vert A \Vert_F$")
    fig.suptitle(
        rf"How much of A lies in $W_0$'s principal vs minor right singular subspace ({label}; "
        "line: mean over modules, band: min-max)"
    )
    return _save(plt, fig, path)


def _update(plt, report, kinds, path, label) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for color, kind in zip(COLORS * 4, kinds):
        c = report.curves(kind)
        if c is None:
            continue
        k = len(c["p"])
        x = [(i + 0.5) / k for i in range(k)]
        left.plot(x, c["p"], color=color, lw=1.3, label=f"{kind} ({c['layers']} layers)")
        right.plot(x, c["energy"], color=color, lw=1.6, label=kind)
    left.axhline(0, color="black", lw=0.5)
    right.plot([0, 1], [0, 1], ":", color="black", lw=1, label="spread evenly")
    left.set_title(r"update distribution $p_i = c_i \,/\, \sum_j c_j$")
    left.set_xlabel("relative singular index i / k (largest singular value first)")
    left.set_ylabel(r"$p_i$")
    right.set_title(r"cumulative energy $\sum_{j \leq i} c_j^2 \,/\, \sum_j c_j^2$")
    right.set_xlabel("relative singular index i / k (largest singular value first)")
    right.set_ylabel("cumulative energy")
    right.set_ylim(0, 1.02)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(
        rf"Where training moved the weights along $W_0$'s singular directions: "
        rf"$c_i = |u_i^\top \Delta W v_i|$ ({label})"
    )
    return _save(plt, fig, path)


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
