"""Machinery shared by the `sample` and `invert` loops: the guided model call and the scan."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_same_shape
from ddim_jax._guidance import classifier_free_guidance
from ddim_jax._step import StepOutput

__all__ = ["Trajectory", "ModelFn", "StepCallback"]

ModelFn = Callable[..., jax.Array]
"""``model_fn(x, t, *model_args) -> model_output``; ``t`` is an int32 scalar array."""

StepCallback = Callable[[jax.Array, jax.Array, jax.Array], Any]
"""``callback(step_index, timestep, pred_original_sample)``, run on the host."""


class Trajectory(NamedTuple):
    """Per-step outputs stacked along a new leading axis of length S (steps in loop order).

    Attributes:
      prev_sample: ``(S, *latents.shape)``, the sample after each step.
      pred_original_sample: ``(S, *latents.shape)``, the predicted x0 at each step.
    """

    prev_sample: jax.Array
    pred_original_sample: jax.Array


def check_loop_options(
    latents: Any, model_args: Any, callback: Any, callback_every: Any, model_dtype: Any
) -> None:
    if not jnp.issubdtype(jnp.result_type(latents), jnp.floating):
        raise TypeError(f"latents must be a float array, got dtype {jnp.result_type(latents)}")
    if jnp.ndim(latents) < 1:
        raise ValueError("latents must have a leading batch axis, got a scalar")
    if not isinstance(model_args, tuple):
        raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    try:
        every = operator.index(callback_every)
    except TypeError:
        every = 0
    if every < 1:
        raise ValueError(f"callback_every must be an int >= 1, got {callback_every!r}")
    if model_dtype is not None and not jnp.issubdtype(model_dtype, jnp.floating):
        raise TypeError(f"model_dtype must be a float dtype or None, got {model_dtype!r}")


def guided_model_output(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    model_args: tuple,
    guidance_scale: float | jax.Array | None,
    guidance_rescale: float | jax.Array,
    model_dtype: Any,
) -> jax.Array:
    """Calls the model (once, on the ``[x, x]`` batch when guided) and returns a float32 output."""
    x_in = x if model_dtype is None else x.astype(model_dtype)
    if guidance_scale is None:
        out = model_fn(x_in, t, *model_args)
        check_same_shape("model_fn output", out, "latents", x)
        return out.astype(x.dtype)
    out = model_fn(jnp.concatenate([x_in, x_in]), t, *model_args)
    expected = (2 * x.shape[0],) + x.shape[1:]
    if jnp.shape(out) != expected:
        raise ValueError(
            f"Shape mismatch: with guidance_scale, model_fn must return the doubled batch "
            f"[uncond, cond] of shape {expected}, got {jnp.shape(out)}"
        )
    uncond, cond = jnp.split(out.astype(x.dtype), 2)
    return classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)


def scan_steps(
    update: Callable[[jax.Array, Any], StepOutput],
    x: jax.Array,
    xs: tuple,
    *,
    return_trajectory: bool,
    callback: StepCallback | None,
    callback_every: int,
    remat: bool,
) -> tuple[jax.Array, Trajectory | None]:
    """Runs ``update`` over ``xs = (timesteps, ...)`` in one ``lax.scan``.

    ``update(x, xs_i)`` returns a `StepOutput`; with ``remat`` each step's activations are
    recomputed on the backward pass (``jax.checkpoint``).
    """
    timesteps = xs[0]
    num_steps = timesteps.shape[0]
    step_fn = jax.checkpoint(update) if remat else update

    def body(x, inputs):
        index, step_inputs = inputs
        out = step_fn(x, step_inputs)
        if callback is not None:
            due = (index % callback_every == 0) | (index == num_steps - 1)
            jax.lax.cond(
                due,
                lambda: jax.debug.callback(callback, index, step_inputs[0], out.pred_original_sample),
                lambda: None,
            )
        return out.prev_sample, (Trajectory(*out) if return_trajectory else None)

    indices = jnp.arange(num_steps, dtype=jnp.int32)
    x, trajectory = jax.lax.scan(body, x, (indices, xs))
    return x, trajectory
