"""The training examples run end to end in smoke mode (a few steps).

They run in a subprocess: examples are user code under JAX's default
configuration, not under this suite's strict promotion and x64 settings.
"""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(name, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_digits_cnn_smoke():
    lines = _run("digits_cnn")
    assert lines[-1].startswith("test accuracy: ")
    assert 0.0 <= float(lines[-1].split(":")[1]) <= 1.0
    first, last = (float(x) for x in lines[0].split("loss ")[1].split(" -> "))
    assert last < first


@pytest.mark.slow
def test_next_token_smoke():
    lines = _run("next_token")
    mem = next(line for line in lines if line.startswith("training step temporary memory"))
    assert "fused" in mem and "plain" in mem
    losses = [float(line.split("train loss ")[1]) for line in lines if "train loss" in line]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_policy_gradient_smoke():
    lines = _run("policy_gradient")
    rewards = [
        float(line.split("reward (rate of 'self') ")[1].split()[0]) for line in lines if line.startswith("rl step")
    ]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
    for line in (line for line in lines if line.startswith("rl step")):  # linear_policy_loss's metrics
        kl, clipped = (float(line.split(f"{name} ")[1].split()[0]) for name in ("kl", "clipped"))
        assert kl >= 0.0 and 0.0 <= clipped <= 1.0
    first, last = (float(x) for x in lines[-1].split("reward ")[1].split(" in ")[0].split(" -> "))
    assert 0.0 <= first <= 1.0 and 0.0 <= last <= 1.0


@pytest.mark.slow
def test_distill_smoke():
    lines = _run("distill")
    losses = [float(line.split("validation cross-entropy ")[1]) for line in lines if "validation cross-entropy" in line]
    assert len(losses) == 3 and all(0.0 < x < 20.0 for x in losses)
