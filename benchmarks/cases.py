"""The implementations compared in each section of the main job, and the sections' runs.

Each ``bench_*`` function times every implementation of its section side by
side in one process (``timing.interleaved``) and returns ``timing.Row``s.
Adding a section means adding a function here and its title in ``report``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxsce

from .timing import Row, _block, _gradient, _measured_row, grad_tolerance, interleaved, max_diff, temp_mib

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


# --- post-training: policy-gradient objective through the LM head ------------------


def policy_impls() -> dict[str, Callable]:
    """value_and_grad wrt (h, W) of ``-mean(A log p_y) - 0.01 mean(H)``."""

    def objective(lp, ent, a):
        return -jnp.mean(a * lp) - 0.01 * jnp.mean(ent)

    def autodiff(h, w, y, a):
        ls = jax.nn.log_softmax(h @ w, axis=-1)
        lp = jnp.take_along_axis(ls, y[:, None], axis=-1)[:, 0]
        return objective(lp, -jnp.sum(jnp.exp(ls) * ls, axis=-1), a)

    impls = {
        "jaxsce linear_log_probs": lambda h, w, y, a: objective(
            *jaxsce.linear_log_probs(h, w, y, return_entropy=True), a
        ),
        "plain h@W + jaxsce.log_probs": lambda h, w, y, a: objective(
            *jaxsce.log_probs(h @ w, y, return_entropy=True), a
        ),
        "plain h@W + log_softmax (autodiff)": autodiff,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def bench_policy(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = policy_impls()
    peer_name = "plain h@W + log_softmax (autodiff)"
    for t_, d, v in shapes:
        rng = np.random.default_rng(0)
        h = jnp.asarray(rng.normal(size=(t_, d)), dtype)
        w = jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d), dtype)
        y = jnp.asarray(rng.integers(0, v, size=t_), jnp.int32)
        a = jnp.asarray(rng.normal(size=t_), jnp.float32)
        args = (h, w, y, a)
        matmul = jax.jit(lambda h, w: h @ w)
        calls = {k: (lambda f=f, args=args: f(*args)) for k, f in impls.items()}
        calls["roofline: h@W matmul"] = lambda h=h, w=w, matmul=matmul: matmul(h, w)
        times = interleaved(calls, repeats, _block, progress)
        matmul_ms = np.median(times.pop("roofline: h@W matmul"))
        matmul_rate = 2 * t_ * d * v / (matmul_ms / 1e3)
        ref = impls[peer_name](*args)[1]
        peer = np.median(times[peer_name])
        for name, t in times.items():
            rate = 6 * t_ * d * v / (np.median(t) / 1e3)
            rows.append(
                _measured_row(
                    "policy",
                    name,
                    f"{t_}x{d}x{v}",
                    dtype,
                    t,
                    t_,
                    peer_ms=peer,
                    roofline=rate / matmul_rate,
                    temp=temp_mib(impls[name], *args),
                    diff=max_diff(calls[name]()[1], ref),
                    tol=10 * grad_tolerance(ref),
                    extra={"gflops_6TdV": rate / 1e9, "matmul_gflops": matmul_rate / 1e9},
                )
            )
    return rows


# --- distillation: KL between a student's and a teacher's head ----------------------


def distill_impls() -> dict[str, Callable]:
    """value_and_grad wrt the student's (h, W) of the mean KL(P_t || P_s) of two heads."""

    def autodiff(hs, ws, ht, wt):
        ls = jax.nn.log_softmax(hs @ ws, axis=-1)
        lt = jax.nn.log_softmax(jax.lax.stop_gradient(ht @ wt), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), axis=-1))

    impls = {
        "jaxsce linear_distillation_loss": lambda hs, ws, ht, wt: jaxsce.linear_distillation_loss(hs, ws, ht, wt),
        "plain matmuls + jaxsce.distillation_loss": lambda hs, ws, ht, wt: jaxsce.distillation_loss(hs @ ws, ht @ wt),
        "plain matmuls + log_softmax (autodiff)": autodiff,
    }
    return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for k, f in impls.items()}


def bench_distill(shapes, dtype, repeats, progress) -> list[Row]:
    rows = []
    impls = distill_impls()
    peer_name = "plain matmuls + log_softmax (autodiff)"
    for t_, d, v in shapes:
        rng = np.random.default_rng(0)
        args = (
            jnp.asarray(rng.normal(size=(t_, d)), dtype),
            jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d), dtype),
            jnp.asarray(rng.normal(size=(t_, d)), dtype),
            jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d), dtype),
        )
        matmul = jax.jit(lambda h, w: h @ w)
        calls = {k: (lambda f=f, args=args: f(*args)) for k, f in impls.items()}
        calls["roofline: h@W matmul"] = lambda h=args[0], w=args[1], matmul=matmul: matmul(h, w)
        times = interleaved(calls, repeats, _block, progress)
        matmul_ms = np.median(times.pop("roofline: h@W matmul"))
        ref = impls[peer_name](*args)[1]
        peer = np.median(times[peer_name])
        for name, t in times.items():
            rows.append(
                _measured_row(
                    "distill",
                    name,
                    f"{t_}x{d}x{v}",
                    dtype,
                    t,
                    t_,
                    peer_ms=peer,
                    # 4 matmul passes at least: both heads' logits, d_hidden, d_W.
                    roofline=np.median(t) / (4 * matmul_ms),
                    temp=temp_mib(impls[name], *args),
                    diff=max_diff(calls[name]()[1], ref),
                    tol=10 * grad_tolerance(ref),
                    extra={"matmul_ms": float(matmul_ms)},
                )
            )
    return rows
