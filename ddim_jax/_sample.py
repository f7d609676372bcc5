"""`sample`: the whole DDIM denoising loop as one ``lax.scan``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_eta, check_ready, compute_dtype
from ddim_jax._loop import (
    ModelFn,
    StepCallback,
    Trajectory,
    check_loop_options,
    guided_model_output,
    scan_steps,
)
from ddim_jax._state import DDIMState
from ddim_jax._step import alpha_at, ddim_update

__all__ = ["sample"]


def sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array,
    *,
    key: jax.Array | None = None,
    eta: float | jax.Array = 0.0,
    model_args: tuple = (),
    guidance_scale: float | jax.Array | None = None,
    guidance_rescale: float | jax.Array = 0.0,
    use_clipped_model_output: bool = False,
    model_dtype: Any = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    remat: bool = False,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Denoises ``latents`` over ``state.timesteps`` in one ``lax.scan`` (no host round-trips).

    Pure and jit-compatible; jit is the caller's choice, at the outermost function. Pass
    model parameters, eta, guidance scale and keys as arguments of that jitted function so
    they stay traced: new values then reuse the compiled program (see README).

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output`` with ``t`` an int32 scalar.
        With ``guidance_scale`` it is called once per step on the doubled batch
        ``[x, x]`` and must return ``[uncond, cond]`` outputs (put the matching
        conditioning, e.g. ``concat([negative_embeds, prompt_embeds])``, in ``model_args``).
      state: a state after `set_timesteps`.
      latents: the starting noise x_T, batch first (scale by ``init_noise_sigma`` = 1).
      key: ``jax.random`` key for the eta noise; step i uses ``jax.random.split(key, S)[i]``
        and draws noise for the whole (global) batch, so results do not depend on sharding.
        Keys made with ``jax.random.key(seed, impl="rbg")`` draw noise faster on GPU/TPU.
      eta: DDIM's eta; a float or a traced scalar (traced needs ``key``).
      model_args: extra positional arguments of ``model_fn`` (params, conditioning).
      guidance_scale: classifier-free guidance weight w, or None for no guidance.
      guidance_rescale: guidance rescale phi (diffusers ``guidance_rescale``).
      use_clipped_model_output: diffusers' flag, see `step`.
      model_dtype: if set, the model sees ``x`` cast to this dtype (e.g. ``jnp.bfloat16``);
        the carry and the scheduler math stay float32.
      return_trajectory: also return the stacked per-step `Trajectory` (O(S x batch) memory).
      callback: ``callback(step_index, timestep, pred_original_sample)`` run on the host
        every ``callback_every`` steps and at the last step (``jax.debug.callback``).
      callback_every: the callback's period in steps.
      remat: rematerialize each step on the backward pass (``jax.checkpoint``), so
        ``jax.grad`` through the loop stores one carry per step, not the model's activations.

    Returns:
      The final sample (float32, the shape of ``latents``), or ``(sample, trajectory)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, sample
      >>> state = set_timesteps(create_state(DDIMConfig()), 10)
      >>> model_fn = lambda x, t: 0.1 * x
      >>> x_T = jax.random.normal(jax.random.key(0), (2, 4))
      >>> sample(model_fn, state, x_T).shape
      (2, 4)
      >>> run = jax.jit(lambda x, key, eta: sample(model_fn, state, x, key=key, eta=eta))
      >>> run(x_T, jax.random.key(1), 0.5).shape
      (2, 4)
    """
    check_ready(state, "sample")
    check_loop_options(latents, model_args, callback, callback_every, model_dtype)
    add_noise = check_eta(eta, key, None)
    config = state.config
    dtype = compute_dtype(latents)
    x = jnp.asarray(latents, dtype)
    eta = jnp.asarray(eta, dtype)
    timesteps = state.timesteps
    keys = jax.random.split(key, timesteps.shape[0]) if add_noise else None

    def update(x, step_inputs):
        t, t_prev, step_key = step_inputs
        out = guided_model_output(model_fn, x, t, model_args, guidance_scale, guidance_rescale, model_dtype)
        noise = jax.random.normal(step_key, x.shape, dtype) if add_noise else None
        return ddim_update(
            config,
            out,
            x,
            alpha_at(state, t).astype(dtype),
            alpha_at(state, t_prev).astype(dtype),
            eta=eta,
            noise=noise,
            use_clipped_model_output=use_clipped_model_output,
        )

    x, trajectory = scan_steps(
        update,
        x,
        (timesteps, state.prev_timesteps, keys),
        return_trajectory=return_trajectory,
        callback=callback,
        callback_every=callback_every,
        remat=remat,
    )
    return (x, trajectory) if return_trajectory else x
