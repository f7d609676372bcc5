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

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._checks import FINITE, Interval, check_in, is_traced, nan_unless, numeric, shown
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
    "rescaled",
    "scale_schedule",
    "tangential_cfg",
]

PHI = Interval(0, 1)  # guidance_rescale: phi = 0 is plain CFG, 1 matches cond's std fully
LAMBDA = Interval(0, 1)  # CFG++'s lambda: 0 is the unconditional model
STEPS = Interval(0, math.inf, high_open=True)  # a count of steps (cfg_zero_star's zero_init_steps)


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
      valid: True, or the traced verdict on the guider's parameters (the bad-input rule: False
        makes ``apply``'s output NaN; a `guidance_window` guides then, so that the NaN shows
        even where it would not guide).

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
    valid: bool | jax.Array = True


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
    values = numeric("scale_schedule values", values)
    if jnp.ndim(values) not in (1, 2) or jnp.shape(values)[0] == 0:
        raise ValueError(
            "scale_schedule values must have shape (S,) or (S, batch) with S >= 1, "
            f"got shape {jnp.shape(values)}"
        )
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


def _param(name: str, value: Any, interval: Interval = FINITE) -> tuple[Any, bool | jax.Array]:
    """The bad-input rule for a guider parameter: ``(value, verdict)`` for a scalar, one value
    per example ``(batch,)`` (the batch is checked at the first step; a Python list becomes an
    array) or a `ScaleSchedule`, every value in ``interval`` by `check_in` (a known value
    outside raises; a traced one gives the verdict that the guider's output gets by
    `nan_unless`)."""
    if isinstance(value, ScaleSchedule):
        value = scale_schedule(value.values)  # one built by hand gets the same checks
        return value, check_in(name, value.values, interval)
    value = numeric(name, value)
    if jnp.ndim(value) > 1:
        raise ValueError(
            f"{name} must be a scalar, one value per example (shape (batch,)) or a scale_schedule, "
            f"got shape {jnp.shape(value)}"
        )
    return value, check_in(name, value, interval)


def _params(**params: tuple[Any, Interval]) -> tuple[list[Any], bool | jax.Array]:
    """`_param` for each ``name=(value, interval)``: the values, and True or the traced verdict."""
    values, valid = [], True
    for name, (value, interval) in params.items():
        value, ok = _param(name, value, interval)
        values.append(value)
        valid = valid & ok
    return values, valid


def _stateless(latents: jax.Array) -> tuple:
    return ()


def _rescaled(guided: jax.Array, cond: jax.Array, guidance_rescale: Any, info: GuidanceInfo) -> jax.Array:
    phi = _value("guidance_rescale", guidance_rescale, info, cond)
    if isinstance(phi, (int, float)) and phi == 0:
        return guided
    return rescale_noise_cfg(guided, cond, jnp.reshape(phi, jnp.shape(phi)[:1]))


def rescaled(guider: Guider, guidance_rescale: Any = 0.7) -> Guider:
    """Guidance rescale (Lin et al. 2023, Sec. 3.4) around any guider: its output's standard
    deviation, per example, pulled towards the conditional output's by phi.

    ``cfg(w, phi)`` is CFG then this rescale, as diffusers' ``guidance_rescale``; the other
    guiders' ``guidance_rescale=phi`` is ``rescaled(guider, phi)``, and so is a guider of your
    own. A window or a conditional-args setting of the wrapped guider is kept.

    Args:
      guider: the `Guider` whose output is rescaled (one array per step, not a `GuidedOutput`).
      guidance_rescale: phi in [0, 1]; a scalar, one per example ``(batch,)``, or a
        `scale_schedule`. 0 leaves the output unchanged.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import Guider, rescaled
      >>> double = Guider(lambda latents: (), lambda state, u, c, info: (2 * c, state))
      >>> cond = jnp.array([[1.0, -1.0]])
      >>> out, _ = rescaled(double, 1.0).apply((), cond, cond, None)  # std pulled back to cond's
      >>> out.tolist()
      [[1.0, -1.0]]
    """
    if not isinstance(guider, Guider):
        raise TypeError(f"guider must be a Guider, got {type(guider).__name__}")
    (guidance_rescale,), valid = _params(guidance_rescale=(guidance_rescale, PHI))

    def apply(state, uncond, cond, info):
        guided, state = guider.apply(state, uncond, cond, info)
        if isinstance(guided, GuidedOutput):
            raise ValueError(
                "rescaled: the guider returned a GuidedOutput (CFG++), which has no one guided "
                "output to rescale"
            )
        return nan_unless(valid, _rescaled(guided, cond, guidance_rescale, info)), state

    return guider._replace(apply=apply, valid=guider.valid & valid)


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
    (guidance_scale, guidance_rescale), valid = _params(
        guidance_scale=(guidance_scale, FINITE), guidance_rescale=(guidance_rescale, PHI)
    )

    def apply(state, uncond, cond, info):
        w = _value("guidance_scale", guidance_scale, info, cond)
        phi = _value("guidance_rescale", guidance_rescale, info, cond)
        flat = lambda v: v if isinstance(v, (int, float)) else jnp.reshape(v, jnp.shape(v)[:1])  # noqa: E731
        return nan_unless(valid, classifier_free_guidance(uncond, cond, flat(w), flat(phi))), state

    return Guider(_stateless, apply, valid=valid)


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
    (guidance_scale,), valid = _params(guidance_scale=(guidance_scale, FINITE))
    zero_init_steps = numeric("zero_init_steps", zero_init_steps)
    if jnp.ndim(zero_init_steps) != 0 or not jnp.issubdtype(jnp.result_type(zero_init_steps), jnp.integer):
        raise TypeError(f"zero_init_steps must be an int scalar, got {shown(zero_init_steps)}")
    valid = valid & check_in("zero_init_steps", zero_init_steps, STEPS, " (the steps that output zeros)")

    def apply(state, uncond, cond, info):
        w = _value("guidance_scale", guidance_scale, info, cond)
        flat_c, flat_u = cond.reshape(cond.shape[0], -1), uncond.reshape(uncond.shape[0], -1)
        s = jnp.sum(flat_c * flat_u, axis=1) / (jnp.sum(flat_u**2, axis=1) + 1e-8)
        scaled = uncond * s.reshape((-1,) + (1,) * (cond.ndim - 1))
        guided = scaled + w * (cond - scaled)
        if info is not None:
            guided = jnp.where(info.step < zero_init_steps, jnp.zeros_like(guided), guided)
        return nan_unless(valid, guided), state

    return rescaled(Guider(_stateless, apply, valid=valid), guidance_rescale)


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
    (guidance_scale, norm_threshold, eta), valid = _params(
        guidance_scale=(guidance_scale, FINITE),
        norm_threshold=(norm_threshold, FINITE),
        eta=(eta, FINITE),
    )
    if momentum is not None:
        momentum, momentum_valid = _param("momentum", momentum)
        valid = valid & momentum_valid

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
        return nan_unless(valid, guided), state

    return rescaled(Guider(init, apply, valid=valid), guidance_rescale)


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
    (guidance_scale,), valid = _params(guidance_scale=(guidance_scale, FINITE))

    def apply(state, uncond, cond, info):
        pair = jnp.stack([cond.reshape(cond.shape[0], -1), uncond.reshape(uncond.shape[0], -1)], 1)
        gram = pair @ jnp.swapaxes(pair, 1, 2)  # (batch, 2, 2)
        _, vectors = jnp.linalg.eigh(gram)
        direction = jnp.einsum("bk,bkn->bn", vectors[:, :, -1], pair)  # s_1 v_1, the top singular pair
        length = jnp.sum(direction**2, axis=1)
        weight = jnp.sum(pair[:, 1] * direction, axis=1) / jnp.where(length > 0, length, 1.0)
        projected = (weight[:, None] * direction).reshape(uncond.shape).astype(uncond.dtype)
        guided = projected + _value("guidance_scale", guidance_scale, info, cond) * (cond - projected)
        return nan_unless(valid, guided), state

    return rescaled(Guider(_stateless, apply, valid=valid), guidance_rescale)


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
    guidance_scale, valid = _param("cfg_pp's guidance_scale (lambda)", guidance_scale, LAMBDA)

    def apply(state, uncond, cond, info):
        lam = _value("guidance_scale", guidance_scale, info, cond)
        guided = uncond + lam * (cond - uncond)
        inverse = info is not None and info.inverse
        out = GuidedOutput(uncond, guided) if inverse else GuidedOutput(guided, uncond)
        return nan_unless(valid, out), state

    return Guider(_stateless, apply, valid=valid)


# A window's product f S is taken as the integer it is within this relative float32 round-off
# of (4 ulps): f = k / 100 reaches float32 as k / 100 (1 + d) with |d| <= 2**-24, so f S lands
# within 2**-23 f S of an integer k S / 100 when it is one, and 0.01 or more away otherwise.
SNAP = 2.0**-21


def _window_step(fraction: Any, num_steps: Any) -> jax.Array:
    """``floor(fraction * S)``, the same for known and traced values (one float32 formula for
    both): the float32 product, or the integer it is within `SNAP` of. Exact, ``k S // 100``,
    for every ``fraction = k / 100`` and S <= 1000 (diffusers' float64 ``int(f * S)`` is not:
    ``int(0.58 * 50) = 28``)."""
    product = jnp.asarray(fraction, jnp.float32) * jnp.asarray(num_steps, jnp.float32)
    nearest = jnp.round(product)
    # Comparisons with the product, not a difference: no fused multiply-add can change them.
    snapped = (product >= nearest * (1 - SNAP)) & (product <= nearest * (1 + SNAP))
    return jnp.where(snapped, nearest, jnp.floor(product)).astype(jnp.int32)


def check_guidance_combination(guidance_scale: Any, guidance_rescale: Any, layout: str, guider: Any) -> None:
    """A loop's guidance arguments that would be silently ignored together get a ValueError:
    ``guidance_rescale`` without ``guidance_scale`` (or beside a ``guider``, which has its own),
    ``guidance_layout="interleave"`` without guidance, a guider's ``conditional_args`` without
    ``active`` (only a window calls the model on the conditional half)."""
    rescaled = is_traced(guidance_rescale) or not (
        isinstance(guidance_rescale, (int, float, np.number, np.ndarray, jax.Array))
        and np.all(np.asarray(guidance_rescale) == 0)
    )
    if rescaled and guidance_scale is None:
        where = "guider's own guidance_rescale, e.g. cfg(w, phi)" if guider is not None else "guidance_scale"
        raise ValueError(
            f"guidance_rescale={shown(guidance_rescale)} is used only with guidance_scale: pass the {where}"
        )
    if guider is None and guidance_scale is None and layout != "concat":
        raise ValueError(
            f"guidance_layout={layout!r} orders the doubled batch of a guided call: it needs guidance"
        )
    if isinstance(guider, Guider) and guider.conditional_args and guider.active is None:
        raise ValueError(
            f"the guider's conditional_args {guider.conditional_args} are used only by a guider with "
            "active (a guidance_window): it guides every step, so the model always sees the doubled batch"
        )


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

    The window's steps are the same whether ``start``, ``stop`` and S are known or traced (a
    runtime-length state): one float32 formula, exact for decimal fractions (``start = k /
    100`` starts at step ``k S // 100`` for every S <= 1000). diffusers' float64 ``int(f S)``
    rounds 49 of those 101,000 products below the integer they are (``int(0.58 * 50) = 28``);
    here guidance starts at step 29 there. A traced window outside the ranges below gives NaN.

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
        if jnp.ndim(numeric(name, value)) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    # Checked as the float32 values the window computes with (0.9999999999999999 is 1 there).
    start, stop = (v if is_traced(v) else np.float32(v) for v in (start, stop))
    valid = check_in("start", start, Interval(0, 1, high_open=True), " (as float32)")
    valid = valid & check_in("stop", stop, Interval(0, 1), " (and >= start)")
    if not is_traced(start) and not is_traced(stop) and float(stop) < float(start):
        raise ValueError(f"stop must be in [start, 1], got start={float(start)}, stop={float(stop)}")
    valid = valid & (jnp.asarray(start <= stop) if is_traced(start) or is_traced(stop) else True)
    valid = valid & guider.valid
    if not isinstance(conditional_args, tuple) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in conditional_args
    ):
        raise TypeError(f"conditional_args must be a tuple of ints >= 0, got {conditional_args!r}")

    def active(info):
        inside = (_window_step(start, info.num_steps) <= info.step) & (
            info.step < _window_step(stop, info.num_steps)
        )
        inside = inside | ~jnp.asarray(valid)  # an invalid traced window or guider guides (to NaN)
        return inside if guider.active is None else inside & guider.active(info)

    def apply(state, uncond, cond, info):
        guided, state = guider.apply(state, uncond, cond, info)
        return nan_unless(valid, guided), state

    positions = tuple(sorted(set(guider.conditional_args + conditional_args)))
    return Guider(guider.init, apply, active, positions, valid)
