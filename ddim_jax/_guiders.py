"""Guiders: guidance methods as a pair of pure functions, carried through the compiled loop.

A `Guider` is ``init(latents) -> state`` and ``apply(state, uncond, cond, info) -> (guided,
state)``, as optax's ``GradientTransformation`` is ``init`` / ``update``: all state lives in
the returned pytree, which the loops carry through their scan, and every hyperparameter is
closed over by a factory (`cfg`, `apg`, ...). Numeric hyperparameters may be arrays traced
under jit, so changing them reuses the compiled program.

Every method here works on the model output (epsilon, x0 or v, as the model predicts), as
diffusers' guiders do (``diffusers.guiders``); `GuidanceInfo` gives a guider what it needs to
work elsewhere (the sample, alpha_cumprod, the prediction type).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._checks import is_traced
from ddim_jax._guidance import classifier_free_guidance, per_example_value, rescale_noise_cfg
from ddim_jax._step import GuidedOutput

__all__ = [
    "GuidanceInfo",
    "Guider",
    "ScaleSchedule",
    "apg",
    "cfg",
    "cfg_pp",
    "cfg_zero_star",
    "guidance_window",
    "scale_schedule",
    "tangential_cfg",
]


class GuidanceInfo(NamedTuple):
    """What a guider knows about the step it guides.

    Attributes:
      step: int32 scalar, the index of this step's timestep in ``state.timesteps`` (sampling
        order, whatever the loop's direction or ``start_step``: a window or a schedule then
        means the same noise levels when sampling and inverting).
      num_steps: S, the schedule's number of steps (a Python int, or traced for a
        runtime-length state).
      timestep: int32 scalar, the timestep t the model was called at.
      alpha_cumprod: alpha_cumprod at t (float32 scalar).
      sample: x_t, the latents the model was called on.
      prediction_type: the config's ``"epsilon"``, ``"sample"`` or ``"v_prediction"`` (static).
      inverse: True in `invert` (the step goes up in noise); False when sampling and in EDICT
        and BDIA, whose inversions undo sampling steps exactly (static).

    Example:
      >>> from ddim_jax import GuidanceInfo
      >>> GuidanceInfo._fields[:3]
      ('step', 'num_steps', 'timestep')
    """

    step: jax.Array
    num_steps: int | jax.Array
    timestep: jax.Array
    alpha_cumprod: jax.Array
    sample: jax.Array
    prediction_type: str
    inverse: bool


class Guider(NamedTuple):
    """A guidance method: two pure functions (and, for windows, when to guide at all).

    Attributes:
      init: ``init(latents) -> state``, any pytree; return ``()`` for a stateless guider.
      apply: ``apply(state, uncond, cond, info) -> (guided, state)``: the unconditional and
        conditional model outputs and the step's `GuidanceInfo` give the output the step
        uses, an array or a `GuidedOutput` (x0 from one part, epsilon from the other).
      active: None (guide every step), or ``active(info) -> bool scalar``: where False the
        loop calls the model on the conditional batch alone and uses its output (see
        `guidance_window`).
      conditional_args: the positions in ``model_args`` holding conditioning for the doubled
        batch; where ``active`` is False the model sees their conditional half alone.

    Example (a guider of your own: CFG on the conditional output's side):
      >>> import jax.numpy as jnp
      >>> from ddim_jax import Guider
      >>> def apply(state, uncond, cond, info):
      ...     return cond + 2.0 * (cond - uncond), state
      >>> mine = Guider(init=lambda latents: (), apply=apply)
      >>> mine.apply((), jnp.zeros(2), jnp.ones(2), None)[0].tolist()
      [3.0, 3.0]
    """

    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array, jax.Array, GuidanceInfo], tuple[Any, Any]]
    active: Callable[[GuidanceInfo], jax.Array] | None = None
    conditional_args: tuple[int, ...] = ()


class ScaleSchedule(NamedTuple):
    """Per-step values of a guider's parameter: ``values[info.step]`` at each step (see `scale_schedule`).

    Attributes:
      values: ``(S,)``, or ``(S, batch)`` for one value per step and example.

    Example:
      >>> from ddim_jax import ScaleSchedule
      >>> ScaleSchedule([1.0, 2.0]).values
      [1.0, 2.0]
    """

    values: jax.Array


def scale_schedule(values: Any) -> ScaleSchedule:
    """Marks ``values`` as one value per step of the schedule, for any numeric guider parameter.

    ``values[i]`` applies at the step whose timestep is ``state.timesteps[i]`` (i counts in
    sampling order, from 0 to S - 1, whatever ``start_step``). ``values`` has shape ``(S,)``,
    or ``(S, batch)`` for one value per example too; it may be traced (no recompilation when
    it changes). With a runtime-length state, give M = ``max_steps`` entries: the steps past
    the given entries get NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import cfg, scale_schedule
      >>> guider = cfg(scale_schedule(jnp.linspace(7.5, 1.0, 25)))  # strong early, weak late
      >>> guider.init(jnp.zeros((1, 4)))
      ()
    """
    if jnp.ndim(values) not in (1, 2):
        raise ValueError(
            f"scale_schedule values must have shape (S,) or (S, batch), got shape {jnp.shape(values)}"
        )
    if not jnp.issubdtype(jnp.result_type(values), jnp.number):
        raise TypeError(f"scale_schedule values must be numbers, got dtype {jnp.result_type(values)}")
    return ScaleSchedule(values)


def _value(name: str, value: Any, info: GuidanceInfo, like: jax.Array) -> Any:
    """A parameter at this step: a scalar, one value per example, or a `ScaleSchedule`'s entry."""
    if isinstance(value, ScaleSchedule):
        values = jnp.asarray(value.values)
        length = values.shape[0]
        if isinstance(info.num_steps, int) and length != info.num_steps:
            raise ValueError(
                f"{name} is a scale_schedule of {length} values; the schedule has S = {info.num_steps} steps"
            )
        entry = values[jnp.minimum(info.step, length - 1)]
        value = jnp.where(info.step < length, entry, jnp.nan)  # a runtime S past the values: NaN
    return per_example_value(name, value, like)


def _check_value(name: str, value: Any) -> None:
    """A scalar, a ``(batch,)`` array or a `ScaleSchedule` (the batch is checked at the first step)."""
    if isinstance(value, ScaleSchedule):
        return
    if jnp.ndim(value) > 1:
        raise ValueError(
            f"{name} must be a scalar, one value per example (shape (batch,)) or a scale_schedule, "
            f"got shape {jnp.shape(value)}"
        )
    if not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise TypeError(f"{name} must be a number, got {value!r}")


def _known(value: Any) -> np.ndarray | None:
    """The value as a float64 array when it is known in Python (not traced), else None."""
    if isinstance(value, ScaleSchedule):
        value = value.values
    return None if is_traced(value) else np.asarray(value, np.float64)


def _stateless(latents: jax.Array) -> tuple:
    return ()


def _rescaled(guided: jax.Array, cond: jax.Array, guidance_rescale: Any, info: GuidanceInfo) -> jax.Array:
    phi = _value("guidance_rescale", guidance_rescale, info, cond)
    if isinstance(phi, (int, float)) and phi == 0:
        return guided
    return rescale_noise_cfg(guided, cond, jnp.reshape(phi, jnp.shape(phi)[:1]))


def cfg(guidance_scale: Any = 7.5, guidance_rescale: Any = 0.0) -> Guider:
    """Classifier-free guidance ``uncond + w (cond - uncond)``, then guidance rescale phi.

    diffusers' ``ClassifierFreeGuidance`` (Ho & Salimans 2022; rescale: Lin et al. 2023), on
    the model output. The loops' ``guidance_scale=w, guidance_rescale=phi`` is ``cfg(w, phi)``.

    Args:
      guidance_scale: w; a scalar, one per example ``(batch,)``, or a `scale_schedule`.
      guidance_rescale: phi in [0, 1]; the same forms.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import cfg
      >>> guided, _ = cfg(3.0).apply((), jnp.zeros((1, 2)), jnp.ones((1, 2)), None)
      >>> guided.tolist()
      [[3.0, 3.0]]
    """
    _check_value("guidance_scale", guidance_scale)
    _check_value("guidance_rescale", guidance_rescale)

    def apply(state, uncond, cond, info):
        w = _value("guidance_scale", guidance_scale, info, cond)
        phi = _value("guidance_rescale", guidance_rescale, info, cond)
        flat = lambda v: v if isinstance(v, (int, float)) else jnp.reshape(v, jnp.shape(v)[:1])  # noqa: E731
        return classifier_free_guidance(uncond, cond, flat(w), flat(phi)), state

    return Guider(_stateless, apply)


def cfg_zero_star(guidance_scale: Any = 7.5, zero_init_steps: Any = 1, guidance_rescale: Any = 0.0) -> Guider:
    """CFG-Zero* (Fan et al. 2025): CFG with the unconditional output scaled by its optimal weight.

    diffusers' ``ClassifierFreeZeroStarGuidance``, on the model output: per example,
    ``s = <cond, uncond> / (|uncond|^2 + 1e-8)``, then ``s uncond + w (cond - s uncond)``;
    the first ``zero_init_steps`` steps of the schedule output zeros ("zero-init").

    Args:
      guidance_scale: w; a scalar, one per example ``(batch,)``, or a `scale_schedule`.
      zero_init_steps: an int >= 0 (may be traced): the steps ``info.step < zero_init_steps``
        output zeros (diffusers' default 1).
      guidance_rescale: phi, as in `cfg`.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import cfg_zero_star
      >>> uncond, cond = jnp.array([[1.0, 0.0]]), jnp.array([[2.0, 1.0]])
      >>> guided, _ = cfg_zero_star(3.0, zero_init_steps=0).apply((), uncond, cond, None)
      >>> guided.tolist()  # s = 2: 2 * uncond + 3 * (cond - 2 * uncond)
      [[2.0, 3.0]]
    """
    _check_value("guidance_scale", guidance_scale)
    _check_value("guidance_rescale", guidance_rescale)
    steps = _known(zero_init_steps)
    if jnp.ndim(zero_init_steps) != 0 or not jnp.issubdtype(jnp.result_type(zero_init_steps), jnp.integer):
        raise TypeError(f"zero_init_steps must be an int scalar, got {zero_init_steps!r}")
    if steps is not None and steps < 0:
        raise ValueError(f"zero_init_steps must be an int >= 0, got {int(steps)}")

    def apply(state, uncond, cond, info):
        w = _value("guidance_scale", guidance_scale, info, cond)
        flat_c, flat_u = cond.reshape(cond.shape[0], -1), uncond.reshape(uncond.shape[0], -1)
        s = jnp.sum(flat_c * flat_u, axis=1) / (jnp.sum(flat_u**2, axis=1) + 1e-8)
        scaled = uncond * s.reshape((-1,) + (1,) * (cond.ndim - 1))
        guided = scaled + w * (cond - scaled)
        if info is not None:
            guided = jnp.where(info.step < zero_init_steps, jnp.zeros_like(guided), guided)
        return _rescaled(guided, cond, guidance_rescale, info), state

    return Guider(_stateless, apply)


def apg(
    guidance_scale: Any = 7.5,
    *,
    momentum: Any = None,
    norm_threshold: Any = 15.0,
    eta: Any = 1.0,
    guidance_rescale: Any = 0.0,
) -> Guider:
    """Adaptive projected guidance (Sadat et al. 2024): CFG's update, clipped and mostly orthogonal.

    diffusers' ``AdaptiveProjectedGuidance``, on the model output. Per example, the
    difference ``d = cond - uncond`` is (1) accumulated with momentum, ``d <- d + momentum *
    previous`` (the loop carries ``previous``: a stateful guider), (2) scaled down to norm
    ``norm_threshold`` if longer, (3) split into its parts parallel and orthogonal to ``cond``;
    the output is ``uncond + w (d_orthogonal + eta d_parallel)``.

    Args:
      guidance_scale: w; a scalar, one per example ``(batch,)``, or a `scale_schedule`.
      momentum: None (no momentum: a stateless guider) or a number (the paper uses -0.5);
        the same forms as ``guidance_scale``.
      norm_threshold: the largest norm of ``d`` (the paper's r; <= 0 turns clipping off).
      eta: the weight of the parallel part (0: orthogonal only; 1: CFG's).
      guidance_rescale: phi, as in `cfg`.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import apg
      >>> uncond, cond = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 1.0]])
      >>> guided, _ = apg(2.0, eta=0.0).apply((), uncond, cond, None)
      >>> [round(v, 3) for v in guided[0].tolist()]  # d = (1, 0): orthogonal part (0.5, -0.5)
      [1.0, 0.0]
    """
    for name, value in [("guidance_scale", guidance_scale), ("norm_threshold", norm_threshold), ("eta", eta)]:
        _check_value(name, value)
    _check_value("guidance_rescale", guidance_rescale)
    if momentum is not None:
        _check_value("momentum", momentum)

    def init(latents):
        if momentum is None:
            return ()
        return jnp.zeros(jnp.shape(latents), jnp.result_type(latents))

    def apply(state, uncond, cond, info):
        axes = tuple(range(1, cond.ndim))
        diff = cond - uncond
        if momentum is not None:
            diff = diff + _value("momentum", momentum, info, cond) * state
            state = diff
        threshold = _value("norm_threshold", norm_threshold, info, cond)
        norm = jnp.sqrt(jnp.sum(diff**2, axis=axes, keepdims=True))
        clipped = jnp.minimum(1.0, threshold / jnp.where(norm > 0, norm, 1.0))
        diff = diff * jnp.where((threshold > 0) & (norm > 0), clipped, 1.0)
        unit = cond / jnp.maximum(jnp.sqrt(jnp.sum(cond**2, axis=axes, keepdims=True)), 1e-12)
        parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
        update = diff - parallel + _value("eta", eta, info, cond) * parallel
        guided = uncond + _value("guidance_scale", guidance_scale, info, cond) * update
        return _rescaled(guided, cond, guidance_rescale, info), state

    return Guider(init, apply)


def tangential_cfg(guidance_scale: Any = 7.5, guidance_rescale: Any = 0.0) -> Guider:
    """Tangential CFG (Sun et al. 2025): CFG with the unconditional output projected onto the
    pair's principal direction.

    diffusers' ``TangentialClassifierFreeGuidance``, on the model output: per example, the
    top right-singular vector v of the 2 x N matrix ``[cond; uncond]`` (computed from its
    2 x 2 Gram matrix), ``u = <uncond, v> v``, then ``u + w (cond - u)``.

    Args:
      guidance_scale: w; a scalar, one per example ``(batch,)``, or a `scale_schedule`.
      guidance_rescale: phi, as in `cfg`.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import tangential_cfg
      >>> same = jnp.array([[1.0, 2.0]])
      >>> guided, _ = tangential_cfg(5.0).apply((), same, same, None)  # cond = uncond: no change
      >>> [round(v, 4) for v in guided[0].tolist()]
      [1.0, 2.0]
    """
    _check_value("guidance_scale", guidance_scale)
    _check_value("guidance_rescale", guidance_rescale)

    def apply(state, uncond, cond, info):
        pair = jnp.stack([cond.reshape(cond.shape[0], -1), uncond.reshape(uncond.shape[0], -1)], 1)
        gram = pair @ jnp.swapaxes(pair, 1, 2)  # (batch, 2, 2)
        _, vectors = jnp.linalg.eigh(gram)
        direction = jnp.einsum("bk,bkn->bn", vectors[:, :, -1], pair)  # s_1 v_1, the top singular pair
        length = jnp.sum(direction**2, axis=1)
        weight = jnp.sum(pair[:, 1] * direction, axis=1) / jnp.where(length > 0, length, 1.0)
        projected = (weight[:, None] * direction).reshape(uncond.shape).astype(uncond.dtype)
        guided = projected + _value("guidance_scale", guidance_scale, info, cond) * (cond - projected)
        return _rescaled(guided, cond, guidance_rescale, info), state

    return Guider(_stateless, apply)


def cfg_pp(guidance_scale: Any = 0.6) -> Guider:
    """CFG++ (Chung et al. 2024): the step's x0 from the guided output, its re-noising from the
    unconditional one.

    Returns a `GuidedOutput`: sampling predicts x0 from ``uncond + lambda (cond - uncond)`` and
    takes epsilon from ``uncond`` (the paper's Algorithm 1); `invert` swaps the two (its
    Algorithm 2: x0 from ``uncond``, epsilon from the guided output). For any prediction type.
    lambda = 0 is the unconditional model; the paper compares lambda = 0.6 with CFG's w = 7.5.

    Args:
      guidance_scale: lambda in [0, 1]; a scalar, one per example ``(batch,)``, or a
        `scale_schedule`. A traced value outside [0, 1] gives NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import cfg_pp
      >>> out, _ = cfg_pp(0.5).apply((), jnp.zeros((1, 2)), jnp.ones((1, 2)), None)
      >>> out.denoise.tolist(), out.renoise.tolist()
      ([[0.5, 0.5]], [[0.0, 0.0]])
    """
    _check_value("guidance_scale", guidance_scale)
    known = _known(guidance_scale)
    if known is not None and not ((known >= 0) & (known <= 1)).all():
        raise ValueError(f"cfg_pp's guidance_scale (lambda) must be in [0, 1], got {known.tolist()}")

    def apply(state, uncond, cond, info):
        lam = _value("guidance_scale", guidance_scale, info, cond)
        lam = jnp.where((lam >= 0) & (lam <= 1), lam, jnp.nan)
        guided = uncond + lam * (cond - uncond)
        if info is not None and info.inverse:
            return GuidedOutput(uncond, guided), state
        return GuidedOutput(guided, uncond), state

    return Guider(_stateless, apply)


def _first_step(fraction: Any, num_steps: Any) -> Any:
    """diffusers' ``int(fraction * S)``: in Python when both are known, else floor in float32."""
    if not is_traced(fraction) and isinstance(num_steps, int):
        return int(float(fraction) * num_steps)
    return jnp.floor(jnp.asarray(fraction, jnp.float32) * num_steps).astype(jnp.int32)


def guidance_window(
    guider: Guider, start: Any = 0.0, stop: Any = 1.0, *, conditional_args: tuple[int, ...] = ()
) -> Guider:
    """Guides only the steps in ``[int(start S), int(stop S))``; the others use the conditional output.

    diffusers' ``start`` / ``stop`` of every guider (Kynkaanniemi et al. 2024 apply guidance in
    a limited interval), on the schedule's steps in sampling order (`GuidanceInfo.step`).
    Outside the window the loop calls the model on the conditional batch alone, half the
    work, when ``conditional_args`` names the ``model_args`` that hold the doubled batch's
    conditioning (their conditional half is passed there: the second half for
    ``guidance_layout="concat"``, the odd rows for ``"interleave"``); with ``()`` the model runs
    on the doubled batch at every step and the conditional half is used outside. Both
    branches compile once (``lax.cond``); ``start`` and ``stop`` may be traced. The wrapped
    guider's state is left unchanged outside the window (APG's momentum pauses there).

    Args:
      guider: the guider to apply inside the window.
      start: the fraction of the S steps before the window, in [0, 1).
      stop: the fraction of the S steps where the window ends, in [start, 1].
      conditional_args: positions in ``model_args`` of the doubled conditioning.

    Example:
      >>> from ddim_jax import cfg, guidance_window
      >>> guider = guidance_window(cfg(7.5), 0.0, 0.5, conditional_args=(1,))  # first half of the steps
      >>> guider.conditional_args
      (1,)
    """
    if not isinstance(guider, Guider):
        raise TypeError(f"guider must be a Guider, got {type(guider).__name__}")
    for name, value in [("start", start), ("stop", stop)]:
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    first, last = _known(start), _known(stop)
    if first is not None and not 0.0 <= first < 1.0:
        raise ValueError(f"start must be in [0, 1), got {float(first)}")
    if last is not None and not (first if first is not None else 0.0) <= last <= 1.0:
        raise ValueError(f"stop must be in [start, 1], got start={start!r}, stop={float(last)}")
    if not isinstance(conditional_args, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in conditional_args
    ):
        raise TypeError(f"conditional_args must be a tuple of ints >= 0, got {conditional_args!r}")

    def valid():
        return jnp.asarray((start >= 0) & (start < 1) & (start <= stop) & (stop <= 1))

    def active(info):
        inside = (_first_step(start, info.num_steps) <= info.step) & (
            info.step < _first_step(stop, info.num_steps)
        )
        inside = inside | ~valid()  # an invalid traced window guides (to NaN, below)
        return inside if guider.active is None else inside & guider.active(info)

    def apply(state, uncond, cond, info):
        guided, state = guider.apply(state, uncond, cond, info)
        return jax.tree.map(lambda v: jnp.where(valid(), v, jnp.nan), guided), state

    return Guider(guider.init, apply, active, tuple(sorted(set(guider.conditional_args + conditional_args))))
