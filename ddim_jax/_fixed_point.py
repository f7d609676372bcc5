"""Fixed-point inversion: each inversion step solved so that `sample`'s own step undoes it.

DDIM inversion (`invert`) steps from z_t up to z_next with the model evaluated at the sample
it starts from; `sample` steps back from z_next with the model evaluated at z_next, so the
round trip drifts. Here each step solves the sampler's equation
``sample_step(z_next, model(z_next, t_next)) = z_t`` for z_next by fixed-point iterations
from DDIM inversion's estimate (ReNoise, Garibi et al. 2024; AIDI, Pan et al. 2023).

The method's own parts are `check_iterations`, `solve_tables`, `solve_update` and
`fixed_point_step`; `fixed_point_invert` runs them as a `Method` on the shared driver (`run_loop`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ddim_jax._checks import Interval, check_sample_prediction_start, is_int_scalar, is_traced, shown
from ddim_jax._config import DDIMConfig
from ddim_jax._inversion import _inverse_coefficients, _inverse_update
from ddim_jax._loop import Method, ModelFn, Plan, Prepared, Supports, Trajectory, run_loop, takes_options
from ddim_jax._state import DDIMState
from ddim_jax._step import StepCoefficients, StepOutput, alpha_at, ddim_update

__all__ = ["MAX_ITERATIONS", "fixed_point_invert"]

MAX_ITERATIONS = 100
"""The largest ``iterations``. On the demo UNet every step but the first (from the clean x0)
reaches float32 round-off within 10 (docs/inversion.md); the bound keeps a traced count from
running unbounded."""


def check_iterations(iterations: Any) -> tuple[int | jax.Array, bool | jax.Array]:
    """``(count, valid)`` for an int in [1, `MAX_ITERATIONS`], a Python int or a traced int
    scalar: a known one outside raises a ValueError; a traced one gives ``valid`` False (NaN
    outputs) and a count clipped into range, so the loop stays bounded."""
    allowed = Interval(1, MAX_ITERATIONS)
    if not is_int_scalar(iterations) or not (is_traced(iterations) or allowed.holds(int(iterations))):
        raise ValueError(f"iterations must be an int in {allowed}, got {shown(iterations)}")
    valid = jnp.all(allowed.holds(iterations)) if is_traced(iterations) else True
    if is_traced(iterations):
        return jnp.clip(iterations, 1, MAX_ITERATIONS).astype(jnp.int32), valid
    return int(iterations), valid


class SolveTables(NamedTuple):
    """One inversion step's scalars, from t (the source) up to t_next (the target)."""

    inverse: StepCoefficients  # DDIM inversion's step t -> t_next: the first estimate
    sampler: StepCoefficients  # `sample`'s deterministic step t_next -> t: the equation to solve
    inv_slope: jax.Array  # 1 / `sampler_slope`


def sampler_slope(config: DDIMConfig, coef: StepCoefficients) -> jax.Array:
    """How far the sampler's deterministic step moves its result per unit of its input sample
    z, with the model's prediction held fixed (the step is affine in z then): sqrt(a_prev / a_t)
    for an epsilon model; for v and x0 models, with v held fixed, sqrt(a_t a_prev) +
    sqrt((1 - a_t)(1 - a_prev)), the cosine of the angle between the two noise levels.

    An x0 model's output follows z at low noise, so holding it fixed there diverges; v changes
    slowly at every noise level (the ablation in benchmarks/fixed_point_inversion.py).
    """
    if config.prediction_type == "epsilon":
        return coef.sqrt_alpha_prev * coef.inv_sqrt_alpha
    return coef.sqrt_alpha_prev * coef.sqrt_alpha + coef.direction * coef.sqrt_one_minus


def solve_tables(config: DDIMConfig, alpha_source: Any, alpha_target: Any) -> SolveTables:
    """Every step's `SolveTables` at once, from the alphas at t and t_next (one per step)."""
    sampler = _inverse_coefficients(config, alpha_target, alpha_source)  # a deterministic t_next -> t
    return SolveTables(
        _inverse_coefficients(config, alpha_source, alpha_target), sampler, 1 / sampler_slope(config, sampler)
    )


def solve_update(
    config: DDIMConfig, tables: SolveTables, model_output: Any, z: jax.Array, z_source: jax.Array
) -> StepOutput:
    """One fixed-point update of the target sample ``z`` (``model_output`` evaluated at ``z``):
    ``z + (z_source - sample_step(z)) / sampler_slope``: the z_next whose sampler step lands
    on ``z_source`` if the model's prediction at z_next were the one at ``z`` (for an epsilon
    model, ``inverse_step(z_source, eps(z))``).

    Returns the new ``z`` and the sampler's x0 prediction at the old one.
    """
    back = ddim_update(config, tables.sampler, model_output, z, noise=None)
    return StepOutput(z + (z_source - back.prev_sample) * tables.inv_slope, back.pred_original_sample)


def fixed_point_step(
    model: Callable[[jax.Array], Any],
    config: DDIMConfig,
    tables: SolveTables,
    z_source: jax.Array,
    iterations: int | jax.Array,
) -> StepOutput:
    """One inversion step: DDIM inversion's estimate from ``z_source``, then ``iterations``
    `solve_update` s; ``model(z)`` is the (guided) model output at t_next. 1 + ``iterations``
    model calls; a traced ``iterations`` runs a while loop (not reverse-differentiable)."""
    first = _inverse_update(config, tables.inverse, model(z_source), z_source)

    def iterate(_, out):
        return solve_update(config, tables, model(out.prev_sample), out.prev_sample, z_source)

    return jax.lax.fori_loop(0, iterations, iterate, first)


@takes_options()
def fixed_point_invert(
    model_fn: ModelFn,
    state: DDIMState,
    x0: jax.Array,
    *,
    iterations: int | jax.Array = 3,
    **options: Any,
) -> jax.Array | tuple[jax.Array, Trajectory]:
    """DDIM inversion whose every step is solved so that plain `sample` undoes it.

    Each step from t up to t_next starts from DDIM inversion's estimate (`invert`'s step)
    and refines it ``iterations`` times with the model evaluated at the estimate itself, at
    t_next, towards the z_next that `sample`'s deterministic step maps back to z_t
    (ReNoise, Garibi et al. 2024; AIDI, Pan et al. 2023). For an epsilon model an iteration
    is ``z_next = inverse_step(z_t, eps(z_next, t_next))``; for v and x0 models it solves
    the same sampler equation. ``sample(model_fn, state, x_T)`` (eta = 0, the same guidance)
    then returns ``x0`` up to the iterations' residual, where `invert` drifts.

    Cost: ``(1 + iterations) * (S - start_step)`` model calls (each doubled-batch guided
    call counts once). ``iterations`` is an int in [1, `MAX_ITERATIONS` = 100] or a traced
    int scalar (one compiled program for every count; out of range: all-NaN output).
    The other arguments are `invert`'s, except that a ``guider`` must be stateless and
    sees ``info.inverse`` False (the solve uses the sampler's step, so `cfg_pp` needs no
    swap). Exactness needs a step that can be undone: no clipping or thresholding of x0
    in effect (``clip_sample=False`` and ``thresholding=False`` are sure to).

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps, invert, fixed_point_invert, sample
      >>> state = set_timesteps(create_state(DDIMConfig(clip_sample=False)), 10)
      >>> model_fn = lambda x, t: jnp.tanh(0.5 * x)
      >>> x0 = jnp.full((1, 2), 0.3)
      >>> ddim_error = jnp.abs(sample(model_fn, state, invert(model_fn, state, x0)) - x0).max()
      >>> x_T = fixed_point_invert(model_fn, state, x0, iterations=10)
      >>> bool(jnp.abs(sample(model_fn, state, x_T) - x0).max() < 1e-3 * ddim_error)
      True
    """
    method = _fixed_point_method(iterations)
    return run_loop(method, model_fn, state, x0, options)


def _fixed_point_method(iterations: Any) -> Method:
    """Fixed-point inversion as a `Method`: `fixed_point_step` at each entry, last to first."""
    supports = Supports(
        "fixed_point_invert",
        no_guider_state="each step calls the model 1 + iterations times at one noise level",
    )

    def check(state: DDIMState) -> None:
        check_sample_prediction_start(state.config, supports.name)

    def prepare(state: DDIMState, x0: Any, plan: Plan) -> Prepared:
        count, valid = check_iterations(iterations)
        config, dtype = state.config, plan.dtype
        # The step to t_next starts from the sampler's previous timestep of t_next, as `sample` ends there.
        alpha_source = alpha_at(state, state.prev_timesteps).astype(dtype)
        alpha_target = alpha_at(state, state.timesteps).astype(dtype)
        tables = solve_tables(config, alpha_source, alpha_target)

        def step(model, x, row):
            return fixed_point_step(model, config, row, x, count)

        return Prepared(jnp.asarray(x0, dtype), state.timesteps, step, tables, valid=valid)

    return Method(supports, "x0", True, prepare, check=check)
