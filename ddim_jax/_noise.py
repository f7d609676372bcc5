"""The eta noise: drawn from one key for the whole batch, or from one key per example.

One key per example (``jax.random.split(key, batch)``, like diffusers' list of generators)
makes each example's noise depend on its own key alone: the same samples come out whatever
the batch size, batch order or device count, also inside ``jax.shard_map`` and ``jax.pmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def key_batch_shape(key: object) -> tuple[int, ...] | None:
    """The shape of an array of keys, key data aside: ``()`` for one key, ``(batch,)`` for one
    per example; None for a non-key. Typed keys (``jax.random.key``) have that shape; legacy
    uint32 ``PRNGKey`` data has one more axis, the key data."""
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return shape
    if dtype == jnp.uint32 and len(shape) >= 1:
        return shape[:-1]
    return None


def is_per_example(key: jax.Array) -> bool:
    """True for a batch of keys (typed ``(batch,)`` or legacy uint32 ``(batch, k)``)."""
    return len(key_batch_shape(key)) == 1


def step_keys(key: jax.Array, num_steps: int) -> jax.Array:
    """The key of each step, stacked along a new leading axis of length ``num_steps``.

    Step i uses ``split(key, num_steps)[i]``, per example for a batch of keys.

    Example:
      >>> import jax
      >>> step_keys(jax.random.key(0), 5).shape
      (5,)
      >>> step_keys(jax.random.split(jax.random.key(0), 3), 5).shape
      (5, 3)
    """
    if is_per_example(key):
        return jax.vmap(lambda k: jax.random.split(k, num_steps), out_axes=1)(key)
    return jax.random.split(key, num_steps)


def normal_noise(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """Standard normal noise of ``shape``; a batch of keys draws row ``b`` from ``key[b]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> noise = normal_noise(keys, (3, 4), jnp.float32)
      >>> bool(jnp.all(noise[1] == normal_noise(keys[1:2], (1, 4), jnp.float32)[0]))
      True
    """
    if is_per_example(key):
        return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)
    return jax.random.normal(key, shape, dtype)
