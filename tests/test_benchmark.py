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


@pytest.mark.slow
def test_accelerator_script_dry_run(tmp_path):
    """benchmarks/accelerator.sh --dry: the GPU run's plumbing on tiny shapes with this interpreter:
    both dtypes, every section, and XLA's bytes accessed per logit for the logit-level and fused paths."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path))
    result = subprocess.run(
        ["bash", str(root / "benchmarks" / "accelerator.sh"), "--dry"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for dtype in ("bfloat16", "float32"):
        out = json.loads((tmp_path / dtype / "results.json").read_text())
        assert out["args"]["dtype"] == dtype
        sections = {r["section"] for r in out["rows"]}
        assert {"logits", "fused", "policy", "preference", "distill", "sampler", "topk_distill"} <= sections
        assert all(r["grad_ok"] for r in out["rows"]), [r["impl"] for r in out["rows"] if not r["grad_ok"]]
        for r in out["rows"]:
            if r["section"] in ("logits", "fused") and not r["impl"].startswith("torch"):
                assert r["extra"]["bytes_per_logit"] > 0, r["impl"]
        assert (tmp_path / dtype / "results.md").exists() and (tmp_path / dtype / "results.png").exists()
