"""The run's environment and its Markdown report."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import jax

import jaxsce

from .cases import optax, torch
from .timing import Row


def _installed(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    dev = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        jax=jax.__version__,
        jaxlib=getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        jaxsce=jaxsce.__version__,
        optax=getattr(optax, "__version__", None),
        torch=getattr(torch, "__version__", None),
        liger_kernel=_installed("liger-kernel"),
        backend=jax.default_backend(),
        device=str(dev.device_kind),
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
    )


#: Each section's title, the peer its time ratio is taken to, its roofline
#: column and any extra columns (``Row.extra`` key, header).
SECTIONS = {
    "logits": dict(
        title="Logit level: value_and_grad of the mean loss",
        peer="÷ optax",
        roof="÷ exp pass",
        extra=(("ratio_to_exp_and_max", "÷ (exp + row max)"), ("bytes_per_logit", "XLA bytes / logit")),
    ),
    "step": dict(
        title="Training step's loss head: value_and_grad wrt (h, W) of loss(h @ W, y)",
        peer="÷ optax",
        roof="÷ its 3 matmuls",
        extra=(("loss_ms", "ms beyond the matmuls"), ("temp_ratio_to_optax", "temp ÷ optax's")),
    ),
    "fused": dict(
        title="Fused linear + cross-entropy: value_and_grad wrt (h, W)",
        peer="÷ plain jaxsce",
        roof="FLOP rate ÷ matmul's",
        extra=(
            ("ratio_to_block_matmuls", "÷ own block matmuls"),
            ("ratio_to_torch_linear_cross_entropy", "÷ torch linear_cross_entropy"),
            ("bytes_per_logit", "XLA bytes / logit (loops counted once)"),
        ),
    ),
    "forward": dict(
        title='Fused linear + cross-entropy, forward mode: jax.jvp wrt (h, W) (derivative="jvp")',
        peer="÷ plain jaxsce",
        roof="FLOP rate ÷ matmul's",
    ),
    "policy": dict(
        title="Policy optimization: value_and_grad wrt (h, W) of DAPO (clipped ratio, beta = 0.04, "
        "reference log-probs given), completions of 256 tokens",
        peer="÷ plain autodiff",
        roof="÷ 3 matmuls",
        extra=(("ratio_to_liger", "÷ Liger-Kernel"), ("floor_ratio_to_liger", "3 matmuls ÷ Liger-Kernel")),
    ),
    "policy_ref": dict(
        title="Policy optimization with the reference model's head fused (ref_hidden, ref_weight)",
        peer="÷ plain autodiff",
        roof="÷ 4 matmuls",
        extra=(("ratio_to_liger", "÷ Liger-Kernel"), ("floor_ratio_to_liger", "4 matmuls ÷ Liger-Kernel")),
    ),
    "preference": dict(
        title="Preference optimization: value_and_grad wrt (chosen h, rejected h, W) of DPO (sigmoid, beta = 0.1, "
        "reference log-probs given), pairs of 256-token completions",
        peer="÷ plain autodiff",
        roof="÷ 3 matmuls",
        extra=(("ratio_to_liger", "÷ Liger-Kernel"), ("floor_ratio_to_liger", "3 matmuls ÷ Liger-Kernel")),
    ),
    "distill": dict(
        title="Distillation: value_and_grad wrt the student's (h, W) of the mean KL(teacher || student)",
        peer="÷ plain autodiff",
        roof="time ÷ 4 matmuls",
    ),
    "distill_jsd": dict(
        title="Distillation with the hard-label term: value_and_grad wrt the student's (h, W) of "
        "0.5 JSD(beta = 0.5) + 0.5 cross-entropy (Liger-Kernel's defaults)",
        peer="÷ plain autodiff",
        roof="time ÷ 4 matmuls",
        extra=(("ratio_to_liger", "÷ Liger-Kernel"), ("floor_ratio_to_liger", "4 matmuls ÷ Liger-Kernel")),
    ),
    "sampler": dict(
        title="Sampler-matched log-probs: value_and_grad wrt (h, W) of a policy-gradient sum of "
        "log-probs under top-k = 50",
        peer="÷ plain autodiff",
        roof="÷ unfiltered linear_log_probs",
        extra=(
            ("top_p_alone_over_unfiltered", "top_p = 0.9 alone ÷ unfiltered"),
            ("batch_invariant_over_unfiltered", "batch_invariant ÷ unfiltered"),
        ),
    ),
    "topk_distill": dict(
        title="Top-k distillation: value_and_grad wrt (h, W) of the mean KL on a stored teacher's top 64 "
        "plus the tail bin",
        peer="÷ plain autodiff",
        roof="time ÷ 3 matmuls",
    ),
}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(env: dict, rows: list[Row], memory: list[dict]) -> str:
    lines = [
        f"Environment: jax {env['jax']} on {env['backend']} ({env['device']}, {env['cpu_count']} cores, "
        f"{env['machine']}), python {env['python']}, optax {env['optax'] or '-'}, torch {env['torch'] or '-'}, "
        f"Liger-Kernel {env.get('liger_kernel') or '-'}, {env['date']}.",
        "",
    ]
    for section, spec in SECTIONS.items():
        part = [r for r in rows if r.section == section]
        if not part:
            continue
        extra_cols = spec.get("extra", ())
        lines += [
            f"### {spec['title']}",
            "",
            f"| shape | dtype | implementation | median ms | min–max ms | tokens/s | {spec['peer']} | {spec['roof']} "
            "| temp MiB" + "".join(f" | {label}" for _, label in extra_cols) + " | max abs derivative diff vs naive |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra_cols) + "---:|",
        ]
        for r in part:
            extras = "".join(f" | {_fmt(r.extra.get(key), '.3f')}" for key, _ in extra_cols)
            lines.append(
                f"| {r.shape} | {r.dtype} | {r.impl} | {r.median_ms:.2f} | {r.min_ms:.2f}–{r.max_ms:.2f} | "
                f"{r.tokens_per_s:,.0f} | {_fmt(r.ratio_to_peer, '.3f')} | {_fmt(r.ratio_to_roofline, '.2f')} | "
                f"{_fmt(r.temp_mib, '.1f')}{extras} | {r.max_abs_grad_diff:.1e}{'' if r.grad_ok else ' (!)'} |"
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
