"""The main job: jaxsce's analytic gradient against autodiff, side by side, in one run.

    python -m benchmarks.run            # small default, about 1.5 minutes on 2 CPU cores
    python -m benchmarks.run --full     # the core and fused issues' large shapes

Every implementation of a case is timed in the same process, interleaved
(one call of each per round, after warm-up, with ``block_until_ready``), so
ratios compare like with like on whatever device JAX picked. Results go to
``--out`` as JSON (with the environment), a Markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import jax.numpy as jnp

from . import timing
from .cases import (
    bench_distill,
    bench_distill_jsd,
    bench_fused,
    bench_logits,
    bench_policy,
    bench_preference,
    bench_sampler,
    bench_step,
    bench_topk_distill,
    memory_table,
)
from .plot import plot
from .report import environment, markdown
from .timing import Row

__all__ = ["Row", "main"]

DEFAULT_LOGITS = [(2048, 1024), (512, 8192), (128, 32768)]
FULL_LOGITS = [(4096, 1024), (512, 8192), (2048, 32768), (512, 131072)]
DEFAULT_STEP = [(2048, 1024), (512, 8192), (128, 32768)]
FULL_STEP = [(4096, 1024), (2048, 32768), (512, 131072)]
STEP_D = 256
DEFAULT_FUSED = [(512, 256, 8192)]
FULL_FUSED = [(8192, 512, 32768)]
DEFAULT_MEMORY = dict(d=256, vocab=32768, tokens=(4096, 16384), dtype="float32")
FULL_MEMORY = dict(d=2304, vocab=256000, tokens=(1024, 2048, 4096, 8192), dtype="bfloat16")
HEADLINE = (8192, 2304, 256000)


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
    parser.add_argument("--step", type=lambda s: _shapes(s, 2), help="training-step shapes NxV,... (d = 256)")
    parser.add_argument("--fused", type=lambda s: _shapes(s, 3), help="fused shapes TxDxV,...")
    parser.add_argument(
        "--sections",
        default="logits,step,fused,forward,policy,policy_ref,sampler,preference,distill,distill_jsd,topk_distill",
        help="comma-separated sections to run (default: all)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 10, full 9)")
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
    parser.add_argument(
        "--settle",
        type=float,
        default=None,
        help="seconds of quiet before each timed call (default 0, --full 0.5)",
    )
    args = parser.parse_args(argv)

    logits = args.logits or (FULL_LOGITS if args.full else DEFAULT_LOGITS)
    step = args.step or (FULL_STEP if args.full else DEFAULT_STEP)
    sections = set(args.sections.split(","))
    fused = args.fused or (FULL_FUSED if args.full else DEFAULT_FUSED)
    repeats = args.repeats or (9 if args.full else 10)
    timing.SETTLE = args.settle if args.settle is not None else (0.5 if args.full else 0.0)
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

        cases = {"logits": len(logits), "step": len(step)}
        total = sum(cases.get(s, len(fused)) for s in sections)
        progress = tqdm(total=repeats * total, desc="timing rounds", file=sys.stderr)
    except ImportError:
        progress = None
    runs = {
        "logits": lambda: bench_logits(logits, dtype, repeats, progress),
        "step": lambda: bench_step(step, STEP_D, dtype, repeats, progress),
        "fused": lambda: bench_fused(fused, dtype, repeats, progress),
        "forward": lambda: bench_fused(fused, dtype, repeats, progress, mode="jvp"),
        "policy": lambda: bench_policy(fused, dtype, repeats, progress, liger_compiled=args.full),
        "policy_ref": lambda: bench_policy(
            fused, dtype, repeats, progress, fused_reference=True, liger_compiled=args.full
        ),
        "preference": lambda: bench_preference(fused, dtype, repeats, progress, liger_compiled=args.full),
        "distill": lambda: bench_distill(fused, dtype, repeats, progress),
        "distill_jsd": lambda: bench_distill_jsd(fused, dtype, repeats, progress, liger_compiled=args.full),
        "sampler": lambda: bench_sampler(fused, dtype, repeats, progress),
        "topk_distill": lambda: bench_topk_distill(fused, dtype, repeats, progress),
    }
    unknown = sections - set(runs)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(runs)}")
    rows = [row for name, run in runs.items() if name in sections for row in run()]
    if progress is not None:
        progress.close()
    memory = [] if args.no_memory else memory_table(**mem)
    if args.full and not args.no_memory:
        # The bf16 headline shape is the last row of the full memory table;
        # add its float32 twin.
        memory += memory_table(HEADLINE[1], HEADLINE[2], (HEADLINE[0],), "float32")

    os.makedirs(args.out, exist_ok=True)
    run_args = vars(args) | {"repeats": repeats, "settle": timing.SETTLE}
    result = dict(environment=env, args=run_args, rows=[asdict(r) for r in rows], memory=memory)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    table = markdown(env, rows, memory)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        plot(rows, os.path.join(args.out, "results.png"), env, memory)
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
