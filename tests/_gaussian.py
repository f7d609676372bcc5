"""The exact denoiser for Gaussian data x0 ~ N(MU, SIGMA^2) per element, shared by the loop tests.

DDIM's ODE for this data is smooth and known in closed form, so inversion, reconstruction and
sampler tests can compare against exact values instead of against another sampler.
"""

from __future__ import annotations

import jax.numpy as jnp

MU, SIGMA = 0.5, 0.4


def gaussian_model(state):
    """``model_fn(x, t)``: the exact epsilon, or v, for the config's prediction type."""
    prediction = state.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"gaussian_model covers epsilon and v_prediction, got {prediction!r}")

    def model(x, t):
        a = state.alphas_cumprod[t]
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * SIGMA**2 + 1 - a)
        if prediction == "epsilon":
            return eps
        x0 = MU + a**0.5 * SIGMA**2 * (x - a**0.5 * MU) / (a * SIGMA**2 + 1 - a)
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0  # v

    return model


def exact_encoding(state, x0, step):
    """The exact ODE's latent at ``state.timesteps[step]`` for ``x0``."""
    a = state.alphas_cumprod[state.timesteps[step]]
    return jnp.sqrt(a) * MU + jnp.sqrt(a * SIGMA**2 + 1 - a) * (x0 - MU) / SIGMA
