"""Slerp interpolation between DDIM latents x_T, decoded by the demo's digits model (DDIM paper, Sec. 5.3).

Each row interpolates spherically between two random x_T; deterministic DDIM (eta = 0) turns
every interpolant into a digit, so the row morphs smoothly from one digit to the other. Uses
the parameters cached by ``ddim-jax demo`` (same default settings), training them if absent.

Run: ``python examples/interpolation_grid.py [--out interpolation_grid.png]``.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.data import load_digits_split, to_unit_range
from ddim_jax.demo.png import image_grid, write_png
from ddim_jax.demo.train import TrainSettings, load_or_train, make_model


def main(
    out: str = "interpolation_grid.png",
    *,
    cache_dir: str | None = os.path.join("~", ".cache", "ddim_jax"),
    settings: TrainSettings | None = None,
    rows: int = 6,
    cols: int = 10,
    num_steps: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Writes a ``rows x cols`` grid PNG to ``out``; returns the ``(rows * cols, 8, 8, 1)`` images."""
    settings = settings or TrainSettings()
    params, cached = load_or_train(settings, load_digits_split().x_train, cache_dir)
    print(f"digits model {'loaded from cache' if cached else 'trained'}")
    model = make_model(settings)
    state = ddim_jax.set_timesteps(ddim_jax.create_state(settings.scheduler_config()), num_steps)

    ends = jax.random.normal(jax.random.key(seed), (rows, 2, 8, 8, 1))
    weights = jnp.linspace(0.0, 1.0, cols)
    x_T = jax.vmap(lambda pair: ddim_jax.slerp(pair[0], pair[1], weights))(ends).reshape(rows * cols, 8, 8, 1)

    @jax.jit
    def decode(params, x_T):
        return ddim_jax.sample(lambda x, t, p: model.apply(p, x, t), state, x_T, model_args=(params,))

    images = np.asarray(decode(params, x_T))
    write_png(out, image_grid(to_unit_range(images), ncols=cols))
    print(f"wrote {out}")
    return images


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="interpolation_grid.png")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.path.join("~", ".cache", "ddim_jax"))
    a = parser.parse_args()
    main(a.out, cache_dir=a.cache_dir, num_steps=a.steps, seed=a.seed)
