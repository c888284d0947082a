"""Every ```python block in the README and the docs runs as written.

Each page's blocks run in order, as one script, in a fresh process with 8
virtual CPU devices and JAX's default settings (not this suite's x64 and
strict promotion): what a reader who copies them gets.
"""

import os
import pathlib
import re
import subprocess
import sys

import compat
import pytest
from marks import fast_cases

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def test_pages_have_code():
    assert python_blocks(ROOT / "README.md"), "the README has no python blocks to check"


@fast_cases(lambda p: p["page"].name == "README.md")  # the guides run in the slow set
@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run_as_written(page, tmp_path):
    if compat.JAX < (0, 7):
        pytest.skip("the pages are written for current JAX (jax.set_mesh, Explicit mesh axes)")
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n".join(python_blocks(page)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{page.name}:\n{result.stderr[-4000:]}"
