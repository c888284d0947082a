"""Smoke test of the benchmark entry point on tiny shapes: schema and gradient agreement, never time."""

import json

import pytest

import benchmarks.run as bench


@pytest.mark.slow
def test_benchmark_runs_and_every_gradient_matches(tmp_path):
    bench.main(
        [
            "--logits",
            "64x128,16x512",
            "--step",
            "64x128",
            "--fused",
            "32x16x200",
            "--repeats",
            "2",
            "--memory-tokens",
            "64,128",
            "--memory-dv",
            "16x512",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "results.json").read_text())
    assert {"jax", "backend", "device", "cpu_count"} <= set(result["environment"])
    rows = result["rows"]
    impls = {r["impl"] for r in rows}
    assert {
        "jaxsce (vjp)",
        "jaxsce (jvp)",
        "autodiff naive",
        "autodiff stable",
        "optax",
        "jaxsce fused",
        "plain h@W + jaxsce",
    } <= impls
    for section in ("policy", "policy_ref"):
        policy = {r["impl"] for r in rows if r["section"] == section}
        assert {
            "jaxsce linear_policy_loss",
            "jaxsce linear_log_probs + GRPO by hand",
            "plain h@W + log_softmax (autodiff)",
        } <= policy
    distill = {r["impl"] for r in rows if r["section"] == "distill"}
    assert {"jaxsce linear_distillation_loss", "plain matmuls + log_softmax (autodiff)"} <= distill
    step = [r for r in rows if r["section"] == "step"]
    assert {r["impl"] for r in step} >= {"jaxsce", "optax"}
    assert all(r["temp_mib"] is not None and r["extra"]["temp_ratio_to_optax"] is not None for r in step)
    fused = [r for r in rows if r["section"] == "fused"]
    assert all(r["extra"]["ratio_to_block_matmuls"] > 0 for r in fused)
    forward = {r["impl"] for r in rows if r["section"] == "forward"}
    assert {"jaxsce fused", "plain h@W + jaxsce", "plain h@W + optax"} <= forward
    for r in rows:
        assert set(bench.Row.__dataclass_fields__) <= set(r)
        assert r["grad_ok"], r
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    assert [m["tokens"] for m in result["memory"]] == [64, 128]
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "results.png").stat().st_size > 1000
    table = (tmp_path / "results.md").read_text()
    for title in (
        "Logit level",
        "Training step",
        "Fused linear",
        "forward mode",
        "Policy optimization",
        "Distillation",
    ):
        assert title in table
