"""`loraforge plot`: the paper's Figure 2 panels (training reward, gradient norm, KL(pi_new || pi_old))
for one or more runs on shared axes, from their metrics.jsonl, as a PNG. Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

from loraforge.core.atomic import FileStaging
from loraforge.core.errors import LoraforgeError
from loraforge.rl.metrics import read_metrics

PANELS = [("reward", "training reward"), ("grad_norm", "gradient norm (pre-clip)"), ("kl", "KL(π_new ‖ π_old)")]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` points (1 = raw), ignoring NaN."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return out


def _ticks(ax) -> None:
    """Whole steps on the x-axis (matplotlib's default puts 1.25, 1.5 between steps 1 and 2), and plain numbers on
    a log y-axis (matplotlib writes `1.28×10⁰` for the minor ticks it labels when the range is under a decade)."""
    from matplotlib.ticker import LogFormatter, MaxNLocator

    class Plain(LogFormatter):  # matplotlib's choice of which log ticks get a label, written as 0.2, 1.28, 1e-05
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:.3g}"

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def plot_runs(run_dirs: list[str], out: str, window: int = 1, labels: list[str] | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise LoraforgeError("plotting needs matplotlib: pip install -e '.[plots]' (or pip install matplotlib)") from e
    fmt = image_format(out, "-o")
    if labels and len(labels) != len(run_dirs):
        raise LoraforgeError(f"--label given {len(labels)} times for {len(run_dirs)} runs; give one per run or none")
    runs = []
    for i, d in enumerate(run_dirs):
        metrics = read_metrics(Path(d))
        if not metrics:
            raise LoraforgeError(f"{d}: no metrics.jsonl with any step; expected a directory `loraforge train` wrote")
        runs.append(((labels[i] if labels else Path(d).resolve().name), metrics))
    # Labels are run names, not TeX: a directory or --label such as `lr$1e-5$` or `$\\eta$` would otherwise be
    # parsed as mathtext, and one that does not parse raises from inside matplotlib while drawing.
    with plt.rc_context({"text.parse_math": False}):
        fig = _draw(plt, runs, window)
    out_path = Path(out)
    with FileStaging() as stage:  # the previous image stays until the new one is whole
        fig.savefig(stage.add(out_path), dpi=120, format=fmt)
    plt.close(fig)
    return out_path


def _draw(plt, runs: list, window: int):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6), sharex=True)
    for ax, (key, title) in zip(axes, PANELS):
        for label, metrics in runs:
            pts = [(m["step"], float(m[key])) for m in metrics if key in m]
            if pts:
                ax.plot([p[0] for p in pts], smooth([p[1] for p in pts], window), label=label, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("kl", "grad_norm"):
            ax.set_yscale("log")
        _ticks(ax)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def image_format(path: str | Path, flag: str) -> str:
    """The image format matplotlib writes PATH in, from its suffix (none: PNG); an unknown suffix is refused
    before anything is read (matplotlib itself would raise ValueError after drawing)."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if suffix not in known:
        raise LoraforgeError(
            f"{flag} {path}: matplotlib cannot write .{suffix} images; use one of "
            f"{', '.join('.' + k for k in sorted(known))} (e.g. {Path(path).with_suffix('.png')})."
        )
    return suffix
