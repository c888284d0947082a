"""The PNG of a run."""

from __future__ import annotations

from .timing import Row


def plot(rows: list[Row], path: str, env: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'jaxsce[bench]')")
        return False
    part = [r for r in rows if r.section == "logits"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for impl in dict.fromkeys(r.impl for r in part):
        pts = sorted((int(r.shape.split("x")[1]), r.median_ms, r.temp_mib) for r in part if r.impl == impl)
        vs = [p[0] for p in pts]
        ax_t.plot(vs, [p[1] for p in pts], marker="o", label=impl)
        if all(p[2] is not None for p in pts):
            ax_m.plot(vs, [p[2] for p in pts], marker="o", label=impl)
    for ax, title in ((ax_t, "median time (ms)"), (ax_m, "compiled temporary memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("vocabulary size V (N×V shapes as in the table)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_m.set_yscale("symlog", linthresh=1.0)
    ax_m.set_ylim(bottom=0)
    ax_t.legend(fontsize=8)
    fig.suptitle(
        f"value_and_grad of the mean cross-entropy — jax {env['jax']}, {env['backend']} ({env['cpu_count']} cores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
