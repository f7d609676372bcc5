"""The scheduler state: noise-schedule tables (`create_state`) and inference timesteps
(`set_timesteps`), computed once on the host in float64 and stored as float32 / int32."""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax import _padded
from ddim_jax._config import DDIMConfig
from ddim_jax._schedule import betas_for_config, inference_timesteps, previous_timesteps
from ddim_jax._values import as_int32, is_int_scalar, shown

__all__ = ["DDIMState", "create_state", "set_timesteps"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDIMState:
    """Immutable scheduler state: arrays are pytree leaves, the config is static metadata.

    Attributes:
      alphas_cumprod: ``(T,)`` float32, cumulative product of ``1 - beta``.
      one_minus_alphas_cumprod: ``(T,)`` float32, ``1 - alphas_cumprod`` computed in float64,
        so it keeps its digits where alphas_cumprod is close to 1 (small t).
      final_alpha_cumprod: ``()`` float32, alpha_cumprod used after the last step (and
        before the first inversion step): 1 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``.
      final_one_minus_alpha_cumprod: ``()`` float32, ``1 - final_alpha_cumprod`` (float64).
      timesteps: ``(S,)`` int32, descending; None until `set_timesteps`.
      prev_timesteps: ``(S,)`` int32, the timestep each step moves to (``-1`` means the
        final alpha), following ``config.prev_timestep_rule``; None until `set_timesteps`.
      config: the `DDIMConfig` (static).
      num_steps: None for a static schedule (S is ``timesteps.shape[0]``); for a runtime-length
        one (``set_timesteps(..., max_steps=M)``) the int32 scalar S, a leaf that may be
        traced, with ``timesteps`` and ``prev_timesteps`` of shape ``(M,)``: entries
        ``[0, S)`` hold the schedule, entries ``[S, M)`` are ``-1`` (padding).

    Example:
      >>> import jax
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps
      >>> state = set_timesteps(create_state(DDIMConfig()), 50)
      >>> state.num_inference_steps, state.init_noise_sigma, len(jax.tree_util.tree_leaves(state))
      (50, 1.0, 6)
    """

    alphas_cumprod: jax.Array
    one_minus_alphas_cumprod: jax.Array
    final_alpha_cumprod: jax.Array
    final_one_minus_alpha_cumprod: jax.Array
    timesteps: jax.Array | None
    prev_timesteps: jax.Array | None
    config: DDIMConfig = dataclasses.field(metadata={"static": True})
    num_steps: jax.Array | None = None

    @property
    def init_noise_sigma(self) -> float:
        """1.0: DDIM starts from standard normal x_T (diffusers' ``init_noise_sigma``)."""
        return 1.0

    @property
    def num_inference_steps(self) -> int | jax.Array | None:
        """S, the number of inference steps: an int read from ``timesteps.shape`` for a static
        schedule, the int32 array ``num_steps`` for a runtime-length one."""
        if self.num_steps is not None:
            return self.num_steps
        return None if self.timesteps is None else self.timesteps.shape[0]

    @property
    def max_steps(self) -> int | None:
        """M, the length of the timestep tables (S for a static schedule)."""
        return None if self.timesteps is None else self.timesteps.shape[0]

    @property
    def has_runtime_length(self) -> bool:
        """True for a padded schedule with a runtime step count (``set_timesteps(..., max_steps=M)``)."""
        return self.num_steps is not None


def check_state(state: object) -> None:
    """A TypeError, not an AttributeError, for anything but a `DDIMState` (e.g. its config)."""
    if not isinstance(state, DDIMState):
        fix = ": make one with create_state(config)" if isinstance(state, DDIMConfig) else ""
        raise TypeError(f"state must be a DDIMState, got {type(state).__name__}{fix}")


def _warn_zero_alphas_cumprod(config: DDIMConfig, alphas_cumprod: np.ndarray) -> None:
    """Warns when alphas_cumprod reach 0 in float32 before the last timestep (a zero there is a
    zero-terminal-SNR schedule's, which `step` handles). A warning, not an error: diffusers' own
    test suite runs beta_end = 0.2, which does this at the last 40 of 1000 timesteps."""
    (zeros,) = np.nonzero(alphas_cumprod[:-1].astype(np.float32) == 0)
    if zeros.size:
        cause = "trained_betas" if config.trained_betas is not None else f"beta_end={config.beta_end}"
        warnings.warn(
            f"{cause} drives alphas_cumprod to 0 (in float32) at {zeros.size} of "
            f"num_train_timesteps={config.num_train_timesteps} timesteps, from t = {zeros[0]}: "
            "those timesteps hold no signal at all (an epsilon model's x0 there divides by zero); "
            "lower beta_end (0.02 for linear and 0.012 for scaled_linear are usual)",
            stacklevel=3,
        )


def create_state(config: DDIMConfig) -> DDIMState:
    """Builds the schedule tables for ``config`` (host float64, stored float32).

    Call `set_timesteps` before stepping.

    Example:
      >>> from ddim_jax import DDIMConfig, create_state
      >>> state = create_state(DDIMConfig())
      >>> state.alphas_cumprod.shape, state.timesteps is None
      ((1000,), True)
    """
    if not isinstance(config, DDIMConfig):
        raise TypeError(f"config must be a DDIMConfig, got {type(config).__name__}")
    alphas_cumprod = np.cumprod(1.0 - betas_for_config(config))
    _warn_zero_alphas_cumprod(config, alphas_cumprod)
    final = 1.0 if config.set_alpha_to_one else alphas_cumprod[0]
    return DDIMState(
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
        one_minus_alphas_cumprod=jnp.asarray(1.0 - alphas_cumprod, dtype=jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, dtype=jnp.float32),
        final_one_minus_alpha_cumprod=jnp.asarray(1.0 - final, dtype=jnp.float32),
        timesteps=None,
        prev_timesteps=None,
        config=config,
    )


def _check_num_inference_steps(config: DDIMConfig, num_inference_steps: object) -> int:
    try:
        s = operator.index(num_inference_steps)
    except TypeError:
        s = None
    if s is None or isinstance(num_inference_steps, bool) or not 1 <= s <= config.num_train_timesteps:
        raise ValueError(
            "num_inference_steps must be an int in [1, num_train_timesteps="
            f"{config.num_train_timesteps}], got {num_inference_steps!r}"
        )
    return s


def _check_max_steps(config: DDIMConfig, max_steps: object) -> int:
    n_train = config.num_train_timesteps
    try:
        m = operator.index(max_steps)
    except TypeError:
        m = None
    if m is None or isinstance(max_steps, bool) or not 1 <= m <= n_train:
        raise ValueError(f"max_steps must be an int in [1, num_train_timesteps={n_train}], got {max_steps!r}")
    if m * n_train >= 2**31:
        raise ValueError(f"max_steps * num_train_timesteps must be below 2**31 (int32), got {m} * {n_train}")
    return m


def _runtime_count(num_steps: object, max_steps: int) -> jax.Array:
    """The step count as an int32 scalar; a Python-known value is range-checked here."""
    known = not isinstance(num_steps, jax.core.Tracer)
    if not is_int_scalar(num_steps) or (known and not 1 <= int(num_steps) <= max_steps):
        raise ValueError(
            f"num_inference_steps must be an int in [1, max_steps={max_steps}], got {shown(num_steps)}"
        )
    return as_int32(num_steps)


def _check_custom_timesteps(config: DDIMConfig, timesteps: np.ndarray) -> None:
    n_train = config.num_train_timesteps
    values = timesteps.tolist()
    if timesteps.size and (timesteps.min() < 0 or timesteps.max() >= n_train):
        raise ValueError(f"timesteps must be in [0, num_train_timesteps={n_train}), got {values}")
    if np.unique(timesteps).size != timesteps.size:
        raise ValueError(f"timesteps must not repeat a value, got {values}")
    if np.any(np.diff(timesteps) >= 0):
        raise ValueError(f"timesteps must be in descending order, got {values}")


def _steps_off_grid(config: DDIMConfig, timesteps, count):
    """Under ``prev_timestep_rule="diffusers"``, whether some step ``i < count - 1`` of a custom
    grid moves to ``t_i - T // count`` instead of the grid's next entry ``t_{i+1}`` (numpy or
    traced jax arrays alike). The last step may go anywhere below: diffusers' rule there."""
    if config.prev_timestep_rule != "diffusers":
        return False
    xp = jnp if isinstance(timesteps, jax.core.Tracer) or isinstance(count, jax.core.Tracer) else np
    grid = dataclasses.replace(config, prev_timestep_rule="schedule")  # each entry to the next
    moved = previous_timesteps(config, timesteps, count) != previous_timesteps(grid, timesteps, count)
    return (moved & (xp.arange(timesteps.shape[0]) + 1 < count)).any()


def _refuse_off_grid(config: DDIMConfig, timesteps: np.ndarray) -> None:
    """A known custom grid that the diffusers rule would step off raises (see `set_timesteps`)."""
    if _steps_off_grid(config, timesteps, timesteps.size):
        gap = config.num_train_timesteps // timesteps.size
        i = int(np.argmax(timesteps[:-1] - gap != timesteps[1:]))
        raise ValueError(
            f"timesteps {timesteps.tolist()} are not spaced by num_train_timesteps // S = {gap}: with "
            f"prev_timestep_rule='diffusers' (the default) step {i} would move from {timesteps[i]} to "
            f"{timesteps[i] - gap}, not to the next entry {timesteps[i + 1]}. Use "
            "DDIMConfig(prev_timestep_rule='schedule') to step from each entry to the next"
        )


def _static_schedule(state: DDIMState, timesteps: np.ndarray) -> DDIMState:
    """``state`` with the static schedule ``timesteps`` (host ints, descending) and the previous
    timestep of each step per ``config.prev_timestep_rule``."""
    prev = previous_timesteps(state.config, timesteps, len(timesteps))
    return dataclasses.replace(
        state,
        # cast on the host and device_put: jnp.asarray compiles a conversion per new S
        timesteps=jax.device_put(timesteps.astype(np.int32)),
        prev_timesteps=jax.device_put(prev.astype(np.int32)),
        num_steps=None,
    )


def _custom_schedule(state: DDIMState, timesteps: object, num_steps: object, max_steps: object) -> DDIMState:
    """`set_timesteps` with user-supplied ``timesteps``: static, or padded with a count."""
    config = state.config
    if isinstance(timesteps, (list, tuple, range)):
        timesteps = np.asarray(timesteps)
    if jnp.ndim(timesteps) != 1 or jnp.shape(timesteps)[0] == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D array, got shape {jnp.shape(timesteps)}")
    if not jnp.issubdtype(jnp.result_type(timesteps), jnp.integer):
        raise TypeError(f"timesteps must hold integers, got dtype {jnp.result_type(timesteps)}")
    length = jnp.shape(timesteps)[0]
    if max_steps is not None and _check_max_steps(config, max_steps) != length:
        raise ValueError(f"max_steps={max_steps} must equal len(timesteps) = {length} (the padded length)")
    traced = isinstance(timesteps, jax.core.Tracer)
    if num_steps is None and not traced:  # a static schedule
        values = np.asarray(timesteps, np.int64)
        _check_custom_timesteps(config, values)
        _refuse_off_grid(config, values)
        return _static_schedule(state, values)
    count = _runtime_count(length if num_steps is None else num_steps, length)
    known = not traced and not isinstance(count, jax.core.Tracer)
    if known:
        _check_custom_timesteps(config, np.asarray(timesteps, np.int64)[: int(count)])
        _refuse_off_grid(config, np.asarray(timesteps, np.int64)[: int(count)])
    index = jnp.arange(length, dtype=jnp.int32)
    padded = jnp.where(index < count, as_int32(timesteps), _padded.PADDING)
    if not known:  # a traced grid off the diffusers rule: all -1, so the loops return NaN
        padded = jnp.where(_steps_off_grid(config, padded, count), _padded.PADDING, padded)
    prev = _padded.padded_prev_timesteps(config, padded, count)
    return dataclasses.replace(state, timesteps=padded, prev_timesteps=prev, num_steps=count)


def set_timesteps(
    state: DDIMState,
    num_inference_steps: int | jax.Array | None = None,
    *,
    max_steps: int | None = None,
    timesteps: Sequence[int] | jax.Array | None = None,
) -> DDIMState:
    """Returns a copy of ``state`` with diffusers' timesteps for ``num_inference_steps``.

    Three forms:

    - ``set_timesteps(state, S)``, S a Python int: the static schedule (the default). S is
      a shape, so each S compiles its own program.
    - ``set_timesteps(state, S, max_steps=M)``: a runtime-length schedule. S may be a traced
      int32 (inside jit) in [1, M]; the tables have shape ``(M,)``, entries ``[0, S)`` equal
      the static ``set_timesteps(state, S)``'s exactly and entries ``[S, M)`` are -1, and
      ``state.num_steps`` holds S. `sample` and `invert` run S steps of it (S model calls) in
      one program for every S. An S outside [1, M] known in Python raises; a traced one makes
      those loops return NaN.
    - ``set_timesteps(state, timesteps=ts)``: a user-supplied descending schedule of distinct
      ints in [0, T) (e.g. Align Your Steps, or the DDIM paper's quadratic spacing), static
      when ``ts`` is known in Python; with ``num_inference_steps=S`` it is a padded table of
      length M = ``len(ts)`` of which the first S entries count (S may be traced). Known
      values are validated here; traced ones make the loops return NaN when they are not a
      descending schedule in range. The previous timestep follows
      ``config.prev_timestep_rule``: with ``"schedule"`` each step moves to the next entry;
      with ``"diffusers"`` (the default) a step moves to ``t - T // S`` as diffusers' step
      does, so a grid not spaced by ``T // S`` (up to its last entry) would step off it: that
      raises a ``ValueError`` (and, traced, makes the loops return NaN).

    Example:
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps
      >>> state = set_timesteps(create_state(DDIMConfig(timestep_spacing="trailing")), 4)
      >>> state.timesteps.tolist()
      [999, 749, 499, 249]
      >>> padded = set_timesteps(state, 4, max_steps=6)
      >>> padded.timesteps.tolist(), int(padded.num_steps)
      ([999, 749, 499, 249, -1, -1], 4)
      >>> quadratic = [int(0.999 * i * i) for i in range(31, 0, -5)]  # floor(c i^2), descending
      >>> uneven = create_state(DDIMConfig(prev_timestep_rule="schedule"))  # step to the next entry
      >>> set_timesteps(uneven, timesteps=quadratic).prev_timesteps.tolist()
      [675, 440, 255, 120, 35, 0, -1]
    """
    check_state(state)
    if timesteps is not None:
        return _custom_schedule(state, timesteps, num_inference_steps, max_steps)
    config = state.config
    if max_steps is not None:
        m = _check_max_steps(config, max_steps)
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required with max_steps")
        count = _runtime_count(num_inference_steps, m)
        if not isinstance(count, jax.core.Tracer):  # Python-known: the static path's checks too
            set_timesteps(state, int(count))
        padded = _padded.padded_schedule(config, count, m)
        prev = _padded.padded_prev_timesteps(config, padded, count)
        return dataclasses.replace(state, timesteps=padded, prev_timesteps=prev, num_steps=count)
    s = _check_num_inference_steps(config, num_inference_steps)
    timesteps = inference_timesteps(config, s)
    if timesteps.max() >= config.num_train_timesteps:
        raise ValueError(
            f"steps_offset={config.steps_offset} pushes timestep {int(timesteps.max())} past "
            f"num_train_timesteps - 1 = {config.num_train_timesteps - 1} for "
            f"num_inference_steps={s}"
        )
    return _static_schedule(state, timesteps)
