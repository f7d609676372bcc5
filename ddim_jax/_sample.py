"""`sample`: the whole DDIM denoising loop as one ``lax.scan``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import (
    check_eta,
    check_latents,
    check_ready,
    check_static_bools,
    compute_dtype,
    eta_in_range,
    nan_unless,
)
from ddim_jax._guiders import Guider
from ddim_jax._loop import (
    GuidedCarry,
    ModelCall,
    ModelFn,
    StepCallback,
    Trajectory,
    check_loop_options,
    check_runtime_key,
    check_schedule_options,
    run_steps,
)
from ddim_jax._noise import normal_noise, step_keys
from ddim_jax._state import DDIMState
from ddim_jax._step import StepOutput, alpha_at, ddim_update, step_coefficients

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
    guidance_layout: str = "concat",
    guider: Guider | None = None,
    use_clipped_model_output: bool = False,
    model_dtype: Any = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    remat: bool = False,
    start_step: int | jax.Array = 0,
    unroll: int = 1,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """Denoises ``latents`` over ``state.timesteps`` in one ``lax.scan`` (no host round-trips).

    Pure and jit-compatible; jit is the caller's choice, at the outermost function. Pass
    model parameters (through ``model_args``), conditioning, latents, key, eta, guidance scale
    and rescale as arguments of that jitted function so they stay traced: new values then
    reuse the compiled program. A ``model_fn`` that closes over parameters instead
    (``lambda x, t: apply(params, x, t)`` under jit) compiles them in as constants.
    The state may be closed over or passed as an argument; changing the number of steps
    (``timesteps.shape``) or the config compiles a new program.

    Args:
      model_fn: ``model_fn(x, t, *model_args) -> model_output`` with ``t`` an int32 scalar.
        With ``guidance_scale`` it is called once per step on the doubled batch
        ``[x, x]`` and must return ``[uncond, cond]`` outputs (put the matching
        conditioning, e.g. ``concat([negative_embeds, prompt_embeds])``, in ``model_args``).
      state: a state after `set_timesteps`.
      latents: the starting noise x_T, batch first (scale by ``init_noise_sigma`` = 1).
      key: ``jax.random`` key for the eta noise; step i uses ``jax.random.split(key, S)[i]``
        and draws noise for the whole (global) batch, so results do not depend on sharding.
        Any key implementation works (e.g. ``jax.random.key(seed, impl="rbg")``); the noise
        draw dominates an eta > 0 step, and on CPU the default threefry is 3-6x faster than
        rbg (benchmarks/RESULTS.md). Under sharding, threefry draws each device's slice
        locally while rbg generates the whole batch's noise on every device. Or one key per
        example (shape ``(batch,)``, e.g. ``jax.random.split(key, batch)``, like diffusers'
        list of generators): example b's noise then comes from ``key[b]`` alone, so a sample
        does not depend on the batch it is in nor, inside ``shard_map``/``pmap``, on the
        device count.
      eta: DDIM's eta in [0, 1]; a float or a traced scalar (traced needs ``key``; a traced
        eta outside [0, 1] gives an all-NaN output).
      model_args: extra positional arguments of ``model_fn`` (params, conditioning).
      guidance_scale: classifier-free guidance weight w, or None for no guidance: a float,
        a traced scalar, or one value per example (shape ``(batch,)``), which equals a
        separate run per example. Shorthand for ``guider=cfg(w, phi)``.
      guidance_rescale: guidance rescale phi (diffusers ``guidance_rescale``), the same forms.
      guidance_layout: order of the doubled batch: ``"concat"`` (diffusers' ``[x, x]`` and
        ``[uncond, cond]``) or ``"interleave"`` (``[x_0, x_0, x_1, x_1, ...]``, conditioning
        ``stack([uncond, cond], axis=1)`` reshaped to ``(2 * batch, ...)``), which keeps a
        batch-sharded loop free of cross-device traffic under ``jax.jit``.
      guider: a `Guider` (`cfg`, `apg`, `cfg_zero_star`, `tangential_cfg`, `cfg_pp`, a
        `guidance_window` of one, or your own) instead of ``guidance_scale``: ``model_fn`` is
        called as with ``guidance_scale``, and the guider's state is carried through the loop.
      use_clipped_model_output: diffusers' flag, see `step`.
      model_dtype: if set, the model sees ``x`` cast to this dtype (e.g. ``jnp.bfloat16``);
        the carry and the scheduler math stay float32.
      return_trajectory: also return the stacked per-step `Trajectory` (O(S x batch) memory).
      callback: ``callback(step_index, timestep, pred_original_sample)`` run on the host
        every ``callback_every`` steps and at the last step (``jax.debug.callback``);
        ``step_index`` counts this call's steps from 0.
      callback_every: the callback's period in steps.
      remat: rematerialize each step on the backward pass (``jax.checkpoint``), so
        ``jax.grad`` through the loop stores one carry per step, not the model's activations.
      unroll: steps per iteration of the loop's ``lax.scan`` (its ``unroll``): fewer loop
        iterations, a program that grows with it. It saves the loop's per-iteration cost,
        about 7 us per step on an H200, which matters where a step is that short
        (benchmarks/RESULTS.md). In the runtime-length loop it unrolls the inner scan of
        each block (below).
      start_step: start at ``state.timesteps[start_step]`` with ``latents`` at that noise level
        and run the remaining steps (image-to-image / SDEdit: noise the input there with
        `add_noise`; diffusers' ``strength`` s is ``start_step = S - int(S * s)``). Step i
        still draws its noise from ``split(key, S)[i]``. A Python int compiles a program per
        value; an int32 array traced under jit (e.g. from a strength) runs the
        runtime-length loop below, one program for every value.

    Runtime-length loop: with a state from ``set_timesteps(..., max_steps=M)`` (S a runtime
    value) or a traced ``start_step``, the steps run in a ``fori_loop`` with traced bounds:
    blocks of 8 steps (the smallest multiple of ``unroll`` >= 8) per iteration, an inner
    ``lax.scan``, then the remaining steps one per iteration of a second loop (a GPU reads a
    traced loop's predicate on the host each iteration: this reads it about an eighth as
    often; the model is compiled twice). S - start_step model calls, results bitwise equal
    to the static loop's for the same S, start_step and key when the static state is a jit
    argument too (step i still draws from
    ``split(key, S)[i]``, which is ``split(key, M)[i]`` with jax's default
    ``jax_threefry_partitionable``; a static state closed over as a constant lets XLA fold
    the per-step scalars at compile time, which can move the last bit; one ``unsafe_rbg`` key
    per example is refused, as its vmapped split is not a prefix). An S outside
    [1, M], a start_step outside [0, S) or a custom schedule that is not descending in
    [0, T), when traced, give an all-NaN output (known in Python, they raise). The
    trajectory then has M rows (the steps run, in order, then NaN rows); callbacks work;
    forward-mode autodiff (``jax.jvp``) works, reverse mode (``jax.grad``) does not (a while
    loop) and ``remat`` raises: use a static state and a Python int start_step for gradients.

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
      >>> def model(x, t, w):  # parameters come in as arguments: traced, not baked in
      ...     return w * x
      >>> traces = []
      >>> @jax.jit
      ... def run(w, x, key, eta):
      ...     traces.append(w)  # Python code here runs only when jax traces (compiles) run
      ...     return sample(model, state, x, key=key, eta=eta, model_args=(w,))
      >>> run(0.1, x_T, jax.random.key(1), 0.5).shape
      (2, 4)
      >>> _ = run(0.2, x_T, jax.random.key(2), 0.0)  # new values, same compiled program
      >>> len(traces)
      1
    """
    check_ready(state, "sample")
    check_latents("latents", latents, "sample")
    check_static_bools(
        return_trajectory=return_trajectory, remat=remat, use_clipped_model_output=use_clipped_model_output
    )
    check_loop_options(latents, callback, callback_every)
    runtime, start, unroll = check_schedule_options("sample", state, start_step, remat, unroll)
    model = ModelCall(
        model_fn, model_args, guidance_scale, guidance_rescale, guidance_layout, model_dtype, guider, state
    )
    model.check(latents)
    add_noise = check_eta(eta, key, None, jnp.shape(latents)[:1])
    valid = eta_in_range(eta)  # traced and outside [0, 1]: all-NaN outputs
    config = state.config
    dtype = compute_dtype(latents)
    x = jnp.asarray(latents, dtype)
    eta = jnp.asarray(eta, dtype)
    if runtime:  # all M entries; the loop reads [start, S)
        check_runtime_key(key)
        timesteps, prev_timesteps = state.timesteps, state.prev_timesteps
        keys = step_keys(key, state.max_steps) if add_noise else None
    else:
        timesteps, prev_timesteps = state.timesteps[start:], state.prev_timesteps[start:]
        keys = step_keys(key, state.num_inference_steps)[start:] if add_noise else None
    # Every step's scalars are computed once, before the scan: a step is one elementwise pass.
    alphas_t = alpha_at(state, timesteps).astype(dtype)
    alphas_prev = alpha_at(state, prev_timesteps).astype(dtype)
    coefs = step_coefficients(config, alphas_t, alphas_prev, eta, add_noise)

    def update(carry, step_inputs):
        (x, guider_state), (t, coef, step_key) = carry, step_inputs
        out, guider_state = model.guided(x, t, guider_state)
        noise = normal_noise(step_key, x.shape, dtype) if add_noise else None
        x, x0 = ddim_update(
            config, coef, out, x, noise=noise, use_clipped_model_output=use_clipped_model_output
        )
        return StepOutput(GuidedCarry(x, guider_state), x0)

    result = run_steps(
        update,
        GuidedCarry(x, model.init(x)),
        (timesteps, coefs, keys),
        state,
        runtime=runtime,
        start=start,
        reverse=False,
        return_trajectory=return_trajectory,
        callback=callback,
        callback_every=callback_every,
        remat=remat,
        unroll=unroll,
    )
    return nan_unless(valid, result)
