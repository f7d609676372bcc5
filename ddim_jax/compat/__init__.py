"""Drop-in replacements for other libraries' scheduler APIs, as thin layers over ddim_jax.

`FlaxDDIMScheduler` keeps the signatures of diffusers' ``FlaxDDIMScheduler`` (v0.35; Flax was
removed from diffusers in v0.40), so code written for it runs with an import change, and
diffusers' own Flax pipelines take it (docs/diffusers.md says how, without ddim_jax importing
diffusers):

Example:
  >>> import jax.numpy as jnp
  >>> from ddim_jax.compat import FlaxDDIMScheduler
  >>> scheduler = FlaxDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  >>> state = scheduler.set_timesteps(scheduler.create_state(), 10)
  >>> x = jnp.ones((1, 4, 8, 8))
  >>> prev_sample, state = scheduler.step(state, 0.1 * x, state.timesteps[0], x).to_tuple()
  >>> prev_sample.shape
  (1, 4, 8, 8)
"""

from ddim_jax.compat._flax_ddim import (
    CommonSchedulerState,
    FlaxDDIMScheduler,
    FlaxDDIMSchedulerOutput,
    FlaxDDIMSchedulerState,
    SchedulerConfig,
)

__all__ = [
    "CommonSchedulerState",
    "FlaxDDIMScheduler",
    "FlaxDDIMSchedulerOutput",
    "FlaxDDIMSchedulerState",
    "SchedulerConfig",
]
