"""Runtime-length schedules: S steps, S a traced int32, in tables padded to a static length M.

Layout of a padded state (``set_timesteps(state, S, max_steps=M)``): ``timesteps`` and
``prev_timesteps`` have shape ``(M,)``; entries ``[0, S)`` equal the static
``set_timesteps(state, S)``'s, entries ``[S, M)`` are ``-1`` (padding, never read by the loops);
``num_steps`` is the int32 scalar S. The shapes depend on M only, so every S in [1, M] runs
in the same compiled program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._config import DDIMConfig
from ddim_jax._schedule import inference_timesteps, previous_timesteps

__all__ = ["padded_schedule", "padded_prev_timesteps", "schedule_is_valid"]

PADDING = -1


def _round_half_even(p, q):
    """round(p / q) with ties to even (numpy's rule), in integers: p >= 0, q > 0."""
    quotient, remainder = p // q, p % q
    up = (2 * remainder > q) | ((2 * remainder == q) & (quotient % 2 == 1))
    return quotient + up


def _spaced(config: DDIMConfig, s, index):
    """The exact-rational form of diffusers' spacing: entry ``index`` of S = ``s`` steps.

    Works on numpy int64 and jax int32 arrays alike; numpy's float64 rounding departs from
    it at a few (S, index) pairs, which `_float64_corrections` records.
    """
    n_train = config.num_train_timesteps
    j = s - 1 - index  # ascending position
    if config.timestep_spacing == "linspace":
        denominator = s - 1 + (s == 1)  # S = 1: linspace(0, T - 1, 1) == [0]
        return _round_half_even(j * (n_train - 1) * (s > 1), denominator)
    if config.timestep_spacing == "leading":
        return j * (n_train // s) + config.steps_offset
    return _round_half_even(n_train * (s - index), s) - 1  # trailing


@functools.lru_cache(maxsize=64)
def _float64_corrections(config: DDIMConfig, max_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, index, delta) of every entry where the static (numpy float64) schedule differs from
    `_spaced`, for S in [1, max_steps]: a few hundred entries at T = 1000, computed once."""
    steps, indices, deltas = [], [], []
    for s in range(1, max_steps + 1):
        index = np.arange(s)
        reference = inference_timesteps(config, s)
        delta = reference - _spaced(config, s, index)
        (where,) = np.nonzero(delta)
        steps.append(np.full(where.size, s))
        indices.append(where)
        deltas.append(delta[where])
    return tuple(np.concatenate(parts).astype(np.int32) for parts in (steps, indices, deltas))


def padded_schedule(config: DDIMConfig, num_steps: jax.Array, max_steps: int) -> jax.Array:
    """The ``(max_steps,)`` int32 timesteps of ``num_steps`` steps, padded with -1."""
    index = jnp.arange(max_steps, dtype=jnp.int32)
    s = jnp.clip(num_steps, 1, max_steps)  # an S out of range is flagged by schedule_is_valid
    timesteps = _spaced(config, s, index).astype(jnp.int32)
    steps, indices, deltas = _float64_corrections(config, max_steps)
    if steps.size:
        target = jnp.where(steps == s, indices, max_steps)  # out of bounds: dropped
        timesteps = timesteps.at[target].add(deltas, mode="drop")
    return jnp.where(index < num_steps, timesteps, PADDING)


def padded_prev_timesteps(config: DDIMConfig, timesteps: jax.Array, num_steps: jax.Array) -> jax.Array:
    """``prev_timesteps`` for padded ``timesteps`` per ``config.prev_timestep_rule``."""
    index = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
    prev = previous_timesteps(config, timesteps, num_steps)
    return jnp.where(index < num_steps, prev, PADDING).astype(jnp.int32)


def schedule_is_valid(timesteps: jax.Array, num_steps, start_step, num_train_timesteps: int) -> jax.Array:
    """A traced bool: 1 <= S <= M, 0 <= start_step < S, and the first S timesteps strictly
    descending in [0, T). The loops turn a False into a NaN-filled output."""
    index = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
    live = index < num_steps
    in_range = (timesteps >= 0) & (timesteps < num_train_timesteps)
    descending = timesteps > jnp.roll(timesteps, -1)
    return (
        (num_steps >= 1)
        & (num_steps <= timesteps.shape[0])
        & (start_step >= 0)
        & (start_step < num_steps)
        & jnp.all(in_range | ~live)
        & jnp.all(descending | (index + 1 >= num_steps))
    )
