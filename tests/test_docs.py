"""Every ```python block of README.md and of each docs/*.md page runs as written.

Per page, top to bottom, in one namespace (a later block may use names an earlier one made),
as a reader would paste them; a fresh namespace for each page.
"""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text(encoding="utf-8"))


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]


def run_page(page: Path) -> dict:
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(python_blocks(page), 1):
        try:
            exec(compile(block, f"{page}: python block {number}", "exec"), namespace)
        except Exception as err:  # name the block: the traceback alone shows only its own lines
            raise AssertionError(f"{page.name} python block {number} failed:\n{block}") from err
    return namespace


def _finite(*arrays) -> bool:
    return all(bool(jnp.isfinite(a).all()) for a in arrays)


def _sampled(ns):  # parallel.md's model and x_T through ddim_jax.sample
    args = (0.3, ns["state100"].alphas_cumprod)
    return ns["ddim_jax"].sample(ns["gaussian_denoiser"], ns["state100"], ns["x_T1"], model_args=args)


# What a page's code must have produced, beyond running: names from its blocks.
CHECKS = {
    "README.md": lambda ns: ns["images"].shape == (8, 4, 64, 64) and _finite(ns["images"]),
    "index.md": lambda ns: (
        ns["images"].shape == (8, 4, 64, 64) and _finite(ns["images"], ns["out"].prev_sample)
    ),
    "sampling.md": lambda ns: _finite(ns["images"], ns["edited"]),
    "guidance.md": lambda ns: (
        ns["images"].shape == (8, 4, 64, 64)
        and _finite(ns["images"], ns["per_example"], ns["out"])
        and ns["per_example"].shape == (3, 16)
        and len(ns["traces"]) == 1
    ),
    "serving.md": lambda ns: len(ns["traces"]) == 1 and _finite(ns["out"]),
    "inversion.md": lambda ns: (
        float(jnp.max(jnp.abs(ns["x0_bdia"] - ns["x0"]))) < 1e-4
        and float(jnp.max(jnp.abs(ns["x0_edict"] - ns["x0"]))) < 1e-4
        and float(jnp.max(jnp.abs(ns["x0_fixed"] - ns["x0"]))) < 1e-4
    ),
    "parallel.md": lambda ns: (
        int(ns["fast"].iterations) < 100 and np.allclose(ns["exact"].sample, _sampled(ns), atol=1e-5)
    ),
    "devices.md": lambda ns: _finite(ns["out"]),
    "engine.md": lambda ns: (
        len(ns["results"]) == 6 and all(r.shape == (2, 8) and np.isfinite(r).all() for r in ns["results"])
    ),
    "your_model.md": lambda ns: (
        ns["images"].shape == (2, 16)
        and _finite(ns["images"])
        and ns["sd_latents"].shape == (1, 4, 8, 8)
        and ns["sd_latents"].dtype == jnp.float32
        and _finite(ns["sd_latents"])
    ),
    "diffusers.md": lambda ns: ns["latents"].shape == ns["x_T"].shape and _finite(ns["latents"]),
}


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_every_python_block_of_the_page_runs_in_order(page):
    if page.name == "your_model.md":  # its NNX, Equinox and SD-class sections
        pytest.importorskip("equinox")
        if not hasattr(pytest.importorskip("diffusers"), "FlaxUNet2DConditionModel"):
            pytest.skip("the SD section needs diffusers' Flax classes (diffusers < 0.40)")
    namespace = run_page(page)
    check = CHECKS.get(page.name)
    assert check is None or check(namespace), f"{page.name}: its code ran but gave unexpected results"


def test_the_pages_with_code_are_found():
    names = {page.name for page in PAGES_WITH_CODE}
    assert set(CHECKS) <= names, f"pages with checks but no python blocks: {set(CHECKS) - names}"


def test_the_api_page_documents_every_public_name():
    import ddim_jax
    import ddim_jax.compat

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^::: (\S+)$", api, re.M))
    public = {f"ddim_jax.{name}" for name in ddim_jax.__all__}
    public |= {f"ddim_jax.compat.{name}" for name in ddim_jax.compat.__all__}
    assert public <= documented, f"add to docs/api.md: {sorted(public - documented)}"
