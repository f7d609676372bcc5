"""The forward (noising) process: `add_noise`, `get_velocity`, `scale_model_input`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ddim_jax._checks import (
    check_in,
    check_same_shape,
    check_state,
    check_timestep_shape,
    check_timesteps,
    compute_dtype,
    nan_unless,
    per_example,
    timestep_range,
)
from ddim_jax._state import DDIMState

__all__ = ["add_noise", "get_velocity", "scale_model_input"]


def _signal_and_noise_scales(
    state: DDIMState, timesteps: jax.Array, like: jax.Array, dtype: jnp.dtype
) -> tuple[jax.Array, jax.Array]:
    check_state(state)
    t, valid = check_timesteps("timesteps", timesteps, state.config.num_train_timesteps, like)
    ndim = jnp.ndim(like)
    alpha = per_example(state.alphas_cumprod[t], ndim).astype(dtype)
    one_minus = per_example(state.one_minus_alphas_cumprod[t], ndim).astype(dtype)
    # a traced timestep out of range: NaN scales, so NaN outputs (indexing would clamp it)
    return nan_unless(valid, (jnp.sqrt(alpha), jnp.sqrt(one_minus)))


def add_noise(
    state: DDIMState, original_samples: jax.Array, noise: jax.Array, timesteps: int | jax.Array
) -> jax.Array:
    """Diffuses x0 to x_t: ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` (diffusers ``add_noise``).

    ``1 - a_t`` comes from the state's float64-made table, not from float32 subtraction.

    Args:
      state: any state (timesteps need not be set).
      original_samples: x0, batch first.
      noise: standard normal noise, the shape of ``original_samples``.
      timesteps: an int, an int array of shape ``(batch,)``, or one holding one element
        (shape ``(1,)``, ...), which broadcasts over the batch as in diffusers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, add_noise
      >>> state = create_state(DDIMConfig())
      >>> x0 = jnp.ones((2, 4))
      >>> add_noise(state, x0, jax.random.normal(jax.random.key(0), x0.shape), jnp.array([0, 999])).shape
      (2, 4)
    """
    check_same_shape("noise", noise, "original_samples", original_samples)
    dtype = compute_dtype(original_samples, noise)
    signal, sigma = _signal_and_noise_scales(state, timesteps, original_samples, dtype)
    return signal * jnp.asarray(original_samples, dtype) + sigma * jnp.asarray(noise, dtype)


def get_velocity(
    state: DDIMState, sample: jax.Array, noise: jax.Array, timesteps: int | jax.Array
) -> jax.Array:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (diffusers ``get_velocity``).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, get_velocity
      >>> state = create_state(DDIMConfig())
      >>> get_velocity(state, jnp.zeros((1, 3)), jnp.ones((1, 3)), 0).shape
      (1, 3)
    """
    check_same_shape("noise", noise, "sample", sample)
    dtype = compute_dtype(sample, noise)
    signal, sigma = _signal_and_noise_scales(state, timesteps, sample, dtype)
    return signal * jnp.asarray(noise, dtype) - sigma * jnp.asarray(sample, dtype)


def scale_model_input(
    state: DDIMState, sample: jax.Array, timestep: int | jax.Array | None = None
) -> jax.Array:
    """DDIM needs no input scaling: returns ``sample`` unchanged (for API parity with diffusers).

    ``timestep`` is not used; when given, it is checked as `step` checks it, shape and range
    (any number type, as diffusers passes ``0.0`` here): a traced one outside [0, T) makes the
    result NaN, as everywhere.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, scale_model_input
      >>> scale_model_input(create_state(DDIMConfig()), jnp.ones(2)).tolist()
      [1.0, 1.0]
    """
    check_state(state)
    if timestep is None:
        return sample
    timestep = check_timestep_shape("timestep", timestep, sample)
    valid = check_in("timestep", timestep, timestep_range(state.config.num_train_timesteps))
    return nan_unless(valid, sample)
