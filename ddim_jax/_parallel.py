"""`parallel_sample`: DDIM in fewer sequential model rounds (ParaDiGMS, Shih et al. 2023).

The whole trajectory x_1..x_S is guessed and refined by Picard iterations over a sliding
window of p steps: each iteration evaluates the model on the window's p steps in one batched
call and recomputes every window sample as the window's first sample plus the cumulative sum
of the steps' changes (drift and noise). The window then slides past the leading steps whose
samples changed by less than ``tolerance`` times the step's noise scale. With tolerance 0 the
iteration reaches `sample`'s trajectory (its fixed point) to float32 round-off.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import Interval, check_in, check_positive_int, nan_unless
from ddim_jax._loop import (
    MODEL_CALL_OPTIONS,
    LoopOptions,
    ModelFn,
    Plan,
    plan_loop,
    steps_to_run,
    takes_options,
)
from ddim_jax._model_call import ModelCall, Supports
from ddim_jax._sample import ddim_method
from ddim_jax._state import DDIMState
from ddim_jax._step import alpha_at, step_coefficients

__all__ = ["ParallelResult", "parallel_sample"]

_OPTIONS = (*MODEL_CALL_OPTIONS, "start_step")  # the loop options parallel_sample takes


class ParallelResult(NamedTuple):
    """What `parallel_sample` returns.

    Attributes:
      sample: the final sample, float32, the shape of ``latents``.
      iterations: int32 scalar, the Picard iterations run: the number of sequential
        (batched) model rounds, against S for `sample`.
      converged: bool scalar, True when the window passed the last step within
        ``max_iterations`` (otherwise ``sample`` is the current guess of x_S).
      residuals: ``(S',)`` float32 for the S' steps run: for step k, the root-mean-square
        change (over an example's elements, the largest over the batch) of the sample after
        step k in the last iteration that computed it. A step was accepted where this is at most
        ``tolerance`` times the noise scale sigma of the step after it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, parallel_sample
      >>> state = set_timesteps(create_state(DDIMConfig()), 8)
      >>> out = parallel_sample(lambda x, t: 0.1 * x, state, jnp.ones((1, 2)), window=4)
      >>> out.sample.shape, out.residuals.shape, bool(out.converged)
      ((1, 2), (8,), True)
    """

    sample: jax.Array
    iterations: jax.Array
    converged: jax.Array
    residuals: jax.Array


class _Carry(NamedTuple):
    begin: jax.Array  # index of the window's first step; x_start is the sample before it
    iteration: jax.Array
    x_start: jax.Array  # (batch, ...): the sample before step `begin`, final
    guess: jax.Array  # (window, batch, ...): the samples after steps begin .. begin + window - 1
    residuals: jax.Array  # (S' + window,): see ParallelResult.residuals


def _check_tolerance(tolerance: Any) -> bool | jax.Array:
    if jnp.ndim(tolerance) != 0:
        raise ValueError(f"tolerance must be a scalar, got shape {jnp.shape(tolerance)}")
    return check_in("tolerance", tolerance, Interval(0, math.inf, high_open=True))


def _check_max_iterations(max_iterations: Any, default: Any) -> tuple[Any, bool | jax.Array]:
    if max_iterations is None:
        return default, True
    if jnp.ndim(max_iterations) != 0 or not jnp.issubdtype(jnp.result_type(max_iterations), jnp.integer):
        raise TypeError(f"max_iterations must be an int scalar, got {max_iterations!r}")
    return max_iterations, check_in("max_iterations", max_iterations, Interval(1, math.inf, high_open=True))


@takes_options(*_OPTIONS)
def parallel_sample(
    model_fn: ModelFn,
    state: DDIMState,
    latents: jax.Array,
    *,
    window: int = 8,
    tolerance: float | jax.Array = 0.1,
    max_iterations: int | jax.Array | None = None,
    key: jax.Array | None = None,
    eta: float | jax.Array = 0.0,
    use_clipped_model_output: bool = False,
    window_sharding: jax.sharding.Sharding | None = None,
    **options: Any,
) -> ParallelResult:
    """`sample`'s result in fewer sequential model rounds: Picard iterations over a sliding window.

    Each iteration calls the model once on the ``window`` steps ``begin .. begin + window - 1``
    (``model_fn`` is vmapped over the window, so it sees the (window x batch) inputs as one
    batched call, each window entry with its own timestep), recomputes the samples after these
    steps as x_begin plus the cumulative sum of the steps' changes, and moves ``begin`` past the
    leading steps whose sample changed, in mean square over an example's elements, by at most
    ``tolerance**2`` times the DDPM posterior variance sigma^2 of the next step (ParaDiGMS'
    test, as diffusers' parallel pipeline scales it), and at least one step. New window
    entries start from the window's last sample. Step i's eta noise is drawn exactly as
    `sample` draws it, so the fixed point is `sample`'s trajectory: with ``tolerance=0`` the
    result equals `sample`'s to float32 round-off, whatever the window; a tolerance > 0 trades
    distance to it for fewer rounds. The whole refinement is one ``lax.while_loop``.

    It pays where one model call on ``window`` times the batch takes about as long as a call on
    the batch (an idle accelerator, small batches, many steps); on a CPU, where a call costs
    about ``window`` times more, it seldom does (benchmarks/RESULTS.md).

    Args:
      model_fn: as for `sample`: ``model_fn(x, t, *model_args)`` with ``t`` an int32 scalar
        (vmapped over the window, so model-side batching needs no change).
      state: a state after `set_timesteps`.
      latents: the starting noise x_T, batch first.
      window: p, the steps per batched model call (a Python int; clamped to the steps run).
      tolerance: the acceptance ratio of a step's change to its noise scale (float or traced
        scalar); 0 accepts only bitwise-unchanged samples (and the one exact step per round).
      max_iterations: the most rounds (int or traced int; default S, always enough since
        each round settles at least one step). Check ``converged`` when setting it lower.
      key: as for `sample`, and so are eta, model_args, guidance_scale, guidance_rescale,
        guidance_layout, guider, use_clipped_model_output, model_dtype and start_step (step i's noise
        comes from ``jax.random.split(key, S)[i]``, per example for a batch of keys).
        A runtime-length state (``set_timesteps(..., max_steps=M)``) or a traced
        ``start_step`` runs one program for every S in [1, M], as in `sample`: the same rounds
        and result as the static program (bitwise where the window is the same), the window
        clamped to M rather than to the steps run (entries past the last step are masked,
        their model outputs unused), ``residuals`` of M entries (NaN after the steps run). An
        S, start_step or schedule out of range, when traced, gives a NaN sample, 0 iterations
        and ``converged=False``.
      window_sharding: a sharding for the ``(window, *latents.shape)`` model inputs and
        samples, e.g. ``NamedSharding(mesh, P("window"))`` on a mesh with ``Auto`` axes: each
        device then evaluates the model on its share of the window (call inside ``jax.jit``).

    Returns:
      A `ParallelResult` ``(sample, iterations, converged, residuals)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, sample, parallel_sample
      >>> state = set_timesteps(create_state(DDIMConfig()), 50)
      >>> model = lambda x, t, w: jnp.tanh(w * x)
      >>> x_T = jax.random.normal(jax.random.key(0), (1, 16))
      >>> traces = []
      >>> @jax.jit
      ... def run(w, x, tolerance):
      ...     traces.append(w)  # runs only when jax traces (compiles) run
      ...     return parallel_sample(model, state, x, window=10, tolerance=tolerance, model_args=(w,))
      >>> exact = run(0.5, x_T, 0.0)
      >>> bool(jnp.allclose(exact.sample, sample(model, state, x_T, model_args=(0.5,)), atol=1e-5))
      True
      >>> fast = run(0.5, x_T, 0.1)  # same compiled program
      >>> int(fast.iterations) < 50, len(traces)
      (True, 1)
    """
    options = LoopOptions.read("parallel_sample", options, _OPTIONS)
    method = ddim_method(SUPPORTS, key, eta, use_clipped_model_output)
    plan, num_steps, valid = _plan(method, state, latents, options.start_step)
    model = ModelCall.build(SUPPORTS, state, latents, model_fn, *options.model_call())
    window = check_positive_int("window", window, " (steps per batched model call)")
    if window_sharding is not None and not isinstance(window_sharding, jax.sharding.Sharding):
        raise TypeError(
            f"window_sharding must be a jax.sharding.Sharding or None, got {type(window_sharding).__name__}"
        )
    ddim = method.prepare(state, latents, plan)
    # Traced and invalid: NaN outputs and converged=False.
    max_iterations, iterations_valid = _check_max_iterations(max_iterations, num_steps)
    values_valid = ddim.valid & _check_tolerance(tolerance) & iterations_valid
    p = min(window, state.max_steps if plan.runtime else num_steps)
    picard = _Picard(
        ddim, model, plan, num_steps, p, _thresholds(state, plan.dtype, tolerance), window_sharding
    )
    rows = state.max_steps if plan.runtime else num_steps  # residuals of the steps run, then NaN
    x = ddim.carry
    init = _Carry(
        jnp.int32(0),
        jnp.int32(0),
        x,
        picard.constrain(jnp.broadcast_to(x, (p,) + x.shape)),
        jnp.zeros((rows + p,), plan.dtype),
    )

    def running(carry: _Carry) -> jax.Array:
        return (carry.begin < num_steps) & (carry.iteration < max_iterations)

    end = jax.lax.while_loop(running, picard.round, init)
    converged = valid & (end.begin >= num_steps)
    # Out of iterations: the current guess of x_S (within the window, or its last sample).
    guess_of_last = end.guess[jnp.clip(num_steps - end.begin - 1, 0, p - 1)]
    final = jnp.where(valid, jnp.where(converged, end.x_start, guess_of_last), jnp.nan)
    residuals = jnp.where(jnp.arange(rows) < num_steps, end.residuals[:rows], jnp.nan)
    result = ParallelResult(final, end.iteration, converged & values_valid, residuals)
    return nan_unless(values_valid, result)


SUPPORTS = Supports("parallel_sample", no_guider_state="its steps do not run in order")


def _plan(method, state: DDIMState, latents: Any, start_step: Any) -> tuple[Plan, Any, Any]:
    """The driver's checks of the schedule and latents (`plan_loop`): ``(plan, steps to run,
    valid)``, valid False (traced) when S, ``start_step`` or the schedule are out of range."""
    plan, _ = plan_loop(method, state, latents, start_step)
    if plan.runtime:  # all M table entries; steps [start, S) run, none when a traced value is invalid
        valid, num_steps = steps_to_run(state, plan.start)
        return plan, num_steps, valid
    return plan, state.num_inference_steps - plan.start, True


def _thresholds(state: DDIMState, dtype: Any, tolerance: Any) -> jax.Array:
    """The acceptance threshold of the sample after each entry: tolerance^2 times the DDPM
    posterior variance (eta = 1) of the next entry (the last step's own for the final sample,
    whose test never decides the stride)."""
    alphas_t = alpha_at(state, state.timesteps).astype(dtype)
    alphas_prev = alpha_at(state, state.prev_timesteps).astype(dtype)
    variance = step_coefficients(state.config, alphas_t, alphas_prev, 1.0, add_noise=True).std ** 2
    has_next = jnp.arange(state.max_steps) + 1 < state.num_inference_steps
    return jnp.asarray(tolerance, dtype) ** 2 * jnp.where(has_next, jnp.roll(variance, -1), variance)


class _Picard(NamedTuple):
    """One Picard round over a window of ``p`` steps, on the DDIM method's rows and step."""

    ddim: Any  # the DDIM method's `Prepared`: its tables (whole schedule) and step
    model: ModelCall
    plan: Plan
    num_steps: Any  # the steps run: entries plan.start .. plan.start + num_steps - 1
    p: int
    threshold: jax.Array
    window_sharding: Any

    def constrain(self, a: jax.Array) -> jax.Array:
        if self.window_sharding is None:
            return a
        return jax.lax.with_sharding_constraint(a, self.window_sharding)

    def window_steps(self, inputs: jax.Array, entry: jax.Array) -> jax.Array:
        """The DDIM step of each window entry from its input sample (one batched model call)."""

        def one(x, t, index, row):
            return self.ddim.step(lambda x: self.model(x, t, index), x, row).prev_sample

        rows = jax.tree.map(lambda v: None if v is None else v[entry], self.ddim.rows)
        return jax.vmap(one)(inputs, self.ddim.timesteps[entry], entry, rows)

    def round(self, carry: _Carry) -> _Carry:
        begin, iteration, x_start, guess, residuals = carry
        p, x = self.p, x_start
        offsets = jnp.arange(p)
        index = begin + offsets
        k = jnp.minimum(index, self.num_steps - 1)  # steps past the end repeat the last; masked below
        entry = self.plan.start + k
        inputs = self.constrain(jnp.concatenate([x_start[None], guess[:-1]]))
        outputs = self.window_steps(inputs, entry)
        live = (index < self.num_steps).reshape((p,) + (1,) * x.ndim)
        drift = jnp.where(live, outputs - inputs, 0)
        new_guess = self.constrain(x_start + jnp.cumsum(drift, axis=0))
        example_axes = tuple(range(2, x.ndim + 1))
        mean_square = jnp.max(jnp.mean((new_guess - guess) ** 2, axis=example_axes), axis=1)  # (p,)
        accepted = mean_square <= self.threshold[entry]
        first_rejected = jnp.where(jnp.all(accepted), p, jnp.argmin(accepted))
        stride = jnp.minimum(jnp.minimum(first_rejected + 1, p), self.num_steps - begin)
        # A masked write rather than dynamic_update_slice, which refuses to mix the buffer made
        # here with a value computed from mesh-typed latents (jax.make_mesh's Explicit axes).
        window_position = jnp.arange(residuals.shape[0]) - begin
        in_window = (window_position >= 0) & (window_position < p)
        residuals = jnp.where(
            in_window, jnp.sqrt(mean_square)[jnp.clip(window_position, 0, p - 1)], residuals
        )
        return _Carry(
            (begin + stride).astype(jnp.int32),  # argmin is int64 under jax_enable_x64
            iteration + 1,
            new_guess[stride - 1],
            new_guess[jnp.minimum(offsets + stride, p - 1)],
            residuals,
        )
