"""Every ```python block of README.md runs as written, top to bottom, in one namespace."""

import re
from pathlib import Path

import jax.numpy as jnp

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


def test_every_readme_python_block_runs_in_order():
    blocks = readme_python_blocks()
    assert len(blocks) >= 6
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{README}: python block {number}", "exec"), namespace)
        except Exception as err:  # name the block: the traceback alone shows only its own lines
            raise AssertionError(f"README python block {number} failed:\n{block}") from err
    images, out = namespace["images"], namespace["out"]  # the "Usage" section's results
    assert images.shape == (8, 4, 64, 64) and images.dtype == jnp.float32
    assert bool(jnp.isfinite(images).all()) and bool(jnp.isfinite(out).all())
