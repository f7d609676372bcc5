"""Classifier-free guidance and guidance rescale (Lin et al. 2023, Algorithm 2)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_same_shape

__all__ = ["classifier_free_guidance", "rescale_noise_cfg"]


def per_example_value(name: str, value: Any, like: Any) -> Any:
    """``value`` as a scalar or one value per example (shape ``(batch,)``), shaped to broadcast
    against ``like`` (batch first); any other shape is a ValueError naming ``name``."""
    shape, batch = jnp.shape(value), jnp.shape(like)[:1]
    if shape == ():
        return value
    if shape != batch:
        raise ValueError(
            f"{name} must be a scalar or hold one value per example, shape (batch,) = {batch}, "
            f"got shape {shape}"
        )
    return jnp.reshape(jnp.asarray(value), batch + (1,) * (jnp.ndim(like) - 1))


def rescale_noise_cfg(
    noise_cfg: jax.Array, noise_pred_text: jax.Array, guidance_rescale: float | jax.Array = 0.0
) -> jax.Array:
    """diffusers ``rescale_noise_cfg``: match the guided output's std to the conditional one's.

    Standard deviations are per example, over all non-batch axes.
    ``out = phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg`` with ``phi = guidance_rescale``,
    a scalar or one value per example (shape ``(batch,)``).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import rescale_noise_cfg
      >>> cfg, cond = jnp.array([[0.0, 4.0]]), jnp.array([[0.0, 2.0]])
      >>> rescale_noise_cfg(cfg, cond, 1.0).tolist()
      [[0.0, 2.0]]
    """
    check_same_shape("noise_pred_text", noise_pred_text, "noise_cfg", noise_cfg)
    guidance_rescale = per_example_value("guidance_rescale", guidance_rescale, noise_cfg)
    axes = tuple(range(1, jnp.ndim(noise_cfg)))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    # A constant guided output (std 0) is left as is rather than turned into NaN, so a traced
    # guidance_rescale of 0 always equals plain CFG.
    ratio = jnp.where(std_cfg > 0, std_text / jnp.where(std_cfg > 0, std_cfg, 1), 1)
    rescaled = noise_cfg * ratio
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def classifier_free_guidance(
    uncond: jax.Array,
    cond: jax.Array,
    guidance_scale: float | jax.Array,
    guidance_rescale: float | jax.Array = 0.0,
) -> jax.Array:
    """``uncond + w * (cond - uncond)``, then `rescale_noise_cfg` when ``guidance_rescale`` may be non-zero.

    ``guidance_scale`` w and ``guidance_rescale`` are scalars or one value per example (shape
    ``(batch,)``): example b is then guided as a batch of one with ``w[b]`` would be.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import classifier_free_guidance
      >>> classifier_free_guidance(jnp.zeros((1, 2)), jnp.ones((1, 2)), 7.5).tolist()
      [[7.5, 7.5]]
      >>> classifier_free_guidance(jnp.zeros((2, 1)), jnp.ones((2, 1)), jnp.array([2.0, 5.0])).tolist()
      [[2.0], [5.0]]
    """
    check_same_shape("cond", cond, "uncond", uncond)
    guidance_scale = per_example_value("guidance_scale", guidance_scale, cond)
    per_example_value("guidance_rescale", guidance_rescale, cond)
    guided = uncond + guidance_scale * (cond - uncond)
    if isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0:
        return guided
    return rescale_noise_cfg(guided, cond, guidance_rescale)
