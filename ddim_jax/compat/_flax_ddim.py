"""`FlaxDDIMScheduler`: diffusers v0.35's Flax DDIM scheduler API on top of ddim_jax's functions."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax._checks import check_bool, is_traced
from ddim_jax._config import CONFIG_FILE, find_config_file, read_config_file

__all__ = [
    "CommonSchedulerState",
    "FlaxDDIMScheduler",
    "FlaxDDIMSchedulerOutput",
    "FlaxDDIMSchedulerState",
    "SchedulerConfig",
]

_CONFIG_NAMES = tuple(f.name for f in dataclasses.fields(ddim_jax.DDIMConfig))
# Constructor arguments that are not config entries: diffusers kept ``dtype`` out of the saved
# config; maxdiffusion's fork names the zero-SNR rescale ``rescale_zero_terminal_snr``.
_EXTRA_ARGS = ("dtype", "rescale_zero_terminal_snr")


def _as_tuple(values: Any) -> Any:
    """Arrays (diffusers passed ``trained_betas`` as one) become tuples; the rest is left to
    `ddim_jax.DDIMConfig`'s checks."""
    return tuple(np.asarray(values).tolist()) if hasattr(values, "shape") else values


class SchedulerConfig(dict):
    """A read-only dict with attribute access (``config.num_train_timesteps``), as diffusers'
    ``FrozenDict``: a ``dict``, so diffusers' ``from_config`` takes it.

    Example:
      >>> from ddim_jax.compat import FlaxDDIMScheduler
      >>> config = FlaxDDIMScheduler(steps_offset=1).config
      >>> config.steps_offset, config["steps_offset"], isinstance(config, dict)
      (1, 1, True)
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'SchedulerConfig' object has no attribute {name!r}") from None

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SchedulerConfig is read-only: make a scheduler with from_config(config, **changes)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self) -> tuple:
        return (SchedulerConfig, (dict(self),))

    def __repr__(self) -> str:
        return f"SchedulerConfig({dict(self)!r})"


class FlaxDDIMSchedulerOutput(NamedTuple):
    """What `FlaxDDIMScheduler.step` returns: the previous sample and the (unchanged) state.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax.compat import FlaxDDIMScheduler
      >>> scheduler = FlaxDDIMScheduler()
      >>> state = scheduler.set_timesteps(scheduler.create_state(), 5)
      >>> out = scheduler.step(state, jnp.zeros((1, 2)), 800, jnp.ones((1, 2)))
      >>> out.prev_sample.shape, len(out.to_tuple())
      ((1, 2), 2)
    """

    prev_sample: jax.Array
    state: ddim_jax.DDIMState

    def to_tuple(self) -> tuple[jax.Array, ddim_jax.DDIMState]:
        """``(prev_sample, state)``, as diffusers' ``BaseOutput.to_tuple``."""
        return tuple(self)

    def __getitem__(self, key: Any) -> Any:
        """``out["prev_sample"]`` as diffusers' ``BaseOutput`` (a dict), ``out[0]`` as a tuple."""
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)

    def keys(self) -> tuple[str, ...]:
        """The field names, as ``BaseOutput.keys()``."""
        return self._fields

    def values(self) -> tuple[jax.Array, ddim_jax.DDIMState]:
        return tuple(self)

    def items(self) -> tuple[tuple[str, Any], ...]:
        return tuple(zip(self._fields, self, strict=True))


class CommonSchedulerState(NamedTuple):
    """diffusers' ``CommonSchedulerState``: the float32 tables (betas computed in float64).

    Example:
      >>> from ddim_jax.compat import FlaxDDIMScheduler
      >>> common = FlaxDDIMScheduler().create_state().common
      >>> common.alphas_cumprod.shape, common.betas.dtype
      ((1000,), dtype('float32'))
    """

    alphas: jax.Array
    betas: jax.Array
    alphas_cumprod: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FlaxDDIMSchedulerState(ddim_jax.DDIMState):
    """`ddim_jax.DDIMState` with the attributes of diffusers' ``FlaxDDIMSchedulerState``:
    ``state.common`` and ``state.replace(...)``. Every ddim_jax function takes it.

    Example:
      >>> from ddim_jax.compat import FlaxDDIMScheduler
      >>> scheduler = FlaxDDIMScheduler(timestep_spacing="trailing", prev_timestep_rule="schedule")
      >>> state = scheduler.set_timesteps(scheduler.create_state(), 4)
      >>> state.replace(timesteps=[999, 500, 200, 20]).prev_timesteps.tolist()
      [500, 200, 20, -1]
    """

    @property
    def common(self) -> CommonSchedulerState:
        """``(alphas, betas, alphas_cumprod)``, as diffusers' ``state.common``."""
        betas = ddim_jax.betas_for_config(self.config)
        return CommonSchedulerState(
            jnp.asarray(1.0 - betas, jnp.float32), jnp.asarray(betas, jnp.float32), self.alphas_cumprod
        )

    def replace(self, **changes: Any) -> FlaxDDIMSchedulerState:
        """A copy with ``changes`` (flax's ``struct.replace``); new ``timesteps`` go through
        `ddim_jax.set_timesteps` (``timesteps=``), so the previous timesteps follow them."""
        timesteps = changes.pop("timesteps", None)
        state = dataclasses.replace(self, **changes)
        return state if timesteps is None else ddim_jax.set_timesteps(state, timesteps=timesteps)


class FlaxDDIMScheduler:
    """diffusers' ``FlaxDDIMScheduler`` (v0.35 signatures) as a thin layer over ddim_jax.

    The state is a `ddim_jax.DDIMState`; every method calls the matching ddim_jax function.
    Beyond the old class it takes every option of diffusers' torch ``DDIMScheduler``
    (``timestep_spacing``, ``rescale_betas_zero_snr``, ``thresholding``, ...), reads
    maxdiffusion's ``rescale_zero_terminal_snr`` as ``rescale_betas_zero_snr``, and adds the
    eta noise the old class silently dropped (so ``eta > 0`` needs a ``key``).

    ``dtype`` is accepted and kept as ``scheduler.dtype``; the tables stay float32 (computed
    in float64) and the arithmetic float32 whatever it is, so bf16 cannot round alphas to 1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax.compat import FlaxDDIMScheduler
      >>> scheduler = FlaxDDIMScheduler(timestep_spacing="trailing", rescale_zero_terminal_snr=True,
      ...                               prediction_type="v_prediction")
      >>> state = scheduler.set_timesteps(scheduler.create_state(), 4)
      >>> state.timesteps.tolist(), scheduler.config.rescale_betas_zero_snr
      ([999, 749, 499, 249], True)
    """

    config_name = CONFIG_FILE
    has_state = True

    def __new__(cls, *args: Any, **kwargs: Any) -> FlaxDDIMScheduler:
        # With diffusers imported, an instance of the subclass that is also diffusers'
        # FlaxSchedulerMixin, so diffusers' Flax pipelines take it (docs/diffusers.md).
        bridge = _diffusers_subclass() if cls is FlaxDDIMScheduler else None
        return super().__new__(bridge or cls)

    def __reduce__(self) -> tuple:
        # pickles by config: the diffusers subclass is not importable by its name
        return (FlaxDDIMScheduler.from_config, (self.ddim_config, np.dtype(self.dtype)))

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        dtype: Any = jnp.float32,
        *,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        rescale_zero_terminal_snr: bool | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        prev_timestep_rule: str = "diffusers",
    ) -> None:
        if rescale_zero_terminal_snr is not None:
            # The alias is checked as strictly as the native key (a string "false" is truthy).
            check_bool("rescale_zero_terminal_snr", rescale_zero_terminal_snr)
            check_bool("rescale_betas_zero_snr", rescale_betas_zero_snr)
            if rescale_betas_zero_snr and not rescale_zero_terminal_snr:
                raise ValueError(
                    "rescale_zero_terminal_snr=False contradicts rescale_betas_zero_snr=True: "
                    "they are the same option (maxdiffusion's and diffusers' names); pass one"
                )
            rescale_betas_zero_snr = bool(rescale_betas_zero_snr or rescale_zero_terminal_snr)
        try:
            is_float = jnp.issubdtype(dtype, jnp.floating)
        except TypeError:
            is_float = False
        if not is_float:
            raise TypeError(f"dtype must be a float dtype, e.g. jnp.float32, got {dtype!r}")
        self.dtype = dtype
        self.ddim_config = ddim_jax.DDIMConfig(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=_as_tuple(trained_betas),
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            prev_timestep_rule=prev_timestep_rule,
        )

    @property
    def config(self) -> SchedulerConfig:
        """The config entries (diffusers' ``scheduler.config``), attribute or key access."""
        return SchedulerConfig(self.ddim_config.to_dict())

    def __len__(self) -> int:
        return self.ddim_config.num_train_timesteps

    def __repr__(self) -> str:
        return f"FlaxDDIMScheduler({self.ddim_config!r})"

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any] | ddim_jax.DDIMConfig, dtype: Any = None, **kwargs: Any
    ) -> FlaxDDIMScheduler:
        """A scheduler from a config mapping (any diffusers scheduler's ``.config``, a loaded
        ``scheduler_config.json``) or a `ddim_jax.DDIMConfig`; ``kwargs`` override entries.

        Keys that are not DDIM options are ignored and named in one warning; keys starting
        with ``_`` (``_class_name``, ``_diffusers_version``) are ignored silently.

        Example:
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}
          >>> FlaxDDIMScheduler.from_config(config, timestep_spacing="trailing").config.timestep_spacing
          'trailing'
        """
        if isinstance(config, ddim_jax.DDIMConfig):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or a DDIMConfig, got {type(config).__name__}")
        merged = {**config, **kwargs}
        names = _CONFIG_NAMES + _EXTRA_ARGS
        unused = sorted(k for k in merged if k not in names and not str(k).startswith("_"))
        if unused:
            warnings.warn(
                f"FlaxDDIMScheduler ignores these scheduler config keys: {', '.join(unused)}",
                stacklevel=2,
            )
        if dtype is not None:
            merged["dtype"] = dtype
        return cls(**{k: v for k, v in merged.items() if k in names})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> tuple[FlaxDDIMScheduler, ddim_jax.DDIMState]:
        """``(scheduler, state)`` from a local config, as diffusers' Flax ``from_pretrained``.

        Accepts a model folder (``subfolder="scheduler"``, or found on its own), a scheduler
        folder or the ``scheduler_config.json`` itself; nothing is downloaded (see
        `ddim_jax.DDIMConfig.from_pretrained`). ``kwargs`` override config entries.

        Example:
          >>> import tempfile
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> folder = tempfile.mkdtemp()
          >>> FlaxDDIMScheduler(steps_offset=1).save_config(folder)
          >>> scheduler, state = FlaxDDIMScheduler.from_pretrained(folder)
          >>> scheduler.config.steps_offset, state.alphas_cumprod.shape
          (1, (1000,))
        """
        path = find_config_file(pretrained_model_name_or_path, subfolder)
        data = read_config_file(path)
        scheduler = cls.from_config(data, **kwargs)
        return scheduler, scheduler.create_state()

    def save_config(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False) -> None:
        """Writes ``save_directory/scheduler_config.json`` (diffusers' format; nothing is uploaded).

        Example:
          >>> import tempfile, os
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> folder = tempfile.mkdtemp()
          >>> FlaxDDIMScheduler().save_config(folder)
          >>> os.listdir(folder)
          ['scheduler_config.json']
        """
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported: ddim_jax writes local files only")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file, expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        data = {"_class_name": type(self).__name__, **self.ddim_config.to_dict()}
        with open(os.path.join(save_directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    save_pretrained = save_config

    def create_state(self, common: None = None) -> ddim_jax.DDIMState:
        """The schedule tables (`ddim_jax.create_state`); call `set_timesteps` before stepping.

        Example:
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> FlaxDDIMScheduler().create_state().init_noise_sigma
          1.0
        """
        if common is not None:
            raise ValueError(
                "common must be None: the tables are computed from the scheduler's config "
                "(diffusers' CommonSchedulerState is not used)"
            )
        state = ddim_jax.create_state(self.ddim_config)
        return FlaxDDIMSchedulerState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)})

    def set_timesteps(
        self, state: ddim_jax.DDIMState, num_inference_steps: int, shape: tuple = ()
    ) -> ddim_jax.DDIMState:
        """`ddim_jax.set_timesteps`; ``shape`` is accepted for API parity and not used.

        Example:
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> scheduler = FlaxDDIMScheduler(steps_offset=1)
          >>> scheduler.set_timesteps(scheduler.create_state(), 5).timesteps.tolist()
          [801, 601, 401, 201, 1]
        """
        return ddim_jax.set_timesteps(state, num_inference_steps)

    def scale_model_input(
        self, state: ddim_jax.DDIMState, sample: jax.Array, timestep: Any = None
    ) -> jax.Array:
        """`ddim_jax.scale_model_input`: DDIM returns ``sample`` unchanged.

        Example:
          >>> import jax.numpy as jnp
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> scheduler = FlaxDDIMScheduler()
          >>> scheduler.scale_model_input(scheduler.create_state(), jnp.ones((2, 3)), 0).shape
          (2, 3)
        """
        return ddim_jax.scale_model_input(state, sample, timestep)

    def step(
        self,
        state: ddim_jax.DDIMState,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        eta: float | jax.Array = 0.0,
        return_dict: bool = True,
        *,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
        use_clipped_model_output: bool = False,
    ) -> FlaxDDIMSchedulerOutput | tuple[jax.Array, ddim_jax.DDIMState]:
        """One DDIM step (`ddim_jax.step`), with the old signature.

        Args:
          state: the state after `set_timesteps`; returned unchanged.
          model_output: the model's prediction for ``sample``.
          timestep: the current timestep (int, traced int, ``(batch,)`` or one element).
          sample: the current sample x_t.
          eta: DDIM's eta. For ``eta > 0`` pass ``key`` (a new one each step, e.g.
            ``jax.random.fold_in(key, step_index)``) or ``variance_noise``.
          return_dict: False returns the tuple ``(prev_sample, state)``.
          key: ``jax.random`` key for the eta noise, or one per example.
          variance_noise: the eta noise itself, instead of ``key``.
          use_clipped_model_output: diffusers' flag, see `ddim_jax.step`.

        Returns:
          `FlaxDDIMSchedulerOutput` ``(prev_sample, state)``; ``prev_sample`` has the dtype of
          ``sample`` (float32 arithmetic), so a ``fori_loop`` carry keeps its type; float32 for
          an integer ``sample`` (a step's result is never an integer).

        Example:
          >>> import jax.numpy as jnp
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> scheduler = FlaxDDIMScheduler()
          >>> state = scheduler.set_timesteps(scheduler.create_state(), 10)
          >>> x = jnp.ones((1, 3))
          >>> scheduler.step(state, 0.1 * x, state.timesteps[0], x, return_dict=False)[0].shape
          (1, 3)
        """
        no_noise_source = key is None and variance_noise is None
        if no_noise_source and jnp.ndim(eta) == 0 and (is_traced(eta) or float(eta) > 0):
            raise ValueError(
                f"eta={eta} needs a noise source: pass key=jax.random.key(...) (a new key each step, "
                "e.g. jax.random.fold_in(key, step_index)) or variance_noise. diffusers' "
                "FlaxDDIMScheduler took no key and silently dropped the eta noise, so its eta > 0 "
                "samples were wrong; this one adds the noise."
            )
        out = ddim_jax.step(
            state,
            model_output,
            timestep,
            sample,
            eta=eta,
            key=key,
            variance_noise=variance_noise,
            use_clipped_model_output=use_clipped_model_output,
        )
        # the sample's dtype (a fori_loop carry keeps its type), but never an integer one
        dtype = jnp.result_type(sample)
        floating = jnp.issubdtype(dtype, jnp.floating)
        prev_sample = out.prev_sample.astype(dtype) if floating else out.prev_sample
        if not return_dict:
            return (prev_sample, state)
        return FlaxDDIMSchedulerOutput(prev_sample, state)

    def add_noise(
        self,
        state: ddim_jax.DDIMState,
        original_samples: jax.Array,
        noise: jax.Array,
        timesteps: int | jax.Array,
    ) -> jax.Array:
        """`ddim_jax.add_noise`.

        Example:
          >>> import jax.numpy as jnp
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> scheduler = FlaxDDIMScheduler()
          >>> x = jnp.ones((4, 3))
          >>> scheduler.add_noise(scheduler.create_state(), x, x, jnp.array([500])).shape
          (4, 3)
        """
        return ddim_jax.add_noise(state, original_samples, noise, timesteps)

    def get_velocity(
        self, state: ddim_jax.DDIMState, sample: jax.Array, noise: jax.Array, timesteps: int | jax.Array
    ) -> jax.Array:
        """`ddim_jax.get_velocity`.

        Example:
          >>> import jax.numpy as jnp
          >>> from ddim_jax.compat import FlaxDDIMScheduler
          >>> scheduler = FlaxDDIMScheduler()
          >>> x = jnp.ones((4, 3))
          >>> scheduler.get_velocity(scheduler.create_state(), x, x, 999).shape
          (4, 3)
        """
        return ddim_jax.get_velocity(state, sample, noise, timesteps)


_SUBCLASS: list[type] = []  # the diffusers subclass, made once


def _diffusers_subclass() -> type | None:
    """``FlaxDDIMScheduler`` with diffusers' ``FlaxSchedulerMixin`` as a second base, made the
    first time a scheduler is created while diffusers is imported; None without diffusers (or
    with a diffusers that has no Flax, >= 0.40). ddim_jax never imports diffusers itself first.

    Its ``__module__`` is the one of diffusers' own ``FlaxDDIMScheduler``: diffusers' pipelines
    record a component as ``(module.__module__'s package, class name)`` in ``model_index.json``,
    so a pipeline saved with it names ``("diffusers", "FlaxDDIMScheduler")`` and loads anywhere
    diffusers 0.35 does.
    """
    if _SUBCLASS or "diffusers" not in sys.modules:
        return _SUBCLASS[0] if _SUBCLASS else None
    try:
        from diffusers.schedulers.scheduling_utils_flax import FlaxSchedulerMixin
    except ImportError:  # diffusers without its Flax classes
        return None
    namespace = {
        "__module__": "diffusers.schedulers.scheduling_ddim_flax",
        "__doc__": FlaxDDIMScheduler.__doc__,
    }
    _SUBCLASS.append(type("FlaxDDIMScheduler", (FlaxDDIMScheduler, FlaxSchedulerMixin), namespace))
    return _SUBCLASS[0]
