"""EDICT (Wallace, Gokul, Naik 2022, arXiv 2211.12446): exact DDIM inversion with two coupled latents.

EDICT keeps two copies x, y of the latent. Each denoising step updates one copy with the model
evaluated on the other, like an affine coupling layer, so the step can be undone exactly:

    x_inter = a x + b m(y, t)          y_inter = a y + b m(x_inter, t)
    x'      = p x_inter + (1 - p) y_inter
    y'      = p y_inter + (1 - p) x'

with ``x -> a x + b m`` the deterministic DDIM step from t to t_prev for a fixed model output m
(the paper's ``a_t``, ``b_t`` for an epsilon model), and ``p`` the mixing coefficient (0.93 in the
paper). The inversion runs the same equations backwards (the paper's inversion equations):

    y_inter = (y' - (1 - p) x') / p    x_inter = (x' - (1 - p) y_inter) / p
    y       = (y_inter - b m(x_inter, t)) / a
    x       = (x_inter - b m(y, t)) / a

Two model calls per step; no parameter value makes it DDIM.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_fraction, latent_pair
from ddim_jax._config import DDIMConfig
from ddim_jax._loop import (
    Method,
    ModelFn,
    Plan,
    Prepared,
    Trajectory,
    exact_inversion_method,
    run_loop,
    takes_options,
)
from ddim_jax._state import DDIMState
from ddim_jax._step import StepCoefficients, StepOutput, alpha_at, predict_x0_and_eps, step_coefficients

__all__ = ["EDICTLatents", "edict_invert", "edict_sample"]

EDICT_MIXING = 0.93  # the paper's mixing coefficient p


class EDICTLatents(NamedTuple):
    """EDICT's two coupled latents at one noise level, as `edict_invert` returns them.

    Attributes:
      x: the first copy (`edict_sample` returns its final value).
      y: the second copy.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, edict_invert
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 4)
      >>> latents = edict_invert(lambda x, t: 0.1 * x, state, jnp.ones((1, 2)))
      >>> type(latents).__name__, latents.y.shape
      ('EDICTLatents', (1, 2))
    """

    x: jax.Array
    y: jax.Array

    loops = "edict_invert / edict_sample"  # the loops these come from and go to (for messages)


def affine_step(config: DDIMConfig, coef: StepCoefficients) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` with the deterministic DDIM step equal to ``a * sample + b * model_output``.

    For a fixed model output the step is affine in the sample for every prediction type
    (x0 and epsilon are both affine in it), so it is undone by ``(x' - b m) / a``.
    """
    sqrt_a, sqrt_om, to_x0, to_eps = (
        coef.sqrt_alpha,
        coef.sqrt_one_minus,
        coef.sqrt_alpha_prev,
        coef.direction,
    )
    if config.prediction_type == "epsilon":  # x0 = (x - sqrt_om m) / sqrt_a, eps = m
        a = to_x0 * coef.inv_sqrt_alpha
        return a, to_eps - a * sqrt_om
    if config.prediction_type == "sample":  # x0 = m, eps = (x - sqrt_a m) / sqrt_om
        a = to_eps / sqrt_om
        return a, to_x0 - a * sqrt_a
    # v_prediction: x0 = sqrt_a x - sqrt_om v, eps = sqrt_a v + sqrt_om x
    return to_x0 * sqrt_a + to_eps * sqrt_om, to_eps * sqrt_a - to_x0 * sqrt_om


# The coupled step calls the model twice, each output used whole.
_ONE_OUTPUT = (
    "takes one model output per call: its coupled step cannot split it as a GuidedOutput "
    "(CFG++) needs; use sample / invert or bdia_sample / bdia_invert"
)


def _edict_method(name: str, mixing: Any, inverse: bool) -> Method:
    """EDICT as a `Method`: the coupled step of the module docstring, or its inverse."""

    def prepare(state: DDIMState, latents: Any, plan: Plan) -> Prepared:
        valid = check_fraction("mixing", mixing, allow_zero=False)
        config, dtype = state.config, plan.dtype
        pair = None if inverse else latent_pair(latents, EDICTLatents)
        x, y = (latents, latents) if pair is None else pair
        carry = EDICTLatents(jnp.asarray(x, dtype), jnp.asarray(y, dtype))
        alpha_t = alpha_at(state, state.timesteps).astype(dtype)
        alpha_prev = alpha_at(state, state.prev_timesteps).astype(dtype)
        # Every step's scalars are computed once, before the loop.
        coefs = step_coefficients(config, alpha_t, alpha_prev, 0.0, add_noise=False)
        a, b = affine_step(config, coefs)
        p = jnp.asarray(mixing, dtype)

        def sample_step(model, carry, row):
            coef, a, b = row
            x_inter = a * carry.x + b * model(carry.y)
            out = model(x_inter)
            y_inter = a * carry.y + b * out
            x_new = p * x_inter + (1 - p) * y_inter
            y_new = p * y_inter + (1 - p) * x_new
            x0, _ = predict_x0_and_eps(config, out, x_inter, coef)
            return StepOutput(EDICTLatents(x_new, y_new), x0)

        def invert_step(model, carry, row):
            coef, a, b = row
            y_inter = (carry.y - (1 - p) * carry.x) / p
            x_inter = (carry.x - (1 - p) * y_inter) / p
            y = (y_inter - b * model(x_inter)) / a
            out = model(y)
            x = (x_inter - b * out) / a
            x0_pred, _ = predict_x0_and_eps(config, out, y, coef)
            return StepOutput(EDICTLatents(x, y), x0_pred)

        step = invert_step if inverse else sample_step
        return Prepared(carry, state.timesteps, step, (coefs, a, b), valid=valid)

    def first(latents: Any) -> Any:
        pair = None if inverse else latent_pair(latents, EDICTLatents)
        return latents if pair is None else pair[0]

    return exact_inversion_method(
        name,
        "x0" if inverse else "latents",
        inverse,
        prepare,
        no_split_output=_ONE_OUTPUT,
        result=(lambda carry: carry) if inverse else (lambda carry: carry.x),
        record=lambda carry: carry.x,
        first=first,
    )


@takes_options()
def edict_sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array | EDICTLatents,
    *,
    mixing: float | jax.Array = EDICT_MIXING,
    **options: Any,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """EDICT denoising over ``state.timesteps`` in one ``lax.scan``: the exact inverse of `edict_invert`.

    Runs the coupled step of the module docstring (Wallace et al. 2022, Sec. 4) with the
    deterministic DDIM step, two model calls per step. The arguments mean what they mean for
    `sample` (there is no eta: the method is deterministic). The config must have
    ``clip_sample=False`` and ``thresholding=False``.

    On a GPU or TPU the round trip is exact only with full-precision matmuls and convolutions in
    the model (trace under ``jax.default_matmul_precision("highest")``): at an H200's default
    (TF32) the demo-UNet EDICT round trip missed by 7.2e-4, the CPU 1.2e-4 (docs/inversion.md).

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps`.
      latents: x_T (both copies start from it), or the `EDICTLatents` from `edict_invert`.
      mixing: the mixing coefficient p in (0, 1] (the paper's 0.93); a float or traced scalar.
      model_args: as for `sample`, and so are guidance_scale, guidance_rescale, guidance_layout,
        guider, model_dtype, return_trajectory, callback, callback_every, remat, start_step, unroll
        (a runtime-length state or a traced start_step runs the runtime-length loop).
        The trajectory and the callback follow the first copy x; its ``pred_original_sample``
        is the x0 predicted by each step's second model call.

    Returns:
      The final first copy x (float32, the shape of the latents), or ``(x, trajectory)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, edict_invert, edict_sample
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 10)
      >>> model_fn = lambda x, t: jnp.tanh(x)
      >>> x0 = jax.random.normal(jax.random.key(0), (2, 4))
      >>> noise = edict_invert(model_fn, state, x0)
      >>> bool(jnp.allclose(edict_sample(model_fn, state, noise), x0, rtol=1e-5, atol=1e-5))
      True
    """
    method = _edict_method("edict_sample", mixing, inverse=False)
    return run_loop(method, model_fn, state, latents, options)


@takes_options()
def edict_invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    *,
    mixing: float | jax.Array = EDICT_MIXING,
    **options: Any,
) -> EDICTLatents | tuple[EDICTLatents, Trajectory]:
    """Encodes ``x0`` to EDICT's coupled noise latents, in one ``lax.scan`` over the ascending schedule.

    Both copies start at ``x0``; each step undoes one `edict_sample` step exactly (the inversion
    equations of the module docstring), so ``edict_sample`` of the result with the same state,
    ``mixing`` and conditioning reproduces ``x0`` up to float round-off, for any number of
    steps. Two model calls per step. With ``start_step`` the inversion stops at
    ``state.timesteps[start_step]``, where ``edict_sample(..., start_step=start_step)`` begins.

    Exact on a GPU or TPU only with full-precision matmuls, as `edict_sample` says.

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps` (``clip_sample=False``, ``thresholding=False``).
      x0: the clean sample, batch first.
      mixing: the mixing coefficient p in (0, 1]; the same value as in `edict_sample`.
      model_args: as for `invert`, and so are guidance_scale, guidance_rescale, guidance_layout,
        guider, model_dtype, return_trajectory, callback, callback_every, remat, start_step, unroll;
        the trajectory and the callback follow the first copy x.

    Returns:
      `EDICTLatents` ``(x, y)`` at ``state.timesteps[start_step]``, or ``(latents, trajectory)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, edict_invert
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 5)
      >>> # a partial inversion, to timesteps[2], where edict_sample(..., start_step=2) begins
      >>> partial = edict_invert(lambda x, t: 0.5 * x, state, jnp.ones((1, 3)), start_step=2)
      >>> int(state.timesteps[2]), partial.y.shape
      (400, (1, 3))
    """
    method = _edict_method("edict_invert", mixing, inverse=True)
    return run_loop(method, model_fn, state, x0, options)
