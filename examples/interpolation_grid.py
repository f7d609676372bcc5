"""Slerp interpolation between DDIM latents x_T, decoded by the demo's digits model (DDIM paper, Sec. 5.3).

Each row interpolates spherically between two random x_T; deterministic DDIM (eta = 0) turns
every interpolant into a digit, so the row morphs smoothly from one digit to the other. Uses
the zero-terminal-SNR v-prediction model cached by ``ddim-jax demo`` (same default settings),
training it if absent, unconditionally (the null label) with trailing timesteps.

Run: ``python examples/interpolation_grid.py [--out examples_out/interpolation_grid.png]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.data import to_unit_range
from ddim_jax.demo.experiments import trained_sampler
from ddim_jax.demo.png import image_grid, write_png
from ddim_jax.demo.train import DEFAULT_CACHE_DIR, TrainSettings

DEFAULT_OUT = str(Path("examples_out") / "interpolation_grid.png")


def main(
    out: str = DEFAULT_OUT,
    *,
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    settings: TrainSettings | None = None,
    rows: int = 6,
    cols: int = 10,
    num_steps: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Writes a ``rows x cols`` grid PNG to ``out`` (creating its folder); returns the images.

    The images are ``(rows * cols, 8, 8, 1)`` in about [-1, 1].
    """
    sampler = trained_sampler(settings, cache_dir)

    ends = jax.random.normal(jax.random.key(seed), (rows, 2, 8, 8, 1))
    weights = jnp.linspace(0.0, 1.0, cols)
    x_T = jax.vmap(lambda pair: ddim_jax.slerp(pair[0], pair[1], weights))(ends).reshape(rows * cols, 8, 8, 1)

    images = sampler.sample(x_T, num_steps, 0.0, jax.random.key(seed))  # labels None: unconditional
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_png(out, image_grid(to_unit_range(images), ncols=cols))
    print(f"wrote {out}")
    return images


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    a = parser.parse_args()
    main(a.out, cache_dir=a.cache_dir, num_steps=a.steps, seed=a.seed)
