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

from ddim_jax._checks import (
    check_fraction,
    compute_dtype,
    latent_pair,
)
from ddim_jax._config import DDIMConfig
from ddim_jax._guiders import Guider
from ddim_jax._loop import (
    ModelCall,
    ModelFn,
    StepCallback,
    Trajectory,
    check_exact_inversion_loop,
    scan_steps,
)
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
      >>> BDIALatents(jnp.zeros(2), jnp.ones(2)).x_next.tolist()
      [1.0, 1.0]
    """

    x: jax.Array
    x_next: jax.Array


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


def _weights(num: int, weight: jax.Array, first: float, dtype: Any) -> jax.Array:
    """The per-iteration weight g: ``weight`` at every iteration but the first, which gets ``first``."""
    return jnp.full((num,), weight, dtype).at[0].set(first)


def _check(fn: str, model: ModelCall, state: DDIMState, x: Any, gamma: Any, start_step: Any, callback, every):
    start = check_exact_inversion_loop(fn, state, x, start_step, callback, every)
    check_fraction("gamma", gamma, allow_zero=fn == "bdia_sample")
    model.check(x)
    return start


def _run(model, config, carry, steps, return_trajectory, callback, callback_every, remat):
    """Scans ``g (z_far - D_far(z)) + D_to(z)`` with the carry ``(z_far, z)``; returns the last pair."""

    def update(pair, step: _Step):
        z_far, z = pair
        x0, eps = predict_x0_and_eps(config, model(z, step.timestep), z, step.to)
        d_to = step.to.sqrt_alpha_prev * x0 + step.to.direction * eps
        d_far = step.far.sqrt_alpha_prev * x0 + step.far.direction * eps
        return StepOutput((z, step.g * (z_far - d_far) + d_to), x0)

    final, trajectory = scan_steps(
        update,
        carry,
        steps,
        return_trajectory=return_trajectory,
        callback=callback,
        callback_every=callback_every,
        remat=remat,
    )
    if return_trajectory:
        trajectory = Trajectory(trajectory.prev_sample[1], trajectory.pred_original_sample)
    return final, trajectory


def bdia_sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array | BDIALatents,
    *,
    gamma: float | jax.Array = 1.0,
    model_args: tuple = (),
    guidance_scale: float | jax.Array | None = None,
    guidance_rescale: float | jax.Array = 0.0,
    guidance_layout: str = "concat",
    guider: Guider | None = None,
    model_dtype: Any = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    remat: bool = False,
    start_step: int = 0,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """BDIA-DDIM sampling in one ``lax.scan``, one model call per step: the exact inverse of `bdia_invert`.

    From a single x_T the first step is DDIM and the others are the BDIA update of the module
    docstring (Zhang et al. 2023); from the `BDIALatents` of `bdia_invert` every step is BDIA.
    ``gamma = 0`` is DDIM (equal to `sample` at eta = 0). The arguments mean what they mean for
    `sample` (no eta: the method is deterministic); the config must have ``clip_sample=False``
    and ``thresholding=False``.

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps`.
      latents: x_T (or the sample at ``timesteps[start_step]``), or `BDIALatents` from `bdia_invert`.
      gamma: BDIA's gamma in [0, 1] (1: the paper's original update; 0: DDIM); a float or a
        traced scalar. Exact round trips need the same gamma > 0 as `bdia_invert`.
      model_args, guidance_scale, guidance_rescale, guidance_layout, guider, model_dtype,
        return_trajectory, callback, callback_every, remat, start_step: as for `sample`.
        From `BDIALatents` the first step's output is ``latents.x_next`` and the loop runs
        the steps after it (the trajectory has one entry fewer).

    Returns:
      The final sample (float32, the shape of the latents), or ``(sample, trajectory)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, bdia_invert, bdia_sample
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 10)
      >>> model_fn = lambda x, t: jnp.tanh(x)
      >>> x0 = jax.random.normal(jax.random.key(0), (2, 4))
      >>> latents = bdia_invert(model_fn, state, x0)
      >>> bool(jnp.allclose(bdia_sample(model_fn, state, latents), x0, rtol=1e-5, atol=1e-5))
      True
    """
    model = ModelCall(
        model_fn,
        model_args,
        guidance_scale,
        guidance_rescale,
        guidance_layout,
        model_dtype,
        guider,
        state,
        "bdia_sample",
    )
    pair = latent_pair(latents, BDIALatents._fields)
    x = latents if pair is None else pair[0]
    start = _check("bdia_sample", model, state, x, gamma, start_step, callback, callback_every)
    config, dtype = state.config, compute_dtype(x)
    # Iteration k (step start + k) starts at timesteps[k] (model call) and goes to prev_timesteps[k];
    # the far level is the previous iteration's, timesteps[k - 1] (unused, weight 0, on a first DDIM step).
    timesteps = state.timesteps[start:]
    far_steps = (
        jnp.concatenate([timesteps[:1], timesteps[:-1]]) if start == 0 else state.timesteps[start - 1 : -1]
    )
    gamma = jnp.asarray(gamma, dtype)
    g = _weights(timesteps.shape[0], gamma, 0.0, dtype)
    alpha = lambda ts: alpha_at(state, ts).astype(dtype)  # noqa: E731
    steps = _steps(
        config, timesteps, alpha(timesteps), alpha(state.prev_timesteps[start:]), alpha(far_steps), g
    )
    if pair is None:
        x = jnp.asarray(x, dtype)
        carry = (x, x)
    else:
        # The first step is done: run the rest with gamma everywhere.
        steps = jax.tree.map(lambda v: v[1:], steps._replace(g=jnp.full(g.shape, gamma)))
        carry = tuple(jnp.asarray(v, dtype) for v in pair)
    final, trajectory = _run(model, config, carry, steps, return_trajectory, callback, callback_every, remat)
    return (final[1], trajectory) if return_trajectory else final[1]


def bdia_invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    *,
    gamma: float | jax.Array = 1.0,
    model_args: tuple = (),
    guidance_scale: float | jax.Array | None = None,
    guidance_rescale: float | jax.Array = 0.0,
    guidance_layout: str = "concat",
    guider: Guider | None = None,
    model_dtype: Any = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    remat: bool = False,
    start_step: int = 0,
) -> BDIALatents | tuple[BDIALatents, Trajectory]:
    """Encodes ``x0`` to BDIA latents in one ``lax.scan`` over the ascending schedule (one model call a step).

    The first step is DDIM inversion (as `invert`'s first step); each later step undoes one
    `bdia_sample` step exactly (the inverse update of the module docstring), so `bdia_sample`
    of the result with the same state, gamma and conditioning reproduces ``x0`` up to float
    round-off. With ``start_step`` it stops at ``state.timesteps[start_step]``, where
    ``bdia_sample(..., start_step=start_step)`` begins.

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output``, as for `sample`.
      state: a state after `set_timesteps` (``clip_sample=False``, ``thresholding=False``).
      x0: the clean sample, batch first.
      gamma: BDIA's gamma in (0, 1], the same as in `bdia_sample`. Each step divides by it, so
        round-off grows like ``gamma ** -S``: use 1 (the default) or close to it.
      model_args, guidance_scale, guidance_rescale, guidance_layout, guider, model_dtype,
        return_trajectory, callback, callback_every, remat, start_step: as for `invert`.

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
    model = ModelCall(
        model_fn,
        model_args,
        guidance_scale,
        guidance_rescale,
        guidance_layout,
        model_dtype,
        guider,
        state,
        "bdia_invert",
    )
    start = _check("bdia_invert", model, state, x0, gamma, start_step, callback, callback_every)
    config, dtype = state.config, compute_dtype(x0)
    # Iteration 0 is DDIM inversion to timesteps[-1] from x0 (the initial alpha, as `invert`);
    # iteration j >= 1 undoes sampling step k = S - j, from timesteps[k] up to timesteps[k - 1],
    # with the far level prev_timesteps[k] (where the carry's other latent is).
    num_steps = state.num_inference_steps
    ks = jnp.arange(num_steps - 1, start - 1, -1)
    timesteps = state.timesteps[jnp.concatenate([ks[:1], ks[:-1]])]
    source = jnp.concatenate([state.prev_timesteps[-1:], timesteps[1:]])
    to = jnp.concatenate([timesteps[:1], state.timesteps[ks[:-1] - 1]])
    far = jnp.concatenate([state.prev_timesteps[-1:], state.prev_timesteps[ks[:-1]]])
    alpha = lambda ts: alpha_at(state, ts).astype(dtype)  # noqa: E731
    g = _weights(ks.shape[0], 1 / jnp.asarray(gamma, dtype), 0.0, dtype)
    steps = _steps(config, timesteps, alpha(source), alpha(to), alpha(far), g)
    x0 = jnp.asarray(x0, dtype)
    final, trajectory = _run(
        model, config, (x0, x0), steps, return_trajectory, callback, callback_every, remat
    )
    latents = BDIALatents(final[1], final[0])
    return (latents, trajectory) if return_trajectory else latents
