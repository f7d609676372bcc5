"""Input checks shared by the public functions: Python-time errors that name the parameter.

The checks on plain values live one level down, in `ddim_jax._values` (re-exported here);
this module adds the ones that know the scheduler state, the noise keys and the timesteps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._noise import key_batch_shape
from ddim_jax._padded import schedule_is_valid
from ddim_jax._state import DDIMState, check_state
from ddim_jax._values import (
    FINITE,
    Interval,
    as_int32,
    check_bool,
    check_fraction,
    check_in,
    check_positive_int,
    check_same_shape,
    check_static_bools,
    compute_dtype,
    is_int_scalar,
    is_traced,
    nan_unless,
    numeric,
    shown,
)

__all__ = [
    "as_int32",
    "check_eta",
    "check_fraction",
    "check_in",
    "check_invertible_config",
    "check_key",
    "check_latents",
    "check_positive_int",
    "check_bool",
    "check_ready",
    "check_same_shape",
    "check_sample_prediction_start",
    "check_state",
    "check_state_timesteps",
    "check_static_bools",
    "check_static_schedule",
    "check_timestep_shape",
    "check_timesteps",
    "compute_dtype",
    "ETA",
    "FINITE",
    "eta_in_range",
    "Interval",
    "is_int_scalar",
    "is_traced",
    "latent_pair",
    "nan_unless",
    "numeric",
    "per_example",
    "shown",
    "timestep_range",
]


def check_ready(state: DDIMState, fn: str) -> None:
    check_state(state)
    if state.timesteps is None:
        raise ValueError(f"{fn} needs timesteps: call set_timesteps(state, num_inference_steps) first")


def check_static_schedule(state: DDIMState, fn: str) -> None:
    """For loops that need S as a shape: rejects a runtime-length (padded) schedule."""
    if state.has_runtime_length:
        raise ValueError(
            f"{fn} needs a static schedule, set_timesteps(state, num_inference_steps) with a Python "
            f"int; got a runtime-length one (set_timesteps(..., max_steps={state.max_steps}))"
        )


def check_timestep_shape(name: str, timesteps: Any, sample: Any) -> Any:
    """Accepts a scalar, one timestep per example ``(batch,)``, or one element of any shape
    (``(1,)``, ``(1, 1)``, ...), which broadcasts over the batch as in diffusers; returns the
    timesteps as a scalar or ``(batch,)`` array-like."""
    if isinstance(timesteps, (list, tuple)):
        timesteps = np.asarray(timesteps)
    shape = jnp.shape(timesteps)
    batch = jnp.shape(sample)[:1]
    if shape in ((), batch):
        return timesteps
    if math.prod(shape) == 1:
        return jnp.reshape(timesteps, ())
    raise ValueError(
        f"{name} must be a scalar, have shape (batch,) = {batch}, or hold one element "
        f"(e.g. shape (1,)), got shape {shape}"
    )


def check_timesteps(
    name: str, timesteps: Any, num_train_timesteps: int, sample: Any
) -> tuple[jax.Array, bool | jax.Array]:
    """Checks a scalar, per-example ``(batch,)`` or one-element timestep (see
    `check_timestep_shape`) and its range by `check_in`; returns ``(int32 timesteps, valid)``."""
    timesteps = check_timestep_shape(name, numeric(name, timesteps), sample)
    if not jnp.issubdtype(jnp.result_type(timesteps), jnp.integer):
        raise TypeError(f"{name} must hold integers, got dtype {jnp.result_type(timesteps)}")
    valid = check_in(name, timesteps, timestep_range(num_train_timesteps))
    return as_int32(timesteps), valid


def timestep_range(num_train_timesteps: int) -> Interval:
    return Interval(0, num_train_timesteps, high_open=True, high_name="num_train_timesteps")


def check_state_timesteps(state: DDIMState, timesteps: jax.Array) -> bool | jax.Array:
    """For `step` and `inverse_step`, the schedule-dependent half of the timestep rule: with
    ``prev_timestep_rule="schedule"`` a timestep must be in ``state.timesteps`` (known values
    are checked where the previous timestep is looked up), and a traced runtime-length
    schedule must be valid (`schedule_is_valid`; known ones were checked by `set_timesteps`).
    Returns True or a traced verdict for `nan_unless`."""
    valid = True
    traced = is_traced(timesteps) or is_traced(state.timesteps)
    if state.config.prev_timestep_rule == "schedule" and traced:
        valid = jnp.all(jnp.any(jnp.expand_dims(timesteps, -1) == state.timesteps, axis=-1))
    if state.has_runtime_length and (is_traced(state.num_steps) or is_traced(state.timesteps)):
        num_train = state.config.num_train_timesteps
        valid = valid & schedule_is_valid(state.timesteps, state.num_steps, 0, num_train)
    return valid


def check_key(key: Any, batch_shape: tuple[int, ...]) -> None:
    """One key for the whole batch, or one key per example along the batch axis.

    Typed keys (``jax.random.key``) have shape ``()`` or ``(batch,)``; legacy uint32
    ``PRNGKey`` data has shape ``(k,)`` or ``(batch, k)``.
    """
    if key is None:
        return
    keys_shape = key_batch_shape(key)
    if keys_shape is None or len(keys_shape) > 1:
        dtype, shape = getattr(key, "dtype", None), jnp.shape(key)
        raise TypeError(
            "key must be a jax.random key, e.g. jax.random.key(0), or one key per example, e.g. "
            f"jax.random.split(key, batch); got {type(key).__name__} with dtype {dtype} and shape {shape}"
        )
    if keys_shape and keys_shape != tuple(batch_shape):
        expected = f"batch = {batch_shape[0]}" if batch_shape else "a batch axis, which is missing"
        raise ValueError(f"key holds {keys_shape[0]} keys: one key per example needs {expected}")


ETA = Interval(0, 1)
ETA_REASON = " (DDIM's eta: 0 deterministic, 1 the DDPM posterior variance)"


def eta_in_range(eta: Any) -> bool | jax.Array:
    """`check_in` for eta: raises for a known eta outside [0, 1], returns the traced verdict."""
    return check_in("eta", eta, ETA, ETA_REASON)


def check_eta(eta: Any, key: Any, variance_noise: Any, batch_shape: tuple[int, ...]) -> bool:
    """Validates eta against the noise sources; returns whether noise is added at all."""
    check_key(key, batch_shape)
    if key is not None and variance_noise is not None:
        raise ValueError("pass either key or variance_noise, not both")
    eta = numeric("eta", eta)
    if jnp.ndim(eta) != 0:
        raise ValueError(f"eta must be a scalar, got shape {jnp.shape(eta)}")
    if is_traced(eta):
        if key is None and variance_noise is None:
            raise ValueError(
                "eta is traced, so its value cannot be checked: pass key or variance_noise "
                "(or a Python float eta of 0.0 for deterministic DDIM)"
            )
        return True
    value = float(eta)
    eta_in_range(value)
    if value > 0 and key is None and variance_noise is None:
        raise ValueError(f"eta={value} > 0 needs a noise source: pass key or variance_noise")
    return value > 0


def per_example(values: jax.Array, ndim: int) -> jax.Array:
    """Reshapes scalar or ``(batch,)`` values to broadcast against an ``ndim`` array."""
    return values if jnp.ndim(values) == 0 else values.reshape(values.shape + (1,) * (ndim - 1))


def check_invertible_config(config: Any, fn: str) -> None:
    """Exact inversion undoes each step algebraically, which clipping or thresholding x0 prevents."""
    if config.clip_sample or config.thresholding:
        raise ValueError(
            f"{fn} needs a config with clip_sample=False and thresholding=False (clipping x0 cannot "
            f"be undone exactly), got clip_sample={config.clip_sample}, thresholding={config.thresholding}"
        )


def check_sample_prediction_start(config: Any, fn: str) -> None:
    """An inversion's first step starts from the final alpha; with an x0 prediction and
    ``set_alpha_to_one`` that is alpha_cumprod = 1, where the implied noise divides by zero."""
    if config.prediction_type == "sample" and config.set_alpha_to_one:
        raise ValueError(
            f"{fn} with prediction_type='sample' needs set_alpha_to_one=False: the first inversion "
            "step starts from alpha_cumprod = 1 (no noise), where the noise implied by an x0 "
            "prediction, (x - sqrt(a) x0) / sqrt(1 - a), divides by zero (diffusers' "
            "DDIMInverseScheduler returns inf or NaN there)"
        )


def check_latents(name: str, latents: Any, fn: str) -> None:
    """One latents array: a coupled pair (`EDICTLatents`, `BDIALatents`) or a Python sequence
    gets a TypeError that says what to pass instead."""
    if hasattr(latents, "_fields"):  # a coupled pair: its class names the loops it goes with
        kind = type(latents).__name__
        raise TypeError(
            f"{fn} takes {name} as one array, got a {kind} pair: "
            f"{kind} come from and go to {getattr(type(latents), 'loops', 'its own loop')}"
        )
    if isinstance(latents, (list, tuple, range)):
        raise TypeError(
            f"{fn} takes {name} as one array (batch first), got a Python {type(latents).__name__}: "
            "stack the examples first, e.g. jnp.stack(examples)"
        )


def latent_pair(latents: Any, pair: type) -> tuple[Any, Any] | None:
    """The two arrays of a coupled-latents ``pair`` (a 2-sequence, or the ``pair`` NamedTuple
    itself), or None for a single array; another loop's pair gets a TypeError."""
    if not isinstance(latents, (tuple, list)):
        return None
    names = pair._fields
    fields = getattr(latents, "_fields", names)
    if tuple(fields) != tuple(names):
        other = getattr(type(latents), "loops", "another loop")
        raise TypeError(
            f"latents must be one array or {pair.__name__}{tuple(names)}, got a {type(latents).__name__}: "
            f"it comes from {other}, whose steps differ"
        )
    if len(latents) != 2:
        raise ValueError(f"latents must be one array or a pair {names}, got a sequence of {len(latents)}")
    check_same_shape(f"latents.{names[1]}", latents[1], f"latents.{names[0]}", latents[0])
    return latents[0], latents[1]
