"""Every ```python block of docs/your_model.md runs as written, top to bottom, in one namespace."""

import re
from pathlib import Path

import jax.numpy as jnp
import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "your_model.md"


def test_every_python_block_of_your_model_runs_in_order():
    pytest.importorskip("equinox")
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "FlaxUNet2DConditionModel"):
        pytest.skip("the SD section needs diffusers' Flax classes (diffusers < 0.40)")
    blocks = re.findall(r"^```python\n(.*?)^```", PAGE.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) == 5
    namespace: dict = {"__name__": "your_model"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{PAGE}: python block {number}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"docs/your_model.md python block {number} failed:\n{block}") from err
    assert namespace["images"].shape == (2, 16) and bool(jnp.isfinite(namespace["images"]).all())
    out = namespace["sd_latents"]
    assert out.shape == (1, 4, 8, 8) and out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
