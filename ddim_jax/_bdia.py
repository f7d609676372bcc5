"""BDIA (Zhang, Lewis, Kleijn 2023, arXiv 2307.10829): exact DDIM inversion, one model call per step.

Bi-directional integration approximation: with ``D_s(z_i)`` the deterministic DDIM step from
``z_i`` at t_i to the noise level s, using the model output ``m(z_i, t_i)``, BDIA-DDIM computes

    z_{i-1} = gamma (z_{i+1} - D_{t_{i+1}}(z_i)) + D_{t_{i-1}}(z_i)

the paper's update ``z_{i-1} = z_{i+1} - (1 - gamma)(z_{i+1} - z_i) - gamma Delta(t_i -> t_{i+1} | z_i)
+ Delta(t_i -> t_{i-1} | z_i)`` with ``Delta(t_i -> s | z_i) = D_s(z_i) - z_i``. The first
step (no z_{i+1} yet) is plain DDIM, and so is every step at ``gamma = 0``. For gamma > 0 the
update is linear in z_{i+1}, so it can be undone exactly given (z_{i-1}, z_i):

    z_{i+1} = (z_{i-1} - D_{t_{i-1}}(z_i)) / gamma + D_{t_{i+1}}(z_i)

The state is a pair of consecutive latents (`BDIALatents`). Both directions are the same
update ``g (z_far - D_far(z)) + D_to(z)``: sampling with g = gamma, inversion with 1 / gamma.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_fraction, latent_pair
from ddim_jax._config import DDIMConfig
from ddim_jax._loop import Plan, Prepared, Trajectory, exact_inversion_method, run_loop, takes_options
from ddim_jax._model_call import ModelFn
from ddim_jax._state import DDIMState
from ddim_jax._step import (
    Alphas,
    StepCoefficients,
    StepOutput,
    alpha_at,
    predict_x0_and_eps,
    step_coefficients,
)

__all__ = ["BDIALatents", "bdia_invert", "bdia_sample"]


class BDIALatents(NamedTuple):
    """Two consecutive BDIA latents, as `bdia_invert` returns them.

    Attributes:
      x: the sample at ``state.timesteps[start_step]`` (x_T for a full inversion).
      x_next: the sample one step later in sampling order (the step from ``x`` is already done).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import BDIALatents
      >>> pair = BDIALatents(x=jnp.zeros(3), x_next=jnp.full(3, 0.5))
      >>> pair._fields, pair.x_next.tolist()
      (('x', 'x_next'), [0.5, 0.5, 0.5])
    """

    x: jax.Array
    x_next: jax.Array

    loops = "bdia_invert / bdia_sample"  # the loops these come from and go to (for messages)


class _Step(NamedTuple):
    """One iteration's inputs: the model's timestep, the DDIM steps from its sample to the target
    level and to the far level (one source alpha, so one x0/eps prediction), and the weight g."""

    timestep: jax.Array
    to: StepCoefficients
    far: StepCoefficients
    g: jax.Array


def _steps(config: DDIMConfig, t: jax.Array, source: Alphas, to: Alphas, far: Alphas, g: jax.Array) -> _Step:
    coef = lambda target: step_coefficients(config, source, target, 0.0, add_noise=False)  # noqa: E731
    return _Step(t, coef(to), coef(far), g)


def _update(config: DDIMConfig):
    """One iteration ``g (z_far - D_far(z)) + D_to(z)`` with the carry ``(z_far, z)``."""

    def step(model, pair, row: _Step):
        z_far, z = pair
        x0, eps = predict_x0_and_eps(config, model(z), z, row.to)
        d_to = row.to.sqrt_alpha_prev * x0 + row.to.direction * eps
        d_far = row.far.sqrt_alpha_prev * x0 + row.far.direction * eps
        return StepOutput((z, row.g * (z_far - d_far) + d_to), x0)

    return step


def _sample_prepare(gamma: Any):
    def prepare(state: DDIMState, latents: Any, plan: Plan) -> Prepared:
        valid = check_fraction("gamma", gamma, allow_zero=True)
        pair = latent_pair(latents, BDIALatents)
        config, dtype = state.config, plan.dtype
        # Step k starts at timesteps[k] (model call) and goes to prev_timesteps[k]; the far level is
        # the previous step's, timesteps[k - 1] (unused, weight 0, on a first DDIM step).
        timesteps = state.timesteps
        far_steps = jnp.concatenate([timesteps[:1], timesteps[:-1]])
        g_value = jnp.asarray(gamma, dtype)
        alpha = lambda ts: alpha_at(state, ts).astype(dtype)  # noqa: E731
        if pair is None:  # the first step (start_step) is DDIM
            x = jnp.asarray(latents, dtype)
            carry, skip = (x, x), 0
            g = jnp.where(jnp.arange(timesteps.shape[0]) == plan.start, jnp.zeros((), dtype), g_value)
        else:  # the first step is done: run the rest with gamma everywhere
            carry, skip = tuple(jnp.asarray(v, dtype) for v in pair), 1
            g = jnp.full(timesteps.shape, g_value)
        steps = _steps(config, timesteps, alpha(timesteps), alpha(state.prev_timesteps), alpha(far_steps), g)
        return Prepared(carry, timesteps, _update(config), steps, valid=valid, skip=skip)

    return prepare


def _invert_prepare(gamma: Any):
    def prepare(state: DDIMState, x0: Any, plan: Plan) -> Prepared:
        valid = check_fraction("gamma", gamma, allow_zero=False)
        config, dtype = state.config, plan.dtype
        # Entry k of the tables, visited from S - 1 down to start_step: the first step (k = S - 1) is
        # DDIM inversion to timesteps[S - 1] from x0 (the initial alpha, as `invert`); an entry k < S - 1
        # undoes sampling step k + 1, from timesteps[k + 1] up to timesteps[k], with the far level
        # prev_timesteps[k + 1] (where the carry's other latent is).
        timesteps, prev = state.timesteps, state.prev_timesteps
        entries = jnp.arange(timesteps.shape[0], dtype=jnp.int32)
        first = entries == state.num_inference_steps - 1
        shift = lambda v: jnp.concatenate([v[1:], v[-1:]])  # noqa: E731
        model_timesteps = jnp.where(first, timesteps, shift(timesteps))
        source = jnp.where(first, prev, shift(timesteps))
        far = jnp.where(first, prev, shift(prev))
        alpha = lambda ts: alpha_at(state, ts).astype(dtype)  # noqa: E731
        g = jnp.where(first, jnp.zeros((), dtype), 1 / jnp.asarray(gamma, dtype))
        steps = _steps(config, model_timesteps, alpha(source), alpha(timesteps), alpha(far), g)
        x0 = jnp.asarray(x0, dtype)
        # the model runs at the entry after k (but at k itself on the first step)
        index = jnp.where(first, entries, jnp.minimum(entries + 1, timesteps.shape[0] - 1))
        return Prepared((x0, x0), model_timesteps, _update(config), steps, index=index, valid=valid)

    return prepare


@takes_options()
def bdia_sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array | BDIALatents,
    *,
    gamma: float | jax.Array = 1.0,
    **options: Any,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """BDIA-DDIM sampling in one ``lax.scan``, one model call per step: the exact inverse of `bdia_invert`.

    From a single x_T the first step is DDIM and the others are the BDIA update of the module
    docstring (Zhang et al. 2023); from the `BDIALatents` of `bdia_invert` every step is BDIA.
    ``gamma = 0`` is DDIM (equal to `sample` at eta = 0). The arguments mean what they mean for
    `sample` (no eta: the method is deterministic); the config must have ``clip_sample=False``
    and ``thresholding=False``.

    As for EDICT, exact round trips on a GPU or TPU need the model's matmuls and convolutions at
    full precision (`edict_sample`; docs/inversion.md).

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps`.
      latents: x_T (or the sample at ``timesteps[start_step]``), or `BDIALatents` from `bdia_invert`.
      gamma: BDIA's gamma in [0, 1] (1: the paper's original update; 0: DDIM); a float or a
        traced scalar. Exact round trips need the same gamma > 0 as `bdia_invert`.
      model_args: as for `sample`, and so are guidance_scale, guidance_rescale, guidance_layout,
        guider, model_dtype, return_trajectory, callback, callback_every, remat, start_step, unroll
        (a runtime-length state or a traced start_step runs the runtime-length loop).
        From `BDIALatents` the first step's output is ``latents.x_next`` and the loop runs
        the steps after it (the trajectory has one entry fewer).

    Returns:
      The final sample (float32, the shape of the latents), or ``(sample, trajectory)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, bdia_invert, bdia_sample
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 10)
      >>> model_fn = lambda x, t: 0.5 * jnp.sin(x)
      >>> x0 = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
      >>> latents = bdia_invert(model_fn, state, x0, gamma=0.5)  # the same gamma both ways
      >>> float(jnp.abs(bdia_sample(model_fn, state, latents, gamma=0.5) - x0).max()) < 1e-5
      True
    """
    method = exact_inversion_method(
        "bdia_sample",
        "latents",
        False,
        _sample_prepare(gamma),
        result=lambda pair: pair[1],
        record=lambda pair: pair[1],
        first=lambda latents: (latent_pair(latents, BDIALatents) or (latents,))[0],
    )
    return run_loop(method, model_fn, state, latents, options)


@takes_options()
def bdia_invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    *,
    gamma: float | jax.Array = 1.0,
    **options: Any,
) -> BDIALatents | tuple[BDIALatents, Trajectory]:
    """Encodes ``x0`` to BDIA latents in one ``lax.scan`` over the ascending schedule (one model call a step).

    The first step is DDIM inversion (as `invert`'s first step); each later step undoes one
    `bdia_sample` step exactly (the inverse update of the module docstring), so `bdia_sample`
    of the result with the same state, gamma and conditioning reproduces ``x0`` up to float
    round-off. With ``start_step`` it stops at ``state.timesteps[start_step]``, where
    ``bdia_sample(..., start_step=start_step)`` begins.

    As for EDICT, exact round trips on a GPU or TPU need the model's matmuls and convolutions at
    full precision (`edict_sample`; docs/inversion.md).

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps` (``clip_sample=False``, ``thresholding=False``).
      x0: the clean sample, batch first.
      gamma: BDIA's gamma in (0, 1], the same as in `bdia_sample`. Each step divides by it, so
        round-off grows like ``gamma ** -S``: use 1 (the default) or close to it.
      model_args: as for `invert`, and so are guidance_scale, guidance_rescale, guidance_layout,
        guider, model_dtype, return_trajectory, callback, callback_every, remat, start_step and unroll.

    Returns:
      `BDIALatents` ``(x, x_next)``: the sample at ``timesteps[start_step]`` and the one after it
      in sampling order (``x0`` itself when ``start_step`` is the last step), or ``(latents, trajectory)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, bdia_invert
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 5)
      >>> latents = bdia_invert(lambda x, t: 0.5 * x, state, jnp.ones((1, 3)))
      >>> latents.x.shape, latents.x_next.shape
      ((1, 3), (1, 3))
    """
    method = exact_inversion_method(
        "bdia_invert",
        "x0",
        True,
        _invert_prepare(gamma),
        result=lambda pair: BDIALatents(pair[1], pair[0]),
        record=lambda pair: pair[1],
    )
    return run_loop(method, model_fn, state, x0, options)
