"""DDIM inversion: `inverse_step` (diffusers ``DDIMInverseScheduler.step``) and the `invert` loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import (
    check_ready,
    check_same_shape,
    check_sample_prediction_start,
    check_state_timesteps,
    check_timesteps,
    compute_dtype,
    is_traced,
    nan_unless,
)
from ddim_jax._config import DDIMConfig
from ddim_jax._loop import Method, ModelFn, Plan, Prepared, Supports, Trajectory, run_loop, takes_options
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


@takes_options()
def invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    **options: Any,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Encodes a clean sample to noise by running `inverse_step` over the ascending schedule.

    One ``lax.scan``; the arguments mean what they mean for `sample` (a ``guider`` sees
    ``info.inverse`` True: `cfg_pp` then swaps its two outputs, as CFG++'s inversion does).
    Sampling the result with the same state and eta = 0 reconstructs ``x0`` (closely, for enough steps). With
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
    method = inversion_method(Supports("invert", inverse=True))
    return run_loop(method, model_fn, state, x0, options)


def inversion_method(supports: Supports) -> Method:
    """DDIM inversion as a `Method`: `inverse_step` at each entry, the schedule last to first."""

    def check(state: DDIMState) -> None:
        check_sample_prediction_start(state.config, supports.name)

    def prepare(state: DDIMState, x0: Any, plan: Plan) -> Prepared:
        config, dtype = state.config, plan.dtype
        # Every step's scalars are computed once, before the loop: a step is one elementwise pass.
        alphas_source = alpha_at(state, _source_timestep(state, state.timesteps)).astype(dtype)
        alphas = alpha_at(state, state.timesteps).astype(dtype)
        coefs = _inverse_coefficients(config, alphas_source, alphas)

        def step(model, x, coef):
            return _inverse_update(config, coef, model(x), x)

        return Prepared(jnp.asarray(x0, dtype), state.timesteps, step, coefs)

    return Method(supports, "x0", True, prepare, check=check)
