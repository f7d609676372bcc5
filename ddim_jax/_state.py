"""The scheduler state: noise-schedule tables (`create_state`) and inference timesteps
(`set_timesteps`), computed once on the host in float64 and stored as float32 / int32."""

from __future__ import annotations

import dataclasses
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._config import DDIMConfig

__all__ = ["DDIMState", "create_state", "set_timesteps", "betas_for_config"]


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

    @property
    def init_noise_sigma(self) -> float:
        """1.0: DDIM starts from standard normal x_T (diffusers' ``init_noise_sigma``)."""
        return 1.0

    @property
    def num_inference_steps(self) -> int | None:
        """S, the number of inference steps (static: read from ``timesteps.shape``)."""
        return None if self.timesteps is None else self.timesteps.shape[0]


def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas_for_config(config: DDIMConfig) -> np.ndarray:
    """The config's betas as a float64 numpy array of length T (zero-SNR rescale applied).

    Example:
      >>> from ddim_jax import DDIMConfig, betas_for_config
      >>> betas_for_config(DDIMConfig()).shape
      (1000,)
    """
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float64)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2
        betas = np.array(
            [min(1 - _alpha_bar_cosine((i + 1) / n) / _alpha_bar_cosine(i / n), 0.999) for i in range(n)]
        )
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so its last entry is 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


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


def inference_timesteps(config: DDIMConfig, num_inference_steps: int) -> np.ndarray:
    """diffusers' descending inference timesteps for each ``timestep_spacing`` (int64 numpy)."""
    n_train, s = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, s).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // s
        return (np.arange(0, s) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    return np.round(np.arange(n_train, 0, -n_train / s)).astype(np.int64) - 1  # trailing


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


def set_timesteps(state: DDIMState, num_inference_steps: int) -> DDIMState:
    """Returns a copy of ``state`` with diffusers' timesteps for ``num_inference_steps``.

    Example:
      >>> from ddim_jax import DDIMConfig, create_state, set_timesteps
      >>> state = set_timesteps(create_state(DDIMConfig(timestep_spacing="trailing")), 4)
      >>> state.timesteps.tolist()
      [999, 749, 499, 249]
    """
    config = state.config
    s = _check_num_inference_steps(config, num_inference_steps)
    timesteps = inference_timesteps(config, s)
    if timesteps.max() >= config.num_train_timesteps:
        raise ValueError(
            f"steps_offset={config.steps_offset} pushes timestep {int(timesteps.max())} past "
            f"num_train_timesteps - 1 = {config.num_train_timesteps - 1} for "
            f"num_inference_steps={s}"
        )
    if config.prev_timestep_rule == "diffusers":
        prev = timesteps - config.num_train_timesteps // s
    else:
        prev = np.append(timesteps[1:], -1)
    return dataclasses.replace(
        state,
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
        prev_timesteps=jnp.asarray(prev, dtype=jnp.int32),
    )
