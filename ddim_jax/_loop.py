"""Machinery shared by the `sample` and `invert` loops: the guided model call and the scan."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._checks import (
    as_int32,
    check_invertible_config,
    check_positive_int,
    check_ready,
    check_same_shape,
    check_static_schedule,
    is_int_scalar,
    is_traced,
    numeric,
    shown,
)
from ddim_jax._guidance import per_example_value
from ddim_jax._guiders import GuidanceInfo, Guider, ScaleSchedule, cfg, check_guidance_combination
from ddim_jax._noise import is_per_example
from ddim_jax._padded import schedule_is_valid
from ddim_jax._step import GuidedOutput, StepOutput

__all__ = ["Trajectory", "ModelFn", "StepCallback"]

ModelFn = Callable[..., jax.Array]
"""``model_fn(x, t, *model_args) -> model_output``; ``t`` is an int32 scalar array."""

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


GUIDANCE_LAYOUTS = ("concat", "interleave")


def check_model_output(out: Any) -> None:
    """A model output must be an array: diffusers-style output objects, tuples and dicts get a
    TypeError that says which element to return."""
    if isinstance(out, (jax.Array, np.ndarray)) or (hasattr(out, "shape") and hasattr(out, "dtype")):
        return
    kind = type(out).__name__
    if hasattr(out, "sample"):
        fix = "return its .sample, e.g. `return unet.apply(...).sample`"
    elif isinstance(out, Mapping):
        fix = f"return the array itself, e.g. out[{next(iter(out), 'sample')!r}]"
    elif isinstance(out, (tuple, list)):
        fix = "return the array itself, e.g. `return unet.apply(..., return_dict=False)[0]`"
    else:
        fix = "return a jax array of the latents' shape"
    raise TypeError(f"model_fn must return an array, got a {kind}: {fix}")


class GuidedCarry(NamedTuple):
    """A loop's carry with a guider's state beside the sample (the trajectory records ``x``)."""

    x: Any
    guider_state: Any


def sample_of(carry: Any) -> Any:
    """The sample in a loop's carry: ``carry.x`` of a `GuidedCarry`, else the carry itself."""
    return carry.x if isinstance(carry, GuidedCarry) else carry


STATEFUL_LOOPS = ("sample", "invert")  # the loops that carry a guider's state through their steps


class ModelCall(NamedTuple):
    """How a loop calls the model each step: arguments, guidance and dtype, validated once.

    ``guidance_layout`` orders the doubled batch of a guided call: ``"concat"`` (diffusers'
    ``[x, x]``, with conditioning ``concat([uncond, cond])``) or ``"interleave"``
    (``[x_0, x_0, x_1, x_1, ...]``, with conditioning ``stack([uncond, cond], 1)`` flattened to
    the batch axis), which keeps each example's pair on its device when the batch is sharded.
    ``guider`` (or the CFG shorthand ``guidance_scale``) turns the two outputs into one;
    ``state`` is the loop's `DDIMState`, from which each step's `GuidanceInfo` is read, and
    ``loop`` the public function's name (`invert` sets ``info.inverse``; only `sample` and
    `invert` carry a guider's state; EDICT's coupled step takes one output, not a split one).
    """

    model_fn: ModelFn
    model_args: tuple
    guidance_scale: float | jax.Array | None
    guidance_rescale: float | jax.Array
    guidance_layout: str
    model_dtype: Any
    guider: Guider | None = None
    state: Any = None
    loop: str = "sample"

    def check(self, latents: Any = None) -> None:
        if not callable(self.model_fn):
            raise TypeError(f"model_fn must be callable, got {type(self.model_fn).__name__}")
        if not isinstance(self.model_args, tuple):
            raise TypeError(f"model_args must be a tuple, got {type(self.model_args).__name__}")
        if self.guidance_layout not in GUIDANCE_LAYOUTS:
            raise ValueError(
                f"guidance_layout must be one of {list(GUIDANCE_LAYOUTS)}, got {self.guidance_layout!r}"
            )
        if self.model_dtype is not None and not jnp.issubdtype(self.model_dtype, jnp.floating):
            raise TypeError(f"model_dtype must be a float dtype or None, got {self.model_dtype!r}")
        scale, rescale, layout = self.guidance_scale, self.guidance_rescale, self.guidance_layout
        check_guidance_combination(scale, rescale, layout, self.guider)
        if self.guider is None:
            if latents is not None and scale is not None:  # values and shapes, no compute
                cfg(scale, rescale)  # the values (a scale_schedule too); then each one's batch
                for name, value in (("guidance_scale", scale), ("guidance_rescale", rescale)):
                    if not isinstance(value, ScaleSchedule):
                        per_example_value(name, numeric(name, value), latents)
            return
        if not isinstance(self.guider, Guider):
            raise TypeError(
                f"guider must be a Guider (e.g. ddim_jax.cfg(7.5)), got {type(self.guider).__name__}"
            )
        if self.guidance_scale is not None:
            raise ValueError(
                "pass guidance_scale (the CFG shorthand) or guider, not both: "
                "cfg(guidance_scale, guidance_rescale) is the guider the shorthand makes"
            )
        if any(i >= len(self.model_args) for i in self.guider.conditional_args):
            raise ValueError(
                f"the guider's conditional_args {self.guider.conditional_args} name positions past "
                f"model_args, which has {len(self.model_args)} entries"
            )
        stateful = latents is not None and jax.tree.leaves(jax.eval_shape(self.guider.init, latents))
        if stateful and self.loop not in STATEFUL_LOOPS:
            why = (
                "its steps do not run in order"
                if self.loop == "parallel_sample"
                else "exact inversion needs each step to depend on its own inputs alone"
            )
            raise ValueError(
                f"{self.loop} needs a stateless guider (one whose init returns no arrays): {why}; a "
                "guider's state (e.g. apg's momentum) is carried by sample and invert only"
            )

    def _guider(self) -> Guider | None:
        if self.guider is None and self.guidance_scale is not None:
            return cfg(self.guidance_scale, self.guidance_rescale)
        return self.guider

    def init(self, x: jax.Array) -> Any:
        """The guider's initial state for latents ``x`` (``()`` without one)."""
        guider = self._guider()
        return () if guider is None else guider.init(x)

    def __call__(self, x: jax.Array, t: jax.Array) -> Any:
        """The (guided) model output for ``x`` at ``t``, in ``x``'s dtype, for a stateless guider."""
        return self.guided(x, t, self.init(x))[0]

    def guided(self, x: jax.Array, t: jax.Array, guider_state: Any) -> tuple[Any, Any]:
        """``(output, new guider state)`` for ``x`` at ``t``: an array, or a `GuidedOutput`."""
        guider = self._guider()
        x_in = x if self.model_dtype is None else x.astype(self.model_dtype)
        if guider is None:
            return self._single(x, x_in, t, self.model_args), guider_state
        info = GuidanceInfo(
            jnp.argmax(self.state.timesteps == t).astype(jnp.int32),
            self.state.num_inference_steps,
            t,
            self.state.alphas_cumprod[t],
            x,
            self.state.config.prediction_type,
            self.loop == "invert",
        )

        def guide(guider_state):
            uncond, cond = self._doubled(x, x_in, t)
            out, guider_state = guider.apply(guider_state, uncond, cond, info)
            if isinstance(out, GuidedOutput) and self.loop.startswith("edict"):
                raise ValueError(
                    f"{self.loop} takes one model output per call: its coupled step cannot split it "
                    "as a GuidedOutput (CFG++) needs; use sample / invert or bdia_sample / bdia_invert"
                )
            check_same_shape(
                "the guider's output", out.denoise if isinstance(out, GuidedOutput) else out, "latents", x
            )
            return jax.tree.map(lambda v: v.astype(x.dtype), out), guider_state

        if guider.active is None:
            return guide(guider_state)
        split = []

        def guided_branch(guider_state):
            out, guider_state = guide(guider_state)
            split.append(isinstance(out, GuidedOutput))
            return (out if split[-1] else GuidedOutput(out, out)), guider_state

        def conditional_branch(guider_state):
            cond = self._conditional(x, x_in, t, guider.conditional_args)
            return GuidedOutput(cond, cond), guider_state

        out, guider_state = jax.lax.cond(guider.active(info), guided_branch, conditional_branch, guider_state)
        return (out if split[-1] else out.denoise), guider_state

    def _single(self, x: jax.Array, x_in: jax.Array, t: jax.Array, model_args: tuple) -> jax.Array:
        out = self.model_fn(x_in, t, *model_args)
        check_model_output(out)
        check_same_shape("model_fn output", out, "latents", x)
        return out.astype(x.dtype)

    def _doubled(self, x: jax.Array, x_in: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The unconditional and conditional outputs of one call on the doubled batch."""
        batch = x.shape[0]
        if self.guidance_layout == "concat":
            doubled = jnp.concatenate([x_in, x_in])
        else:
            doubled = jnp.repeat(x_in, 2, axis=0)
        out = self.model_fn(doubled, t, *self.model_args)
        check_model_output(out)
        if jnp.shape(out) != doubled.shape:
            order = "[uncond, cond]" if self.guidance_layout == "concat" else "[uncond_0, cond_0, ...]"
            raise ValueError(
                f"Shape mismatch: with guidance, model_fn must return the doubled batch "
                f"{order} of shape {doubled.shape}, got {jnp.shape(out)}"
            )
        out = out.astype(x.dtype)
        if self.guidance_layout == "concat":
            return tuple(jnp.split(out, 2))
        pairs = out.reshape((batch, 2) + x.shape[1:])
        return pairs[:, 0], pairs[:, 1]

    def _conditional(
        self, x: jax.Array, x_in: jax.Array, t: jax.Array, positions: tuple[int, ...]
    ) -> jax.Array:
        """The conditional output alone: one call on ``x`` with the conditioning at ``positions``
        halved, or (no positions) the doubled call's conditional half."""
        if not positions:
            return self._doubled(x, x_in, t)[1]
        batch = x.shape[0]

        def half(a):
            if jnp.shape(a)[:1] != (2 * batch,):
                raise ValueError(
                    f"conditional_args: model_args entries at {positions} must hold the doubled batch "
                    f"(leading axis 2 * batch = {2 * batch}), got an array of shape {jnp.shape(a)}"
                )
            return a[batch:] if self.guidance_layout == "concat" else a[1::2]

        args = tuple(
            jax.tree.map(half, arg) if i in positions else arg for i, arg in enumerate(self.model_args)
        )
        return self._single(x, x_in, t, args)


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


def check_exact_inversion_loop(
    fn: str, state: Any, x: Any, start_step: Any, callback: Any, every: Any, remat: bool, unroll: Any
) -> tuple[bool, int | jax.Array, int]:
    """The checks shared by the exact-inversion loops (EDICT, BDIA): a config whose steps can be
    undone, the loop options; returns `check_schedule_options`' ``(runtime, start, unroll)``."""
    check_ready(state, fn)
    check_invertible_config(state.config, fn)
    check_loop_options(x, callback, every)
    return check_schedule_options(fn, state, start_step, remat, unroll)


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


def loop_order(tables: Any, runtime: bool, start: int | jax.Array, reverse: bool) -> Any:
    """Per-step ``tables`` (schedule order, one entry per schedule step) as `run_steps` takes
    them: all entries for the runtime loop, entries ``[start:]`` in loop order for the scan."""
    if runtime:
        return tables
    return jax.tree.map(lambda v: v[start:][::-1] if reverse else v[start:], tables)


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


def report(
    callback: StepCallback, every: int, count: jax.Array, last: jax.Array, t: jax.Array, out: StepOutput
) -> None:
    """Calls ``callback(count, t, x0)`` on the host every ``every`` steps and at the last one."""
    jax.lax.cond(
        (count % every == 0) | last,
        lambda: jax.debug.callback(callback, count, t, out.pred_original_sample),
        lambda: None,
    )


def scan_steps(
    update: Callable[[jax.Array, Any], StepOutput],
    x: jax.Array,
    xs: tuple,
    *,
    return_trajectory: bool,
    callback: StepCallback | None,
    callback_every: int,
    remat: bool,
    unroll: int = 1,
) -> tuple[jax.Array, Trajectory | None]:
    """Runs ``update`` over ``xs = (timesteps, ...)`` in one ``lax.scan``.

    ``update(x, xs_i)`` returns a `StepOutput`; with ``remat`` each step's activations are
    recomputed on the backward pass (``jax.checkpoint``); ``unroll`` is the scan's.
    """
    timesteps = xs[0]
    num_steps = timesteps.shape[0]
    step_fn = jax.checkpoint(update) if remat else update

    def body(x, inputs):
        index, step_inputs = inputs
        out = step_fn(x, step_inputs)
        if callback is not None:
            report(callback, callback_every, index, index == num_steps - 1, step_inputs[0], out)
        record = (
            Trajectory(sample_of(out.prev_sample), out.pred_original_sample) if return_trajectory else None
        )
        return out.prev_sample, record

    indices = jnp.arange(num_steps, dtype=jnp.int32)
    x, trajectory = jax.lax.scan(body, x, (indices, xs), unroll=unroll)
    return x, trajectory


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
    update: Callable[[Any, Any], StepOutput],
    x: Any,
    xs: tuple,
    *,
    schedule: jax.Array,
    num_steps: int | jax.Array,
    start_step: jax.Array,
    num_train_timesteps: int,
    reverse: bool,
    return_trajectory: bool,
    callback: StepCallback | None,
    callback_every: int,
    unroll: int = 1,
    skip: int = 0,
) -> tuple[Any, Trajectory | None]:
    """Runs ``update`` over entries ``[start_step + skip, num_steps)`` of the per-step tables
    ``xs`` (each of length M, the schedule's order; ``reverse`` visits them last to first):
    S - start_step - skip model calls, whatever M.

    The steps run in blocks of `runtime_block` steps, an inner ``lax.scan`` (with ``unroll``)
    per iteration of a ``fori_loop`` with a traced trip count, then the remaining steps one per
    iteration of a second ``fori_loop``: a block-size fraction of the traced-bound iterations.

    When ``schedule`` (the state's timesteps), S or ``start_step`` are out of range
    (`schedule_is_valid`), no step runs and the outputs are NaN. The trajectory has M rows,
    the steps in loop order first, NaN after them. Not reverse-differentiable (a while loop).
    """
    valid = schedule_is_valid(schedule, num_steps, start_step, num_train_timesteps)
    first = start_step + skip
    count = jnp.where(valid, num_steps - first, 0)  # steps to run
    max_steps = xs[0].shape[0]

    def one_step(i, carry):
        x, trajectory = carry
        index = first + count - 1 - i if reverse else first + i
        step_inputs = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), xs)
        out = update(x, step_inputs)
        if callback is not None:
            report(callback, callback_every, i, i == count - 1, step_inputs[0], out)
        if return_trajectory:
            row = Trajectory(sample_of(out.prev_sample), out.pred_original_sample)
            trajectory = jax.tree.map(lambda rows, v: rows.at[i].set(v), trajectory, row)
        return out.prev_sample, trajectory

    empty = None
    if return_trajectory:
        first_inputs = jax.tree.map(lambda a: a[0], xs)
        shapes = jax.eval_shape(update, x, first_inputs)
        row = Trajectory(sample_of(shapes.prev_sample), shapes.pred_original_sample)
        empty = jax.tree.map(lambda v: jnp.full((max_steps, *v.shape), jnp.nan, v.dtype), row)
    carry, done = (x, empty), 0
    block = runtime_block(unroll, max_steps)
    if block > 1:

        def run_block(b, carry):
            def inner(carry, j):
                return one_step(b * block + j, carry), None

            return jax.lax.scan(inner, carry, jnp.arange(block, dtype=jnp.int32), unroll=unroll)[0]

        carry = jax.lax.fori_loop(0, count // block, run_block, carry)
        done = count // block * block
    x, trajectory = jax.lax.fori_loop(done, count, one_step, carry)
    return jax.tree.map(lambda v: jnp.where(valid, v, jnp.nan), sample_of(x)), trajectory


def run_steps(
    update: Callable[[jax.Array, Any], StepOutput],
    x: jax.Array,
    xs: tuple,
    state: Any,
    *,
    runtime: bool,
    start: int | jax.Array,
    reverse: bool,
    return_trajectory: bool,
    callback: StepCallback | None,
    callback_every: int,
    remat: bool,
    unroll: int,
    skip: int = 0,
) -> Any:
    """`padded_steps` (``runtime``) or `scan_steps` over ``xs``; the sample, or ``(sample, trajectory)``.

    ``skip`` leading steps of the runtime loop are not run (the scan's ``xs`` leave them out).
    """
    common = {"return_trajectory": return_trajectory, "callback": callback, "callback_every": callback_every}
    if runtime:
        x, trajectory = padded_steps(
            update,
            x,
            xs,
            schedule=state.timesteps,
            num_steps=state.num_inference_steps,
            start_step=start,
            num_train_timesteps=state.config.num_train_timesteps,
            reverse=reverse,
            unroll=unroll,
            skip=skip,
            **common,
        )
    else:
        x, trajectory = scan_steps(update, x, xs, remat=remat, unroll=unroll, **common)
        x = sample_of(x)
    return (x, trajectory) if return_trajectory else x
