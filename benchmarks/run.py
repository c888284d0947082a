"""The main job: jaxsce's analytic gradient against autodiff, side by side, in one run.

    python -m benchmarks.run            # small default, < 3 minutes on 2 CPU cores
    python -m benchmarks.run --full     # the core and fused issues' large shapes

Every implementation of a case is timed in the same process, interleaved
(one call of each per round, after warm-up, with ``block_until_ready``), so
ratios compare like with like on whatever device JAX picked. Results go to
``--out`` as JSON (with the environment), a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import jaxsce

try:
    import optax
except ImportError:  # pragma: no cover - optax is in the bench extra
    optax = None
# torch's OpenMP threads spin after each op by default, stealing the cores
# from the JAX call timed next; passive waiting keeps interleaving fair.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
try:
    import torch
except ImportError:
    torch = None

DEFAULT_LOGITS = [(2048, 1024), (512, 8192), (128, 32768)]
FULL_LOGITS = [(4096, 1024), (2048, 32768), (512, 131072)]
DEFAULT_FUSED = [(1024, 256, 8192)]
FULL_FUSED = [(8192, 512, 32768)]
DEFAULT_MEMORY = dict(d=256, vocab=32768, tokens=(2048, 4096, 8192, 16384), dtype="float32")
FULL_MEMORY = dict(d=2304, vocab=256000, tokens=(1024, 2048, 4096, 8192), dtype="bfloat16")
HEADLINE = (8192, 2304, 256000)


@dataclass
class Row:
    section: str
    impl: str
    shape: str
    dtype: str
    median_ms: float
    min_ms: float
    max_ms: float
    tokens_per_s: float
    ratio_to_peer: float | None = None
    ratio_to_roofline: float | None = None
    temp_mib: float | None = None
    max_abs_grad_diff: float | None = None
    grad_ok: bool | None = None
    extra: dict = field(default_factory=dict)


# --- implementations -------------------------------------------------------------


def naive_loss(x, y):
    """The tutorial: exp(x) / sum(exp(x)), -log p[y], mean."""
    e = jnp.exp(x.astype(jnp.float32))
    p = e / jnp.sum(e, axis=-1, keepdims=True)
    return -jnp.mean(jnp.log(jnp.take_along_axis(p, y[:, None], axis=-1)))


def stable_loss(x, y):
    logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def logit_impls() -> dict[str, Callable]:
    impls = {
        "jaxsce (vjp)": lambda x, y: jaxsce.cross_entropy(x, y),
        "jaxsce (jvp)": lambda x, y: jaxsce.cross_entropy(x, y, derivative="jvp"),
        "autodiff naive": naive_loss,
        "autodiff stable": stable_loss,
    }
    if optax is not None:
        impls["optax"] = lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
    return {k: jax.jit(jax.value_and_grad(f)) for k, f in impls.items()}


def fused_impls(mode: str = "grad") -> dict[str, Callable]:
    """``mode="grad"``: value_and_grad wrt (h, W) of ``f(h, w, y)``.
    ``mode="jvp"``: ``jax.jvp`` wrt (h, W) in the direction (th, tw), called
    as ``f(h, w, y, th, tw)``; jaxsce then uses ``derivative="jvp"``."""
    derivative = "jvp" if mode == "jvp" else "vjp"
    impls = {
        "jaxsce fused": lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y, derivative=derivative),
        "plain h@W + jaxsce": lambda h, w, y: jaxsce.cross_entropy(h @ w, y, derivative=derivative),
        "plain h@W + autodiff naive": lambda h, w, y: naive_loss(h @ w, y),
    }
    if optax is not None:
        impls["plain h@W + optax"] = lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
    if mode == "grad":
        return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}

    def forward(f):
        return lambda h, w, y, th, tw: jax.jvp(lambda h, w: f(h, w, y), (h, w), (th, tw))

    return {k: jax.jit(forward(f)) for k, f in impls.items()}


def torch_logit(x_np, y_np):
    x = torch.tensor(x_np, requires_grad=True)
    y = torch.tensor(y_np, dtype=torch.long)

    def step():
        x.grad = None
        loss = torch.nn.functional.cross_entropy(x, y)
        loss.backward()
        return loss, x.grad

    return step


def torch_fused(h_np, w_np, y_np):
    h = torch.tensor(h_np, requires_grad=True)
    w = torch.tensor(w_np, requires_grad=True)
    y = torch.tensor(y_np, dtype=torch.long)

    def step():
        h.grad = w.grad = None
        loss = torch.nn.functional.cross_entropy(h @ w, y)
        loss.backward()
        return loss, (h.grad, w.grad)

    return step


# --- measurement ------------------------------------------------------------------


def temp_mib(fn, *args) -> float:
    stats = fn.lower(*args).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes / 2**20


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, block, progress=None) -> dict[str, np.ndarray]:
    for call in calls.values():  # warm-up and compile
        block(call())
    times = {k: [] for k in calls}
    # The order is shuffled every round: on CPU a call that follows one which
    # freed a large buffer reuses its pages and skips page faults, so a fixed
    # order would favour whoever comes second.
    order = np.random.default_rng(0)
    names = list(calls)
    for _ in range(repeats):
        for name in order.permutation(names):
            t0 = time.perf_counter()
            block(calls[name]())
            times[name].append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return {k: np.asarray(v) * 1e3 for k, v in times.items()}


def _block(out):
    jax.block_until_ready(out)
    return out


def max_diff(a, b) -> float:
    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    return float(max(np.max(np.abs(x - y)) for x, y in zip(la, lb)))


def grad_tolerance(grad) -> float:
    """Allowed gap to the naive autodiff gradient: float32 rounding of p - y."""
    scale = max(float(np.max(np.abs(np.asarray(g, np.float64)))) for g in jax.tree.leaves(grad))
    return 1e-4 * max(scale, 1e-30) + 1e-7


def _measured_row(section, name, shape, dtype, t, tokens, *, peer_ms, roofline, temp, diff, tol, extra) -> Row:
    median = float(np.median(t))
    return Row(
        section=section,
        impl=name,
        shape=shape,
        dtype=jnp.dtype(dtype).name,
        median_ms=median,
        min_ms=float(t.min()),
        max_ms=float(t.max()),
        tokens_per_s=tokens / (median / 1e3),
        ratio_to_peer=None if peer_ms is None else float(median / peer_ms),
        ratio_to_roofline=float(roofline),
        temp_mib=temp,
        max_abs_grad_diff=diff,
        grad_ok=bool(diff <= tol),
        extra=extra,
    )


def _gradient(call, is_torch):
    grad = call()[1]
    if is_torch:
        return tuple(g.detach().numpy() for g in grad) if isinstance(grad, tuple) else grad.detach().numpy()
    return grad


def bench_logits(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = logit_impls()
    for n, v in shapes:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(n, v)), dtype)
        y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
        roof = jax.jit(jnp.exp)
        calls = {k: (lambda f=f, x=x, y=y: f(x, y)) for k, f in impls.items()}
        calls["roofline: exp over logits"] = lambda x=x, roof=roof: roof(x)
        if torch is not None and dtype == jnp.float32:
            calls["torch F.cross_entropy"] = torch_logit(np.asarray(x), np.asarray(y))
        times = interleaved(calls, repeats, _block, progress)
        ref_grad = impls["autodiff naive"](x, y)[1]
        peer = np.median(times["optax"]) if "optax" in times else None
        roof_ms = np.median(times.pop("roofline: exp over logits"))
        for name, t in times.items():
            is_torch = name.startswith("torch")
            diff = max_diff(_gradient(calls[name], is_torch), ref_grad)
            rows.append(
                _measured_row(
                    "logits",
                    name,
                    f"{n}x{v}",
                    dtype,
                    t,
                    n,
                    peer_ms=peer,
                    roofline=np.median(t) / roof_ms,
                    temp=None if is_torch else temp_mib(impls[name], x, y),
                    diff=diff,
                    tol=grad_tolerance(ref_grad),
                    extra={"roofline_ms": float(roof_ms)},
                )
            )
    return rows


def bench_fused(shapes, dtype, repeats, progress, mode: str = "grad") -> list[Row]:
    """Fused vs plain ``h @ W``; ``mode`` as in :func:`fused_impls` (section "fused" or "forward")."""
    rows = []
    impls = fused_impls(mode)
    for t_, d, v in shapes:
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.normal(size=(t_, d)), dtype)
        w = jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d), dtype)
        y = jnp.asarray(rng.integers(0, v, size=t_), jnp.int32)
        args = (h, w, y)
        if mode == "jvp":
            args += (jnp.asarray(rng.normal(size=(t_, d)), dtype), jnp.asarray(rng.normal(size=(d, v)) / d, dtype))
        matmul = jax.jit(lambda h, w: h @ w)
        calls = {k: (lambda f=f, args=args: f(*args)) for k, f in impls.items()}
        calls["roofline: h@W matmul"] = lambda h=h, w=w, matmul=matmul: matmul(h, w)
        if torch is not None and dtype == jnp.float32 and mode == "grad":
            calls["torch h@W + F.cross_entropy"] = torch_fused(np.asarray(h), np.asarray(w), np.asarray(y))
        times = interleaved(calls, repeats, _block, progress)
        matmul_ms = np.median(times.pop("roofline: h@W matmul"))
        matmul_rate = 2 * t_ * d * v / (matmul_ms / 1e3)
        # The derivative (gradient, or tangent in forward mode) of the naive formula.
        ref = impls["plain h@W + autodiff naive"](*args)[1]
        peer = np.median(times["plain h@W + jaxsce"])
        flops = 6 * t_ * d * v  # grad: logits, d_hidden, d_weight; jvp: logits, dh W, h dW
        for name, t in times.items():
            is_torch = name.startswith("torch")
            diff = max_diff(_gradient(calls[name], is_torch), ref)
            rate = flops / (np.median(t) / 1e3)
            rows.append(
                _measured_row(
                    "fused" if mode == "grad" else "forward",
                    name,
                    f"{t_}x{d}x{v}",
                    dtype,
                    t,
                    t_,
                    peer_ms=peer,
                    roofline=rate / matmul_rate,
                    temp=None if is_torch else temp_mib(impls[name], *args),
                    diff=diff,
                    tol=10 * grad_tolerance(ref),
                    extra={"gflops_6TdV": rate / 1e9, "matmul_gflops": matmul_rate / 1e9},
                )
            )
    return rows


def memory_table(d, vocab, tokens, dtype) -> list[dict]:
    """Compile-only temporary memory of value_and_grad, fused vs plain."""
    out = []
    dt = jnp.dtype(dtype)
    for t_ in tokens:
        h = jax.ShapeDtypeStruct((t_, d), dt)
        w = jax.ShapeDtypeStruct((d, vocab), dt)
        y = jax.ShapeDtypeStruct((t_,), jnp.int32)
        fused = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.linear_cross_entropy(h, w, y), argnums=(0, 1)))
        plain = jax.jit(jax.value_and_grad(lambda h, w, y: jaxsce.cross_entropy(h @ w, y), argnums=(0, 1)))
        out.append(
            dict(
                tokens=t_,
                d=d,
                vocab=vocab,
                dtype=dt.name,
                fused_temp_mib=temp_mib(fused, h, w, y),
                plain_temp_mib=temp_mib(plain, h, w, y),
            )
        )
    return out


# --- reporting --------------------------------------------------------------------


def environment() -> dict:
    dev = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        jaxsce=jaxsce.__version__,
        optax=getattr(optax, "__version__", None),
        torch=getattr(torch, "__version__", None),
        backend=jax.default_backend(),
        device=str(dev.device_kind),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
    )


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(env: dict, rows: list[Row], memory: list[dict]) -> str:
    lines = [
        f"Environment: jax {env['jax']} on {env['backend']} ({env['device']}, {env['cpu_count']} cores, "
        f"{env['machine']}), python {env['python']}, {env['date']}.",
        "",
    ]
    titles = {
        "logits": "Logit level: value_and_grad of the mean loss",
        "fused": "Fused linear + cross-entropy: value_and_grad wrt (h, W)",
        "forward": 'Fused linear + cross-entropy, forward mode: jax.jvp wrt (h, W) (derivative="jvp")',
    }
    for section, peer, roof in (
        ("logits", "÷ optax", "÷ exp pass"),
        ("fused", "÷ plain jaxsce", "FLOP rate ÷ matmul's"),
        ("forward", "÷ plain jaxsce", "FLOP rate ÷ matmul's"),
    ):
        part = [r for r in rows if r.section == section]
        if not part:
            continue
        lines += [
            f"### {titles[section]}",
            "",
            f"| shape | dtype | implementation | median ms | min–max ms | tokens/s | {peer} | {roof} | temp MiB "
            "| max abs derivative diff vs naive |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in part:
            lines.append(
                f"| {r.shape} | {r.dtype} | {r.impl} | {r.median_ms:.2f} | {r.min_ms:.2f}–{r.max_ms:.2f} | "
                f"{r.tokens_per_s:,.0f} | {_fmt(r.ratio_to_peer, '.3f')} | {_fmt(r.ratio_to_roofline, '.2f')} | "
                f"{_fmt(r.temp_mib, '.1f')} | {r.max_abs_grad_diff:.1e}{'' if r.grad_ok else ' (!)'} |"
            )
        lines.append("")
    if memory:
        lines += [
            "### Compile-only temporary memory of value_and_grad (memory_analysis)",
            "",
            "| tokens | d | vocab | dtype | fused MiB | plain MiB |",
            "|---:|---:|---:|---|---:|---:|",
        ]
        for m in memory:
            lines.append(
                f"| {m['tokens']} | {m['d']} | {m['vocab']} | {m['dtype']} "
                f"| {m['fused_temp_mib']:.1f} | {m['plain_temp_mib']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


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


def _shapes(text: str, arity: int):
    out = []
    for part in text.split(","):
        dims = tuple(int(p) for p in part.lower().split("x"))
        if len(dims) != arity:
            raise argparse.ArgumentTypeError(f"expected {arity} sizes joined by 'x', got {part!r}")
        out.append(dims)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the large shapes of the core and fused issues")
    parser.add_argument("--logits", type=lambda s: _shapes(s, 2), help="logit shapes NxV,NxV,...")
    parser.add_argument("--fused", type=lambda s: _shapes(s, 3), help="fused shapes TxDxV,...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 40, full 9)")
    parser.add_argument(
        "--memory-tokens", type=lambda s: tuple(int(x) for x in s.split(",")), help="token counts for the memory table"
    )
    parser.add_argument("--memory-dv", type=lambda s: _shapes(s, 2)[0], help="DxV for the memory table")
    parser.add_argument("--no-memory", action="store_true", help="skip the compile-only memory table")
    parser.add_argument(
        "--out",
        default=os.path.join("build", "bench"),
        help="where to write results (default build/bench, not tracked); benchmarks/results holds the reference runs",
    )
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    logits = args.logits or (FULL_LOGITS if args.full else DEFAULT_LOGITS)
    fused = args.fused or (FULL_FUSED if args.full else DEFAULT_FUSED)
    repeats = args.repeats or (9 if args.full else 40)
    mem = dict(FULL_MEMORY if args.full else DEFAULT_MEMORY)
    if args.memory_tokens:
        mem["tokens"] = args.memory_tokens
    if args.memory_dv:
        mem["d"], mem["vocab"] = args.memory_dv
    dtype = jnp.dtype(args.dtype)
    env = environment()
    print(
        f"jax {env['jax']} | backend {env['backend']} ({env['device']}) | {env['cpu_count']} cores | "
        f"torch: {env['torch'] or 'not installed (skipped)'}"
    )

    try:
        from tqdm import tqdm

        progress = tqdm(total=repeats * (len(logits) + 2 * len(fused)), desc="timing rounds", file=sys.stderr)
    except ImportError:
        progress = None
    rows = bench_logits(logits, dtype, repeats, progress) + bench_fused(fused, dtype, repeats, progress)
    rows += bench_fused(fused, dtype, repeats, progress, mode="jvp")
    if progress is not None:
        progress.close()
    memory = [] if args.no_memory else memory_table(**mem)
    if args.full and not args.no_memory:
        # The bf16 headline shape is the last row of the full memory table;
        # add its float32 twin.
        memory += memory_table(HEADLINE[1], HEADLINE[2], (HEADLINE[0],), "float32")

    os.makedirs(args.out, exist_ok=True)
    result = dict(
        environment=env, args=vars(args) | {"repeats": repeats}, rows=[asdict(r) for r in rows], memory=memory
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = markdown(env, rows, memory)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        plot(rows, os.path.join(args.out, "results.png"), env)
    print(table)
    bad = [f"{r.impl} @ {r.shape}" for r in rows if not r.grad_ok]
    print(
        "derivatives: every implementation's gradient (and tangent) matches naive autodiff's"
        if not bad
        else f"derivative mismatch: {bad}"
    )
    print(f"wrote {args.out}/results.json, results.md" + ("" if args.no_plot else ", results.png"))
    return result


if __name__ == "__main__":
    main()
