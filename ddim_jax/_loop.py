"""The loop driver: a loop states its method (`Method`), `run_loop` runs it.

A method says only what is its own: how it builds its per-step rows and its carry from the
state (`Method.prepare`), its step, its result, whether it runs in reverse and what it supports
(`Supports`). `run_loop` does the rest for every loop, static and runtime-length: the checks,
the guided model call (built once), the table order, the step index passed to guiders, the
guider's state, the trajectory, the callback, remat, unroll and ``start_step``.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import (
    as_int32,
    check_invertible_config,
    check_latents,
    check_positive_int,
    check_ready,
    check_sample_prediction_start,
    check_static_bools,
    check_static_schedule,
    compute_dtype,
    is_int_scalar,
    is_traced,
    nan_unless,
    shown,
)
from ddim_jax._guiders import Guider
from ddim_jax._model_call import ModelCall, ModelFn, Supports
from ddim_jax._padded import schedule_is_valid
from ddim_jax._state import DDIMState
from ddim_jax._step import StepOutput

__all__ = [
    "LoopOptions",
    "MODEL_CALL_OPTIONS",
    "Method",
    "ModelFn",
    "Plan",
    "Prepared",
    "StepCallback",
    "Supports",
    "Trajectory",
    "run_loop",
    "takes_options",
]

StepCallback = Callable[[jax.Array, jax.Array, jax.Array], Any]
"""``callback(step_index, timestep, pred_original_sample)``, run on the host."""


class Trajectory(NamedTuple):
    """Per-step outputs stacked along a new leading axis of length S (steps in loop order).

    Attributes:
      prev_sample: ``(S, *latents.shape)``, the sample after each step.
      pred_original_sample: ``(S, *latents.shape)``, the predicted x0 at each step.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, sample
      >>> state = set_timesteps(create_state(DDIMConfig()), 5)
      >>> x, trajectory = sample(lambda x, t: 0.1 * x, state, jnp.ones((2, 3)), return_trajectory=True)
      >>> trajectory.prev_sample.shape
      (5, 2, 3)
    """

    prev_sample: jax.Array
    pred_original_sample: jax.Array


def check_loop_options(latents: Any, callback: Any, callback_every: Any) -> None:
    if not jnp.issubdtype(jnp.result_type(latents), jnp.floating):
        raise TypeError(f"latents must be a float array, got dtype {jnp.result_type(latents)}")
    if jnp.ndim(latents) < 1:
        raise ValueError("latents must have a leading batch axis, got a scalar")
    if jnp.shape(latents)[0] == 0:
        raise ValueError(
            "latents must hold at least one example (a batch axis of length >= 1), "
            f"got shape {jnp.shape(latents)}"
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    check_positive_int("callback_every", callback_every)
    if callback is None and callback_every != 1:
        raise ValueError(f"callback_every={callback_every} needs a callback (it is the callback's period)")


def check_start_step(start_step: Any, num_inference_steps: int) -> int:
    try:
        index = operator.index(start_step)
    except TypeError:
        index = -1
    if isinstance(start_step, bool) or not 0 <= index < num_inference_steps:
        raise ValueError(
            f"start_step must be an int in [0, num_inference_steps={num_inference_steps}), got {start_step!r}"
        )
    return index


def check_runtime_start_step(
    start_step: Any, num_inference_steps: int | jax.Array, max_steps: int | None = None
) -> jax.Array:
    """A start step that may be traced: an int or an int scalar array, range-checked when both it
    and S are known in Python (against M = ``max_steps`` when only it is: a start step >= M is
    out of range for every S); a traced one out of range makes the loop return NaN."""
    known = not is_traced(start_step) and not is_traced(num_inference_steps)
    bound = num_inference_steps if known or max_steps is None else max_steps
    if is_int_scalar(start_step) and (
        is_traced(start_step) or is_traced(bound) or 0 <= int(start_step) < int(bound)
    ):
        return as_int32(start_step)  # saturating: an int64 out of range stays out (schedule_is_valid)
    s = "S" if is_traced(num_inference_steps) else int(num_inference_steps)
    every = f" <= max_steps={max_steps}" if is_traced(num_inference_steps) and max_steps is not None else ""
    expected = f"an int in [0, num_inference_steps={s}{every})"
    raise ValueError(f"start_step must be {expected}, got {shown(start_step)}")


def check_unroll(unroll: Any) -> int:
    return check_positive_int("unroll", unroll)


def check_schedule_options(
    fn: str, state: Any, start_step: Any, remat: bool, unroll: Any
) -> tuple[bool, int | jax.Array, int]:
    """``(runtime, start, unroll)`` for a loop that runs either loop: the runtime-length one
    (`padded_steps`: a runtime-length state or a traced ``start_step``) or the static scan."""
    runtime = state.has_runtime_length or is_traced(start_step)
    unroll = check_unroll(unroll)
    if runtime:
        start = check_runtime_start_step(start_step, state.num_inference_steps, state.max_steps)
        check_runtime_options(fn, state, remat)
        return True, start, unroll
    return False, check_start_step(start_step, state.num_inference_steps), unroll


def check_runtime_options(fn: str, state: Any, remat: bool) -> None:
    """Options the runtime-length loop (`padded_steps`) cannot honour."""
    if remat:
        check_static_schedule(state, f"{fn}(remat=True)")
        raise ValueError(
            f"{fn}(remat=True) needs a Python int start_step: a traced start_step runs the "
            "runtime-length loop, which reverse-mode autodiff (jax.grad) does not go through"
        )


def report(
    callback: StepCallback, every: int, count: jax.Array, last: jax.Array, t: jax.Array, out: StepOutput
) -> None:
    """Calls ``callback(count, t, x0)`` on the host every ``every`` steps and at the last one."""
    jax.lax.cond(
        (count % every == 0) | last,
        lambda: jax.debug.callback(callback, count, t, out.pred_original_sample),
        lambda: None,
    )


class Steps(NamedTuple):
    """How `scan_steps` and `padded_steps` run a loop's ``update(carry, xs_i) -> StepOutput``
    over ``xs = (timesteps, ...)``: ``record(carry)`` is the sample a trajectory row holds."""

    update: Callable[[Any, Any], StepOutput]
    record: Callable[[Any], jax.Array]
    return_trajectory: bool
    callback: StepCallback | None
    callback_every: int
    unroll: int


def scan_steps(steps: Steps, carry: Any, xs: tuple, remat: bool) -> tuple[Any, Trajectory | None]:
    """Runs ``steps.update`` over ``xs`` in one ``lax.scan``; with ``remat`` each step's
    activations are recomputed on the backward pass (``jax.checkpoint``)."""
    num_steps = xs[0].shape[0]
    step_fn = jax.checkpoint(steps.update) if remat else steps.update

    def body(carry, inputs):
        index, step_inputs = inputs
        out = step_fn(carry, step_inputs)
        if steps.callback is not None:
            last = index == num_steps - 1
            report(steps.callback, steps.callback_every, index, last, step_inputs[0], out)
        record = None
        if steps.return_trajectory:
            record = Trajectory(steps.record(out.prev_sample), out.pred_original_sample)
        return out.prev_sample, record

    indices = jnp.arange(num_steps, dtype=jnp.int32)
    return jax.lax.scan(body, carry, (indices, xs), unroll=steps.unroll)


# Steps per iteration of the runtime loop's while loop (a multiple of ``unroll``). A while loop
# with a traced trip count pays a device-to-host read of its predicate each iteration on a GPU;
# blocks of steps with a static inner trip count pay it once per block.
RUNTIME_BLOCK = 8


def runtime_block(unroll: int, max_steps: int) -> int:
    """The runtime loop's block: the smallest multiple of ``unroll`` >= `RUNTIME_BLOCK`, or 1
    (no blocks, only the remainder loop) when no block fits in ``max_steps``."""
    block = -(-RUNTIME_BLOCK // unroll) * unroll
    return block if block <= max_steps else 1


def padded_steps(
    steps: Steps, carry: Any, xs: tuple, first: jax.Array, count: jax.Array, reverse: bool
) -> tuple[Any, Trajectory | None]:
    """Runs ``steps.update`` over the ``count`` entries ``[first, first + count)`` of the
    per-step tables ``xs`` (each of length M, the schedule's order; ``reverse`` visits them last
    to first): ``count`` model calls, whatever M.

    The steps run in blocks of `runtime_block` steps, an inner ``lax.scan`` (with ``unroll``)
    per iteration of a ``fori_loop`` with a traced trip count, then the remaining steps one per
    iteration of a second ``fori_loop``: a block-size fraction of the traced-bound iterations.
    The trajectory has M rows, the steps in loop order first, NaN after them. Not
    reverse-differentiable (a while loop).
    """
    max_steps = xs[0].shape[0]

    def one_step(i, carry):
        carry, trajectory = carry
        index = first + count - 1 - i if reverse else first + i
        step_inputs = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), xs)
        out = steps.update(carry, step_inputs)
        if steps.callback is not None:
            report(steps.callback, steps.callback_every, i, i == count - 1, step_inputs[0], out)
        if steps.return_trajectory:
            row = Trajectory(steps.record(out.prev_sample), out.pred_original_sample)
            trajectory = jax.tree.map(lambda rows, v: rows.at[i].set(v), trajectory, row)
        return out.prev_sample, trajectory

    empty = None
    if steps.return_trajectory:
        first_inputs = jax.tree.map(lambda a: a[0], xs)
        shapes = jax.eval_shape(steps.update, carry, first_inputs)
        row = Trajectory(steps.record(shapes.prev_sample), shapes.pred_original_sample)
        empty = jax.tree.map(lambda v: jnp.full((max_steps, *v.shape), jnp.nan, v.dtype), row)
    carry, done = (carry, empty), 0
    block = runtime_block(steps.unroll, max_steps)
    if block > 1:

        def run_block(b, carry):
            def inner(carry, j):
                return one_step(b * block + j, carry), None

            return jax.lax.scan(inner, carry, jnp.arange(block, dtype=jnp.int32), unroll=steps.unroll)[0]

        carry = jax.lax.fori_loop(0, count // block, run_block, carry)
        done = count // block * block
    return jax.lax.fori_loop(done, count, one_step, carry)


def steps_to_run(state: DDIMState, start: jax.Array, skip: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(valid, count)`` of a runtime-length run from entry ``start + skip``: False and 0 when
    the schedule, S or ``start`` are out of range (`schedule_is_valid`), else True and the
    steps left, S - start - skip."""
    num_steps = state.num_inference_steps
    valid = schedule_is_valid(state.timesteps, num_steps, start, state.config.num_train_timesteps)
    return valid, jnp.where(valid, num_steps - start - skip, 0)


class LoopOptions(NamedTuple):
    """The options every sequential loop takes, as its public function's keyword arguments:
    the one place their names, types and defaults are declared (`takes_options` puts them in
    each public signature). The first six are the model call's own (`model_call`)."""

    model_args: tuple = ()
    guidance_scale: float | jax.Array | None = None
    guidance_rescale: float | jax.Array = 0.0
    guidance_layout: str = "concat"
    guider: Guider | None = None
    model_dtype: Any = None
    return_trajectory: bool = False
    callback: StepCallback | None = None
    callback_every: int = 1
    remat: bool = False
    start_step: int | jax.Array = 0
    unroll: int = 1

    @classmethod
    def read(cls, loop: str, options: Mapping[str, Any], declared: tuple[str, ...] = ()) -> LoopOptions:
        """The options the public function ``loop`` got as ``**options``, where its signature
        declares the fields ``declared`` (all of them when none is named): another name is a
        TypeError worded as Python's own; the ones not passed take their defaults."""
        for name in options:
            if name not in (declared or cls._fields):
                raise TypeError(f"{loop}() got an unexpected keyword argument {name!r}")
        return cls(**options)

    def model_call(self) -> tuple:
        """``(model_args, guidance_scale, guidance_rescale, guidance_layout, guider, model_dtype)``,
        in `ModelCall.build`'s order."""
        return tuple(self)[: len(MODEL_CALL_OPTIONS)]


MODEL_CALL_OPTIONS = LoopOptions._fields[:6]
"""The options of the guided model call alone (`parallel_sample` takes these and ``start_step``)."""


def takes_options(*names: str) -> Callable[[Callable], Callable]:
    """Declares the `LoopOptions` fields ``names`` (all of them when none is named) as keyword-only
    parameters of a public loop that takes them as ``**options``, after its own: its signature
    (``inspect.signature``, ``help``, the API docs) shows each with its type and default."""

    def declare(loop: Callable) -> Callable:
        own = inspect.signature(loop)
        fixed = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, default, annotation in _declared(names or LoopOptions._fields)
        ]
        loop.__signature__ = own.replace(parameters=fixed + shared)
        return loop

    return declare


def _declared(names: tuple[str, ...]) -> list[tuple[str, Any, str]]:
    """``(name, default, annotation)`` of these `LoopOptions` fields, the annotation a string as
    under ``from __future__ import annotations`` (NamedTuple holds it as a ForwardRef)."""
    annotations = LoopOptions.__annotations__
    return [
        (
            name,
            LoopOptions._field_defaults[name],
            getattr(annotations[name], "__forward_arg__", annotations[name]),
        )
        for name in names
    ]


class Plan(NamedTuple):
    """What the driver decided before the method prepares: the runtime-length loop or the
    static scan, the first schedule entry run (int, or int32 scalar when runtime) and the
    compute dtype of the carry."""

    runtime: bool
    start: int | jax.Array
    dtype: Any


class Prepared(NamedTuple):
    """A method's loop, ready to run.

    Attributes:
      carry: the initial carry (latents, or the method's pytree of them).
      timesteps: ``(M,)``, the timestep the model is called at for each schedule entry.
      step: ``step(model, carry, row) -> StepOutput``: one step; ``model(x)`` is the guided
        model output at the entry's timestep and ``row`` the entry of ``rows``.
      rows: the method's own per-entry tables (a pytree of arrays with leading axis M), or None.
      index: ``(M,)`` int32, `GuidanceInfo.step` of each entry; None: the entry's own index.
      valid: False (a traced bool) for an invalid traced value: all-NaN outputs.
      skip: leading entries (from ``start_step``) already done, not run.
    """

    carry: Any
    timesteps: jax.Array
    step: Callable[[Callable[[jax.Array], Any], Any, Any], StepOutput]
    rows: Any = None
    index: jax.Array | None = None
    valid: bool | jax.Array = True
    skip: int = 0


class Method(NamedTuple):
    """What a loop states about itself; `run_loop` does the rest.

    Attributes:
      supports: the loop's name and capabilities (`Supports`).
      input_name: the name of the latents argument, for messages (``"latents"``, ``"x0"``).
      reverse: True for an inversion (the schedule's entries last to first).
      prepare: ``prepare(state, latents, plan) -> Prepared``: the method's own checks and
        values (called after the shared checks), its carry, per-entry tables and step.
      result: ``result(carry)``: what the loop returns from its final carry.
      record: ``record(carry)``: the sample a trajectory row (and so the result) follows.
      first: ``first(latents)``: the array the shared checks look at (a coupled pair's first).
      check: ``check(state)``: config checks run before the others, or None.
    """

    supports: Supports
    input_name: str
    reverse: bool
    prepare: Callable[[DDIMState, Any, Plan], Prepared]
    result: Callable[[Any], Any] = lambda carry: carry
    record: Callable[[Any], jax.Array] = lambda carry: carry
    first: Callable[[Any], Any] = lambda latents: latents
    check: Callable[[DDIMState], None] | None = None


def exact_inversion_method(
    name: str,
    input_name: str,
    inverse: bool,
    prepare: Callable,
    *,
    no_split_output: str | None = None,
    **fields,
) -> Method:
    """A `Method` of an exact-inversion loop, one that undoes each step algebraically: a config
    whose steps can be undone (no clipping, no thresholding; an inversion's first step not from
    alpha = 1 with an x0 prediction) and stateless guiders; ``fields`` are the other fields."""

    def check(state: DDIMState) -> None:
        check_invertible_config(state.config, name)
        if inverse:
            check_sample_prediction_start(state.config, name)

    reason = "exact inversion needs each step to depend on its own inputs alone"
    supports = Supports(name, no_guider_state=reason, no_split_output=no_split_output)
    return Method(supports, input_name, inverse, prepare, check=check, **fields)


def plan_loop(
    method: Method,
    state: DDIMState,
    latents: Any,
    start_step: Any,
    *,
    return_trajectory: bool = False,
    remat: bool = False,
    callback: StepCallback | None = None,
    callback_every: int = 1,
    unroll: int = 1,
) -> tuple[Plan, int]:
    """The shared checks of a loop; returns its `Plan` and the checked ``unroll``."""
    name = method.supports.name
    check_ready(state, name)
    if method.check is not None:
        method.check(state)
    x = method.first(latents)
    check_latents(method.input_name, x, name)
    check_static_bools(return_trajectory=return_trajectory, remat=remat)
    check_loop_options(x, callback, callback_every)
    runtime, start, unroll = check_schedule_options(name, state, start_step, remat, unroll)
    return Plan(runtime, start, compute_dtype(x)), unroll


class _Carry(NamedTuple):
    """The driver's carry: the method's carry and the guider's state beside it."""

    method: Any
    guider_state: Any


def run_loop(method: Method, model_fn: ModelFn, state: DDIMState, latents: Any, options: Mapping) -> Any:
    """Runs ``method`` over ``state``'s schedule from ``latents``: one ``lax.scan`` for a static
    schedule and a Python ``start_step``, else the runtime-length loop (`padded_steps`).
    ``options``: the `LoopOptions` the public loop got as ``**options`` (`takes_options`)."""
    options = LoopOptions.read(method.supports.name, options)
    plan, unroll = plan_loop(
        method,
        state,
        latents,
        options.start_step,
        return_trajectory=options.return_trajectory,
        remat=options.remat,
        callback=options.callback,
        callback_every=options.callback_every,
        unroll=options.unroll,
    )
    model = ModelCall.build(
        method.supports,
        state,
        method.first(latents),
        model_fn,
        *options.model_call(),
    )
    prepared = method.prepare(state, latents, plan)
    index = prepared.index
    if index is None:
        index = jnp.arange(prepared.timesteps.shape[0], dtype=jnp.int32)
    xs = (prepared.timesteps, index, prepared.rows)

    def update(carry: _Carry, inputs: tuple) -> StepOutput:
        t, i, row = inputs
        guider_states = []

        def call(x):
            out, guider_state = model.guided(x, t, i, carry.guider_state)
            guider_states.append(guider_state)
            return out

        out = prepared.step(call, carry.method, row)
        # Only a method that carries a guider's state calls the model once per step, outside
        # any inner loop; the others take stateless guiders (checked by ModelCall.build).
        carries = method.supports.no_guider_state is None and guider_states
        guider_state = guider_states[-1] if carries else carry.guider_state
        return StepOutput(_Carry(out.prev_sample, guider_state), out.pred_original_sample)

    steps = Steps(
        update,
        lambda carry: method.record(carry.method),
        options.return_trajectory,
        options.callback,
        options.callback_every,
        unroll,
    )
    carry = _Carry(prepared.carry, model.init(method.record(prepared.carry)))
    if plan.runtime:
        valid, count = steps_to_run(state, plan.start, prepared.skip)
        first = plan.start + prepared.skip
        carry, trajectory = padded_steps(steps, carry, xs, first, count, method.reverse)
        final = jax.tree.map(lambda v: jnp.where(valid, v, jnp.nan), carry.method)
    else:
        first = plan.start + prepared.skip
        ordered = jax.tree.map(lambda v: v[first:][::-1] if method.reverse else v[first:], xs)
        carry, trajectory = scan_steps(steps, carry, ordered, options.remat)
        final = carry.method
    result = method.result(final)
    return nan_unless(prepared.valid, (result, trajectory) if options.return_trajectory else result)
