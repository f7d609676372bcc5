"""The schedule arithmetic on the host: a config's betas and diffusers' inference timesteps.

Plain float64 / int64 numpy, below the state (`ddim_jax._state`) and the padded tables
(`ddim_jax._padded`), which both build on it.
"""

from __future__ import annotations

import math

import numpy as np

from ddim_jax._config import DDIMConfig

__all__ = ["betas_for_config", "inference_timesteps"]


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
