"""`step`: one DDIM update x_t -> x_{t_prev}, with diffusers' arithmetic."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._checks import (
    check_eta,
    check_ready,
    check_same_shape,
    check_state_timesteps,
    check_static_bools,
    check_timesteps,
    compute_dtype,
    eta_in_range,
    is_traced,
    nan_unless,
    per_example,
)
from ddim_jax._config import DDIMConfig
from ddim_jax._noise import normal_noise
from ddim_jax._schedule import previous_timesteps
from ddim_jax._state import DDIMState

__all__ = ["GuidedOutput", "StepOutput", "step", "MIN_ALPHA_CUMPROD"]

# Stand-in for an alpha_cumprod(t) of exactly 0 when converting an epsilon prediction to x0:
# a zero-terminal-SNR schedule's last entry (alphas_cumprod[T-1] == 0), where diffusers' DDIM
# divides by zero and returns inf/NaN; diffusers' Euler, DPM-Solver and UniPC schedulers set
# that entry to the same value. Only exact zeros are replaced: positive entries, even smaller
# ones (squaredcos_cap_v2 ends at ~2.4e-9), are used as they are, as diffusers does.
MIN_ALPHA_CUMPROD = 2.0**-24


class StepOutput(NamedTuple):
    """Result of one scheduler step.

    Attributes:
      prev_sample: the sample at the previous (less noisy) timestep.
      pred_original_sample: the model's predicted x0 after clipping or thresholding.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, step
      >>> state = set_timesteps(create_state(DDIMConfig()), 10)
      >>> prev_sample, x0 = step(state, jnp.zeros((1, 2)), 900, jnp.ones((1, 2)))
      >>> x0.shape
      (1, 2)
    """

    prev_sample: jax.Array
    pred_original_sample: jax.Array


class GuidedOutput(NamedTuple):
    """A model output split in two for the DDIM step (CFG++): x0 from one, epsilon from the other.

    A guider may return this instead of one array: the step predicts x0 from ``denoise`` and
    takes the direction to the next noise level (epsilon) from ``renoise``. One array ``m`` is
    ``GuidedOutput(m, m)``.

    Attributes:
      denoise: the output the step predicts x0 from.
      renoise: the output the step re-noises with (its epsilon).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import GuidedOutput
      >>> GuidedOutput(jnp.zeros(2), jnp.ones(2)).renoise.tolist()
      [1.0, 1.0]
    """

    denoise: jax.Array
    renoise: jax.Array


def safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(max(x, 0)) with a zero (not NaN) gradient at and below 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


class Alphas(NamedTuple):
    """alpha_cumprod at some timesteps and ``1 - alpha_cumprod``, both read from tables made in
    float64: the complement then keeps its digits where alpha_cumprod is close to 1, which
    ``1 - alpha`` in float32 would lose (diffusers' float32 rounding at small t)."""

    alpha: jax.Array
    one_minus: jax.Array

    def astype(self, dtype: jnp.dtype) -> Alphas:
        return Alphas(self.alpha.astype(dtype), self.one_minus.astype(dtype))


def alpha_at(state: DDIMState, timesteps: jax.Array) -> Alphas:
    """alphas_cumprod[t] and its complement, or the final alpha's where t < 0."""
    index, valid = jnp.maximum(timesteps, 0), timesteps >= 0
    return Alphas(
        jnp.where(valid, state.alphas_cumprod[index], state.final_alpha_cumprod),
        jnp.where(valid, state.one_minus_alphas_cumprod[index], state.final_one_minus_alpha_cumprod),
    )


class StepCoefficients(NamedTuple):
    """The scalars of a DDIM update from t to t_prev: scalars, or one per example or per step.

    `sample` computes them for all S steps before its scan, so a step inside the loop is one
    elementwise pass over the latents with no per-step scalar work.
    """

    sqrt_alpha: jax.Array  # sqrt(a_t); 2**-12 for an epsilon prediction where a_t == 0
    inv_sqrt_alpha: jax.Array  # 1 / sqrt_alpha (x0 from epsilon: a multiply, not a divide)
    sqrt_one_minus: jax.Array  # sqrt(1 - a_t)
    sqrt_alpha_prev: jax.Array  # sqrt(a_prev): the weight of x0
    direction: jax.Array  # sqrt(1 - a_prev - std^2): the weight of epsilon
    std: jax.Array  # eta * sigma_t: the weight of the noise

    def per_example(self, ndim: int) -> StepCoefficients:
        return StepCoefficients(*(per_example(c, ndim) for c in self))


def step_coefficients(
    config: DDIMConfig, alpha_t: Alphas, alpha_prev: Alphas, eta: jax.Array | float, add_noise: bool
) -> StepCoefficients:
    """The update's scalars from the alphas at t and t_prev (any matching shapes)."""
    (a_t, om_t), (a_prev, om_prev) = alpha_t, alpha_prev  # om: one minus alpha
    sqrt_alpha = jnp.sqrt(a_t)
    if config.prediction_type == "epsilon":
        sqrt_alpha = jnp.where(a_t > 0, sqrt_alpha, MIN_ALPHA_CUMPROD**0.5)
    if not add_noise:
        direction, std = jnp.sqrt(om_prev), jnp.zeros_like(a_t)
    else:
        # diffusers' (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), with 1 - a_t / a_prev as the
        # difference that keeps its digits: (a_prev - a_t) / a_prev for small alphas (high
        # noise), (om_t - om_prev) / a_prev for alphas close to 1 (low noise).
        alpha_gap = jnp.where(a_prev < 0.5, a_prev - a_t, om_t - om_prev)
        std = eta * safe_sqrt(om_prev / om_t * (alpha_gap / a_prev))
        # diffusers' sqrt(1 - a_prev - std^2), rearranged so that no terms cancel for eta <= 1:
        # (1 - a_prev) ((1 - eta^2)(1 - a_t) + eta^2 a_t (1 - a_prev) / a_prev) / (1 - a_t).
        # The direct form rounds below 0 at eta = 1 in float32 (diffusers #5969: NaN); this one
        # is >= 0 and exactly 0 where the exact value is (a_prev = 1, or a_t = 0 at eta = 1).
        eta2 = eta**2
        direction = safe_sqrt(om_prev * ((1 - eta2) * om_t + eta2 * a_t * om_prev / a_prev) / om_t)
    inv_sqrt_alpha = 1 / jnp.where(sqrt_alpha > 0, sqrt_alpha, 1.0)  # (unused where a_t == 0)
    return StepCoefficients(sqrt_alpha, inv_sqrt_alpha, jnp.sqrt(om_t), jnp.sqrt(a_prev), direction, std)


def predict_x0_and_eps(
    config: DDIMConfig, model_output: jax.Array, sample: jax.Array, coef: StepCoefficients
) -> tuple[jax.Array, jax.Array]:
    """Converts the model output to (x0, epsilon) for the config's prediction type; a
    `GuidedOutput` gives x0 from its ``denoise`` part and epsilon from its ``renoise`` part."""
    if isinstance(model_output, GuidedOutput):
        x0, _ = predict_x0_and_eps(config, model_output.denoise, sample, coef)
        return x0, predict_x0_and_eps(config, model_output.renoise, sample, coef)[1]
    sqrt_a, sqrt_om = coef.sqrt_alpha, coef.sqrt_one_minus
    if config.prediction_type == "epsilon":
        return (sample - sqrt_om * model_output) * coef.inv_sqrt_alpha, model_output
    if config.prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_om
    x0 = sqrt_a * sample - sqrt_om * model_output  # v_prediction
    return x0, sqrt_a * model_output + sqrt_om * sample


def dynamic_threshold(config: DDIMConfig, x0: jax.Array) -> jax.Array:
    """Imagen dynamic thresholding, per example along the leading (batch) axis."""
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), config.dynamic_thresholding_ratio, axis=1)
    s = jnp.clip(s, 1.0, config.sample_max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(config: DDIMConfig, x0: jax.Array, allow_thresholding: bool = True) -> jax.Array:
    if config.thresholding and allow_thresholding:
        return dynamic_threshold(config, x0)
    if config.clip_sample:
        return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


def ddim_update(
    config: DDIMConfig,
    coef: StepCoefficients,
    model_output: jax.Array,
    sample: jax.Array,
    *,
    noise: jax.Array | None,
    use_clipped_model_output: bool = False,
    allow_thresholding: bool = True,
) -> StepOutput:
    """The DDIM update on compute-dtype arrays; coefficients already broadcast against sample."""
    x0, eps = predict_x0_and_eps(config, model_output, sample, coef)
    x0 = clip_or_threshold(config, x0, allow_thresholding)
    if use_clipped_model_output:
        if isinstance(model_output, GuidedOutput):
            raise ValueError(
                "use_clipped_model_output=True recomputes epsilon from the clipped x0, which would "
                "drop a split guided output's renoise part (CFG++): pass use_clipped_model_output=False"
            )
        eps = (sample - coef.sqrt_alpha * x0) / coef.sqrt_one_minus
    prev = coef.sqrt_alpha_prev * x0 + coef.direction * eps
    if noise is not None:
        prev = prev + coef.std * noise
    return StepOutput(prev, x0)


def prev_timestep(state: DDIMState, timesteps: jax.Array) -> jax.Array:
    """The timestep a step from ``timesteps`` moves to, per ``config.prev_timestep_rule``."""
    config = state.config
    if config.prev_timestep_rule == "diffusers":  # elementwise: any timestep
        return previous_timesteps(config, timesteps, state.num_inference_steps)
    # "schedule": the entry after the timestep's own, read from the state's table
    if not is_traced(timesteps) and not is_traced(state.timesteps):  # else check_state_timesteps
        missing = np.setdiff1d(np.asarray(timesteps), np.asarray(state.timesteps))
        if missing.size:
            raise ValueError(
                "with prev_timestep_rule='schedule', timestep must be one of state.timesteps; "
                f"got {missing.tolist()}"
            )
    index = jnp.argmax(jnp.expand_dims(timesteps, -1) == state.timesteps, axis=-1)
    return state.prev_timesteps[index]


def step(
    state: DDIMState,
    model_output: jax.Array,
    timestep: int | jax.Array,
    sample: jax.Array,
    *,
    eta: float | jax.Array = 0.0,
    key: jax.Array | None = None,
    variance_noise: jax.Array | None = None,
    use_clipped_model_output: bool = False,
) -> StepOutput:
    """One DDIM step from ``timestep`` to the previous timestep (diffusers ``DDIMScheduler.step``).

    Args:
      state: a state after `set_timesteps`.
      model_output: the model's prediction (epsilon, x0 or v per ``prediction_type``),
        the shape of ``sample``; any float dtype.
      timestep: the current timestep: a Python int, a traced int scalar, an int array
        of shape ``(batch,)`` giving each example its own timestep, or an array holding one
        element (shape ``(1,)``, ...), which broadcasts over the batch as in diffusers.
      sample: the current noisy sample x_t, batch first.
      eta: DDIM's eta in [0, 1] (0 deterministic, 1 DDPM-like); a float or a traced scalar.
      key: a ``jax.random`` key for the eta noise, or one key per example (shape ``(batch,)``,
        e.g. ``jax.random.split(key, batch)``): example b's noise then comes from ``key[b]``.
      variance_noise: the eta noise itself (shape of ``sample``), instead of ``key``.
      use_clipped_model_output: recompute epsilon from the clipped x0 (diffusers' flag).

    Returns:
      `StepOutput` ``(prev_sample, pred_original_sample)``, in float32 (float64 when
      ``sample`` or ``model_output`` is float64 and x64 is enabled), whatever the model's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, step
      >>> state = set_timesteps(create_state(DDIMConfig()), 10)
      >>> x = jnp.ones((2, 3))
      >>> out = step(state, jnp.zeros_like(x), state.timesteps[0], x)
      >>> out.prev_sample.shape, out.prev_sample.dtype
      ((2, 3), dtype('float32'))
    """
    check_ready(state, "step")
    check_same_shape("model_output", model_output, "sample", sample)
    if variance_noise is not None:
        check_same_shape("variance_noise", variance_noise, "sample", sample)
    check_static_bools(use_clipped_model_output=use_clipped_model_output)
    t, valid = check_timesteps("timestep", timestep, state.config.num_train_timesteps, sample)
    add_noise = check_eta(eta, key, variance_noise, jnp.shape(sample)[:1])
    valid = valid & eta_in_range(eta) & check_state_timesteps(state, t)
    dtype = compute_dtype(model_output, sample)
    alpha_t = alpha_at(state, t).astype(dtype)
    alpha_prev = alpha_at(state, prev_timestep(state, t)).astype(dtype)
    coef = step_coefficients(state.config, alpha_t, alpha_prev, jnp.asarray(eta, dtype), add_noise)
    coef = coef.per_example(jnp.ndim(sample))
    noise = None
    if add_noise:
        if variance_noise is None:
            noise = normal_noise(key, jnp.shape(sample), dtype)
        else:
            noise = jnp.asarray(variance_noise, dtype)
    out = ddim_update(
        state.config,
        coef,
        jnp.asarray(model_output, dtype),
        jnp.asarray(sample, dtype),
        noise=noise,
        use_clipped_model_output=use_clipped_model_output,
    )
    return nan_unless(valid, out)
