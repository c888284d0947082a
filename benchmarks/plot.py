"""The PNG of a run: one panel per section, and the memory panels."""

from __future__ import annotations

from .report import SECTIONS
from .timing import Row


def _bars(ax, groups: list[str], series: dict[str, list], *, fmt: str, log: bool = False):
    """Grouped bars, one group per shape, each bar labelled with its value
    (so a 0 or a bar hidden by scale still reads)."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [0 if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=name)
        for b, v in zip(bars, values):
            if v is not None:
                top = (b.get_x() + b.get_width() / 2, b.get_height())
                ax.annotate(format(v, fmt), top, ha="center", va="bottom", fontsize=6, rotation=90,
                            xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(groups)), groups, fontsize=7)
    if log:
        ax.set_yscale("symlog", linthresh=1.0)
    ax.margins(y=0.25)
    ax.grid(alpha=0.3, axis="y")


def plot(rows: list[Row], path: str, env: dict, memory: list[dict] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'jaxsce[bench]')")
        return False
    sections = [s for s in SECTIONS if any(r.section == s for r in rows)]
    step = [r for r in rows if r.section == "step"]
    panels = len(sections) + bool(step) + bool(memory)
    cols = min(3, panels)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 4.6 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax, section in zip(flat, sections):
        part = [r for r in rows if r.section == section]
        shapes = list(dict.fromkeys(r.shape for r in part))
        impls = list(dict.fromkeys(r.impl for r in part))
        by = {(r.impl, r.shape): r.ratio_to_peer for r in part}
        _bars(ax, shapes, {i: [by.get((i, s)) for s in shapes] for i in impls}, fmt=".2f")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(f"{section}: median time {SECTIONS[section]['peer']}", fontsize=9)
        ax.set_xlabel("shape (" + ("N×V" if section == "logits" else "T×d×V") + ")", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    rest = flat[len(sections) :]
    if step:
        ax = rest.pop(0)
        shapes = list(dict.fromkeys(r.shape for r in step))
        impls = list(dict.fromkeys(r.impl for r in step))
        by = {(r.impl, r.shape): r.temp_mib for r in step}
        _bars(ax, shapes, {i: [by.get((i, s)) for s in shapes] for i in impls}, fmt=".0f", log=True)
        ax.set_title("step: compiled temporaries (MiB)", fontsize=9)
        ax.set_xlabel("shape (N×d×V)", fontsize=8)
        ax.legend(fontsize=6, loc="upper left")
    if memory:
        ax = rest.pop(0)
        shapes = [f"{m['tokens']}×{m['d']}×{m['vocab']}\n{m['dtype']}" for m in memory]
        series = {
            "fused linear_cross_entropy": [m["fused_temp_mib"] for m in memory],
            "plain h@W + cross_entropy": [m["plain_temp_mib"] for m in memory],
        }
        _bars(ax, shapes, series, fmt=".0f", log=True)
        ax.set_title("fused vs plain: compiled temporaries of value_and_grad (MiB)", fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    for ax in rest:
        ax.axis("off")
    fig.suptitle(
        f"jaxsce benchmark — jax {env['jax']}, {env['backend']} ({env['cpu_count']} cores), {env['date'][:10]}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
