"""`sample`: the whole DDIM denoising loop as one ``lax.scan``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ddim_jax._checks import check_eta, check_static_bools, eta_in_range
from ddim_jax._loop import Method, ModelFn, Plan, Prepared, Supports, Trajectory, run_loop, takes_options
from ddim_jax._noise import is_per_example, normal_noise, step_keys
from ddim_jax._state import DDIMState
from ddim_jax._step import alpha_at, ddim_update, step_coefficients

__all__ = ["sample"]


@takes_options()
def sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array,
    *,
    key: jax.Array | None = None,
    eta: float | jax.Array = 0.0,
    use_clipped_model_output: bool = False,
    **options: Any,
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
    method = ddim_method(Supports("sample"), key, eta, use_clipped_model_output)
    return run_loop(method, model_fn, state, latents, options)


def ddim_method(supports: Supports, key: Any, eta: Any, use_clipped_model_output: bool) -> Method:
    """DDIM sampling as a `Method`: each entry's step from its timestep to the previous one, its
    coefficients and noise key computed for the whole schedule before the loop."""

    def prepare(state: DDIMState, latents: Any, plan: Plan) -> Prepared:
        check_static_bools(use_clipped_model_output=use_clipped_model_output)
        add_noise = check_eta(eta, key, None, jnp.shape(latents)[:1])
        if plan.runtime:
            check_runtime_key(key)
        dtype = plan.dtype
        # step i draws from split(key, M)[i] (M = S for a static schedule)
        keys = step_keys(key, state.max_steps) if add_noise else None
        # Every step's scalars are computed once, before the loop: a step is one elementwise pass.
        alphas_t = alpha_at(state, state.timesteps).astype(dtype)
        alphas_prev = alpha_at(state, state.prev_timesteps).astype(dtype)
        coefs = step_coefficients(state.config, alphas_t, alphas_prev, jnp.asarray(eta, dtype), add_noise)

        def step(model, x, row):
            coef, step_key = row
            out = model(x)
            noise = normal_noise(step_key, x.shape, dtype) if add_noise else None
            return ddim_update(
                state.config, coef, out, x, noise=noise, use_clipped_model_output=use_clipped_model_output
            )

        x = jnp.asarray(latents, dtype)
        return Prepared(x, state.timesteps, step, (coefs, keys), valid=eta_in_range(eta))

    return Method(supports, "latents", False, prepare)


def check_runtime_key(key: Any) -> None:
    """The runtime-length loop draws step i's key from ``split(key, M)[i]``, which equals the
    static loop's ``split(key, S)[i]`` only with partitionable threefry (jax's default)."""
    if key is None:
        return
    if not jax.config.jax_threefry_partitionable:
        raise ValueError(
            "a runtime-length sample with key needs jax.config.jax_threefry_partitionable = True "
            "(the default), so that step i's key split(key, M)[i] equals split(key, S)[i]"
        )
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    if impl == "unsafe_rbg" and is_per_example(key):
        raise ValueError(
            "a runtime-length sample cannot take one unsafe_rbg key per example: split under vmap "
            "gives split(key, M)[i] != split(key, S)[i] for them; pass threefry2x32 or rbg keys, "
            "or one unsafe_rbg key for the batch"
        )
