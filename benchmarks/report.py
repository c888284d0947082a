"""The run's environment and its Markdown report."""

from __future__ import annotations

import datetime
import os
import platform

import jax

import jaxsce

from .cases import optax, torch
from .timing import Row


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
        "policy": "Post-training: value_and_grad wrt (h, W) of -mean(A log p) - 0.01 mean(H)",
        "distill": "Distillation: value_and_grad wrt the student's (h, W) of the mean KL(teacher || student)",
    }
    for section, peer, roof in (
        ("logits", "÷ optax", "÷ exp pass"),
        ("fused", "÷ plain jaxsce", "FLOP rate ÷ matmul's"),
        ("forward", "÷ plain jaxsce", "FLOP rate ÷ matmul's"),
        ("policy", "÷ plain autodiff", "FLOP rate ÷ matmul's"),
        ("distill", "÷ plain autodiff", "time ÷ 4 matmuls"),
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
