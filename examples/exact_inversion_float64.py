"""Where EDICT's and BDIA's round-trip error comes from: the same round trips in float32 and float64.

Inverts 50 held-out digits under their own label with `ddim_jax.edict_invert` /
`ddim_jax.bdia_invert` and samples them back (`edict_sample` / `bdia_sample`) under the same
label, on the demo's zero-terminal-SNR v-prediction model with trailing spacing (cached by
``ddim-jax demo``, trained if absent), once with float32 digits and once with float64 ones
(``jax_enable_x64``: model and carry in float64). Prints the largest error over max |x0|: if
the methods are exact, float64 shrinks it to float64 round-off.

Run: ``python examples/exact_inversion_float64.py``.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ddim_jax  # noqa: E402
from ddim_jax.demo.data import load_digits_split, vary_brightness  # noqa: E402
from ddim_jax.demo.experiments import trained_sampler  # noqa: E402
from ddim_jax.demo.train import NULL_LABEL, denoiser_fn  # noqa: E402

METHODS = {
    "edict": (ddim_jax.edict_invert, ddim_jax.edict_sample),
    "bdia": (ddim_jax.bdia_invert, ddim_jax.bdia_sample),
}


def _round_trip(invert, sample, model_fn, state, kwargs):
    return jax.jit(lambda x: sample(model_fn, state, invert(model_fn, state, x, **kwargs), **kwargs))


def main(steps: tuple[int, ...] = (10, 50), num_digits: int = 50) -> None:
    sampler = trained_sampler(progress=False)
    digits = load_digits_split()
    x0 = np.asarray(vary_brightness(digits.x_test, jax.random.key(99)))[:num_digits]  # as the demo
    labels = jnp.asarray(digits.y_test[:num_digits], jnp.int32)
    both = jnp.concatenate([jnp.full_like(labels, NULL_LABEL), labels])  # [uncond, cond]
    model_fn, kwargs = (
        denoiser_fn(sampler.model),
        {"model_args": (sampler.params, both), "guidance_scale": 1.0},
    )
    print("| dtype | S | method | max error / max abs x0 |\n|---|---|---|---|")
    for dtype in (jnp.float32, jnp.float64):
        x = jnp.asarray(x0, dtype)
        for s in steps:
            state = ddim_jax.set_timesteps(ddim_jax.create_state(sampler.config), s)
            for name, (invert, sample) in METHODS.items():
                out = _round_trip(invert, sample, model_fn, state, kwargs)(x)
                error = float(jnp.max(jnp.abs(out - x)) / jnp.max(jnp.abs(x)))
                print(f"| {jnp.dtype(dtype).name} | {s} | {name} | {error:.1e} |")


if __name__ == "__main__":
    main()
