"""The README's usage example runs as written."""

import re
from pathlib import Path

import jax.numpy as jnp

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    namespace: dict = {}
    exec(compile(blocks[0] + blocks[1], str(README), "exec"), namespace)  # the "Usage" section
    images, out = namespace["images"], namespace["out"]
    assert images.shape == (8, 4, 64, 64) and images.dtype == jnp.float32
    assert bool(jnp.isfinite(images).all())
    assert out.prev_sample.shape == images.shape
