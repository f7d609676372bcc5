"""The schedule arithmetic: a config's betas, diffusers' inference timesteps and the rule for
the timestep a step moves to.

Float64 / int64 numpy on the host (the rule also on jax arrays), below the state
(`ddim_jax._state`), the padded tables (`ddim_jax._padded`) and `step`, which all build on it.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ddim_jax._config import DDIMConfig

__all__ = ["betas_for_config", "inference_timesteps", "previous_timesteps"]


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


def inference_timesteps(config: DDIMConfig, num_inference_steps: int) -> np.ndarray:
    """diffusers' descending inference timesteps for each ``timestep_spacing`` (int64 numpy)."""
    n_train, s = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, s).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n_train // s
        return (np.arange(0, s) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    # trailing: numpy's arange rounds to S + 1 entries for some S (61, 103, ... at T = 1000), the
    # last one ~1e-13 that becomes timestep -1 (so does diffusers'); the first S are the schedule.
    return np.round(np.arange(n_train, 0, -n_train / s)[:s]).astype(np.int64) - 1


def previous_timesteps(config: DDIMConfig, timesteps, num_steps):
    """The timestep each step moves to, per ``config.prev_timestep_rule``: the one home of the rule.

    ``"diffusers"``: ``t - T // S``, elementwise, so ``timesteps`` may be any timesteps (`step`
    applies it to the one it is given). ``"schedule"``: the next entry of the descending
    schedule ``timesteps`` (its first ``num_steps`` entries; -1, the final alpha, after the
    last). numpy in, numpy out (the state's static tables); jax arrays, with ``num_steps``
    traced, for the padded tables of a runtime-length state.

    Example:
      >>> import numpy as np
      >>> from ddim_jax import DDIMConfig
      >>> ts = np.array([900, 500, 100])
      >>> previous_timesteps(DDIMConfig(), ts, 3).tolist()
      [567, 167, -233]
      >>> previous_timesteps(DDIMConfig(prev_timestep_rule="schedule"), ts, 3).tolist()
      [500, 100, -1]
    """
    host = isinstance(timesteps, np.ndarray) and isinstance(num_steps, (int, np.integer))
    xp = np if host else jnp
    if config.prev_timestep_rule == "diffusers":
        return timesteps - config.num_train_timesteps // xp.maximum(num_steps, 1)
    index = xp.arange(timesteps.shape[0])
    return xp.where(index + 1 < num_steps, xp.roll(timesteps, -1), -1)
