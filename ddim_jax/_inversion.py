"""DDIM inversion: `inverse_step` (diffusers ``DDIMInverseScheduler.step``) and the `invert` loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import (
    check_latents,
    check_ready,
    check_same_shape,
    check_sample_prediction_start,
    check_state_timesteps,
    check_static_bools,
    check_timesteps,
    compute_dtype,
    is_traced,
    nan_unless,
)
from ddim_jax._config import DDIMConfig
from ddim_jax._loop import (
    ModelCall,
    ModelFn,
    StepCallback,
    Trajectory,
    check_loop_options,
    check_schedule_options,
    run_steps,
)
from ddim_jax._state import DDIMState
from ddim_jax._step import (
    Alphas,
    StepCoefficients,
    StepOutput,
    alpha_at,
    ddim_update,
    prev_timestep,
    step_coefficients,
)

__all__ = ["inverse_step", "invert"]


def _inverse_coefficients(config: DDIMConfig, alpha_t: Alphas, alpha_next: Alphas) -> StepCoefficients:
    """An inversion step is a deterministic DDIM update from t's alpha to the noisier t_next's."""
    return step_coefficients(config, alpha_t, alpha_next, 0.0, add_noise=False)


def _inverse_update(
    config: DDIMConfig, coef: StepCoefficients, model_output: jax.Array, sample: jax.Array
) -> StepOutput:
    # diffusers' inverse scheduler clips x0 per clip_sample but never thresholds it.
    return ddim_update(config, coef, model_output, sample, noise=None, allow_thresholding=False)


def _source_timestep(state: DDIMState, timesteps: jax.Array) -> jax.Array:
    """The noise level an inversion step to ``timesteps`` starts from (-1: the initial alpha)."""
    return jnp.minimum(prev_timestep(state, timesteps), state.config.num_train_timesteps - 1)


def inverse_step(
    state: DDIMState, model_output: jax.Array, timestep: int | jax.Array, sample: jax.Array
) -> StepOutput:
    """One deterministic DDIM inversion step, up to the noisier ``timestep``.

    Matches diffusers ``DDIMInverseScheduler.step`` for the same config: the sample sits at
    the schedule entry before ``timestep`` (``timestep - T // S`` by diffusers' rule), the
    model output is evaluated at ``timestep``, and x0 is clipped per ``clip_sample``
    (the inverse scheduler applies no dynamic thresholding).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, inverse_step
      >>> state = set_timesteps(create_state(DDIMConfig()), 10)
      >>> x = jnp.ones((1, 3))
      >>> inverse_step(state, jnp.zeros_like(x), state.timesteps[-1], x).prev_sample.shape
      (1, 3)
    """
    check_ready(state, "inverse_step")
    check_same_shape("model_output", model_output, "sample", sample)
    t, valid = check_timesteps("timestep", timestep, state.config.num_train_timesteps, sample)
    valid = valid & check_state_timesteps(state, t)
    source = _source_timestep(state, t)
    config = state.config
    if config.prediction_type == "sample" and config.set_alpha_to_one:
        if is_traced(source):
            valid = valid & jnp.all(source >= 0)  # NaN, not inf
        elif bool((source < 0).any()):
            check_sample_prediction_start(config, "inverse_step from the schedule's first timestep")
    dtype = compute_dtype(model_output, sample)
    alpha_t = alpha_at(state, source).astype(dtype)
    alpha_next = alpha_at(state, t).astype(dtype)
    coef = _inverse_coefficients(state.config, alpha_t, alpha_next).per_example(jnp.ndim(sample))
    out = _inverse_update(state.config, coef, jnp.asarray(model_output, dtype), jnp.asarray(sample, dtype))
    return nan_unless(valid, out)


def invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    *,
    model_args: tuple = (),
    guidance_scale: float | jax.Array | None = None,
    guidance_rescale: float | jax.Array = 0.0,
    guidance_layout: str = "concat",
    model_dtype: Any = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    remat: bool = False,
    start_step: int | jax.Array = 0,
    unroll: int = 1,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Encodes a clean sample to noise by running `inverse_step` over the ascending schedule.

    One ``lax.scan``; the arguments mean what they mean for `sample`. Sampling the result
    with the same state and eta = 0 reconstructs ``x0`` (closely, for enough steps). With
    ``start_step`` the inversion stops at ``state.timesteps[start_step]``, where
    ``sample(..., start_step=start_step)`` begins (partial inversion for editing). A
    runtime-length state or a traced ``start_step`` runs the runtime-length loop, as in
    `sample` (S - start_step model calls, NaN output for out-of-range traced values);
    ``unroll`` is as in `sample`.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, invert, sample
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 1000)
      >>> model_fn = lambda x, t: 0.5 * x
      >>> x0 = jnp.full((1, 2), 0.3)
      >>> x_T = invert(model_fn, state, x0)
      >>> bool(jnp.allclose(sample(model_fn, state, x_T), x0, atol=5e-3))
      True
    """
    check_ready(state, "invert")
    check_latents("x0", x0, "invert")
    check_static_bools(return_trajectory=return_trajectory, remat=remat)
    check_loop_options(x0, callback, callback_every)
    runtime, start, unroll = check_schedule_options("invert", state, start_step, remat, unroll)
    model = ModelCall(model_fn, model_args, guidance_scale, guidance_rescale, guidance_layout, model_dtype)
    model.check()
    config = state.config
    check_sample_prediction_start(config, "invert")
    dtype = compute_dtype(x0)
    # runtime: all M entries in schedule order, visited from S - 1 down to start
    timesteps = state.timesteps if runtime else state.timesteps[start:][::-1]
    # Every step's scalars are computed once, before the scan: a step is one elementwise pass.
    alphas_source = alpha_at(state, _source_timestep(state, timesteps)).astype(dtype)
    coefs = _inverse_coefficients(config, alphas_source, alpha_at(state, timesteps).astype(dtype))

    def update(x, step_inputs):
        t, coef = step_inputs
        return _inverse_update(config, coef, model(x, t), x)

    return run_steps(
        update,
        jnp.asarray(x0, dtype),
        (timesteps, coefs),
        state,
        runtime=runtime,
        start=start,
        reverse=True,
        return_trajectory=return_trajectory,
        callback=callback,
        callback_every=callback_every,
        remat=remat,
        unroll=unroll,
    )
