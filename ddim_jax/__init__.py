"""ddim_jax: an exact, fast DDIM sampler for JAX (diffusers ``DDIMScheduler`` semantics).

Example:
  >>> import jax, jax.numpy as jnp
  >>> import ddim_jax
  >>> state = ddim_jax.set_timesteps(ddim_jax.create_state(ddim_jax.DDIMConfig()), 20)
  >>> x_T = jax.random.normal(jax.random.key(0), (1, 4, 8, 8))
  >>> ddim_jax.sample(lambda x, t: 0.1 * x, state, x_T).shape
  (1, 4, 8, 8)
"""

from ddim_jax._bdia import BDIALatents, bdia_invert, bdia_sample
from ddim_jax._config import DDIMConfig
from ddim_jax._edict import EDICTLatents, edict_invert, edict_sample
from ddim_jax._engine import Engine, EngineCore, EngineState, Request, RequestHandle, SlotRequest
from ddim_jax._fixed_point import fixed_point_invert
from ddim_jax._forward import add_noise, get_velocity, scale_model_input
from ddim_jax._guidance import classifier_free_guidance, rescale_noise_cfg
from ddim_jax._guiders import (
    GuidanceInfo,
    Guider,
    ScaleSchedule,
    apg,
    cfg,
    cfg_pp,
    cfg_zero_star,
    guidance_window,
    rescaled,
    scale_schedule,
    tangential_cfg,
)
from ddim_jax._interpolation import slerp
from ddim_jax._inversion import inverse_step, invert
from ddim_jax._loop import Trajectory
from ddim_jax._parallel import ParallelResult, parallel_sample
from ddim_jax._sample import sample
from ddim_jax._schedule import betas_for_config
from ddim_jax._state import DDIMState, create_state, set_timesteps
from ddim_jax._step import MIN_ALPHA_CUMPROD, GuidedOutput, StepOutput, step

__version__ = "0.1.0"

__all__ = [
    "BDIALatents",
    "MIN_ALPHA_CUMPROD",
    "DDIMConfig",
    "DDIMState",
    "EDICTLatents",
    "Engine",
    "EngineCore",
    "EngineState",
    "GuidanceInfo",
    "GuidedOutput",
    "Guider",
    "ParallelResult",
    "Request",
    "RequestHandle",
    "ScaleSchedule",
    "SlotRequest",
    "StepOutput",
    "Trajectory",
    "add_noise",
    "apg",
    "bdia_invert",
    "bdia_sample",
    "betas_for_config",
    "cfg",
    "cfg_pp",
    "cfg_zero_star",
    "classifier_free_guidance",
    "create_state",
    "edict_invert",
    "edict_sample",
    "fixed_point_invert",
    "get_velocity",
    "guidance_window",
    "inverse_step",
    "invert",
    "parallel_sample",
    "rescale_noise_cfg",
    "rescaled",
    "sample",
    "scale_model_input",
    "scale_schedule",
    "set_timesteps",
    "slerp",
    "step",
    "tangential_cfg",
]
