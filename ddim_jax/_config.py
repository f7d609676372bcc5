"""`DDIMConfig`: the scheduler's hyperparameters, named and defaulted as in diffusers."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

__all__ = ["DDIMConfig"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREV_TIMESTEP_RULES = ("diffusers", "schedule")
CONFIG_FILE = "scheduler_config.json"
# Timesteps up to 2**24 are exact in float32 (models often take t as a float); the schedule
# tables of a larger T take gigabytes (`_table_memory`), and 2**31 exhausts a machine.
MAX_TRAIN_TIMESTEPS = 2**24
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def find_config_file(path: str | os.PathLike[str], subfolder: str | None = None) -> str:
    """The local ``scheduler_config.json`` that ``path`` names: the file itself, a scheduler
    folder holding it, or a diffusers model folder holding ``scheduler/scheduler_config.json``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if subfolder is not None and not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a str or None, got {type(subfolder).__name__}")
    root = os.fspath(path)
    full = os.path.join(root, subfolder) if subfolder else root
    if os.path.isfile(full):
        return full
    if os.path.isdir(full):
        for candidate in (os.path.join(full, CONFIG_FILE), os.path.join(full, "scheduler", CONFIG_FILE)):
            if os.path.isfile(candidate):
                return candidate
        raise FileNotFoundError(f"no {CONFIG_FILE} in {full!r} nor in {os.path.join(full, 'scheduler')!r}")
    if not os.path.exists(root) and _HUB_ID.match(root):
        folder = subfolder or "scheduler"
        raise FileNotFoundError(
            f"{root!r} is not a local file or folder. It looks like a Hugging Face Hub id, but "
            f"ddim_jax reads local files only and downloads nothing. Fetch the config first, e.g. "
            f"`huggingface-cli download {root} {folder}/{CONFIG_FILE} --local-dir DIR`, then "
            f"pass DIR (or the file)."
        )
    raise FileNotFoundError(f"no such file or folder: {full!r}")


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in a ``scheduler_config.json``; malformed JSON, a binary file or another
    JSON value get a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON in scheduler config {os.fspath(path)!r}: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(
            f"scheduler config {os.fspath(path)!r} is not a UTF-8 text file (a JSON "
            f"scheduler_config.json is expected; is it a weights or other binary file?): {err}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"scheduler config {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _table_memory(num_train_timesteps: int) -> str:
    """What `create_state` allocates for T timesteps, at least: five float64 arrays of T on the
    host while building the tables, two float32 ones kept."""
    gib = num_train_timesteps * (5 * 8 + 2 * 4) / 2**30
    return f"{gib:.3g} GiB" if gib >= 0.1 else f"{gib * 2**10:.3g} MiB"


def _check_num_train_timesteps(value: Any) -> None:
    _check_int("num_train_timesteps", value, 2)
    if value > MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps must be an int in [2, 2**24 = {MAX_TRAIN_TIMESTEPS}], got {value}: "
            f"its schedule tables would take at least {_table_memory(value)} of memory, and "
            "timesteps past 2**24 are not exact in float32"
        )


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool = True) -> None:
    """Checks low < value <= high (or low <= value when ``low_open`` is False)."""
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    above = value > low if low_open else value >= low
    if not (above and value <= high):
        left = "(" if low_open else "["
        raise ValueError(f"{name} must be in {left}{low}, {high}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class DDIMConfig:
    """Hyperparameters of a DDIM scheduler, with diffusers' ``DDIMScheduler`` names and defaults.

    Frozen and hashable, so it can be static metadata of the state pytree and a
    ``jax.jit`` static argument. Validated at construction.

    Attributes:
      num_train_timesteps: number of diffusion steps the model was trained with (T).
      beta_start: first beta of the ``linear`` / ``scaled_linear`` schedules.
      beta_end: last beta of the ``linear`` / ``scaled_linear`` schedules.
      beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
      trained_betas: explicit betas (length T), overriding the schedule.
      clip_sample: clip the predicted x0 to ``[-clip_sample_range, clip_sample_range]``.
      set_alpha_to_one: the last step's previous alpha_cumprod is 1 (else alphas_cumprod[0]).
      steps_offset: added to the ``leading`` timesteps.
      prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
      thresholding: Imagen dynamic thresholding of x0 (replaces clipping when on).
      dynamic_thresholding_ratio: quantile of |x0| used as the threshold, in (0, 1].
      clip_sample_range: bound for ``clip_sample``.
      sample_max_value: upper bound for the dynamic threshold.
      timestep_spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
      rescale_betas_zero_snr: rescale betas to zero terminal SNR (Lin et al. 2023, Alg. 1).
      prev_timestep_rule: not in diffusers. ``"diffusers"`` (default) uses diffusers' previous
        timestep ``t - T // S``, so results match diffusers; ``"schedule"`` uses the
        schedule's true next entry, which differs from diffusers for ``trailing`` and
        ``linspace`` when S does not divide T (diffusers issues #9261, #11347, #12633).

    Example:
      >>> from ddim_jax import DDIMConfig
      >>> config = DDIMConfig(beta_schedule="scaled_linear", beta_end=0.012)
      >>> DDIMConfig.from_dict(config.to_dict()) == config
      True
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    rescale_betas_zero_snr: bool = False
    prev_timestep_rule: Literal["diffusers", "schedule"] = "diffusers"

    def __post_init__(self) -> None:
        _check_num_train_timesteps(self.num_train_timesteps)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("prev_timestep_rule", self.prev_timestep_rule, PREV_TIMESTEP_RULES)
        _check_int("steps_offset", self.steps_offset, 0)
        for name in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
            _check_bool(name, getattr(self, name))
        _check_real("beta_start", self.beta_start, 0.0, 1.0)
        _check_real("beta_end", self.beta_end, 0.0, 1.0)
        _check_real("dynamic_thresholding_ratio", self.dynamic_thresholding_ratio, 0.0, 1.0)
        _check_real("clip_sample_range", self.clip_sample_range, 0.0, math.inf)
        _check_real("sample_max_value", self.sample_max_value, 0.0, math.inf)
        if self.trained_betas is not None:
            self._normalize_trained_betas()

    def _normalize_trained_betas(self) -> None:
        try:
            betas = tuple(float(b) for b in self.trained_betas)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"trained_betas must be a sequence of numbers, got {self.trained_betas!r}"
            ) from err
        if len(betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas must have num_train_timesteps={self.num_train_timesteps} "
                f"entries, got {len(betas)}"
            )
        bad = [b for b in betas if not (0.0 < b <= 1.0)]
        if bad:
            raise ValueError(f"trained_betas must all be in (0, 1], got {bad[0]!r}")
        object.__setattr__(self, "trained_betas", betas)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DDIMConfig:
        """Builds a config from a diffusers ``scheduler_config.json`` dictionary.

        Keys DDIM does not use (e.g. a PNDMScheduler's ``skip_prk_steps``) are ignored and
        named in one warning; keys starting with ``_`` (``_class_name``) are ignored silently.

        Example:
          >>> from ddim_jax import DDIMConfig
          >>> DDIMConfig.from_dict({"_class_name": "DDIMScheduler", "steps_offset": 1}).steps_offset
          1
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in config.items() if k in names}
        unused = sorted(k for k in config if k not in names and not str(k).startswith("_"))
        if unused:
            warnings.warn(
                f"DDIMConfig ignores these scheduler config keys: {', '.join(unused)}",
                stacklevel=2,
            )
        return cls(**known)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> DDIMConfig:
        """Reads a diffusers ``scheduler_config.json`` (see `from_dict`).

        Example:
          >>> import tempfile, os
          >>> from ddim_jax import DDIMConfig
          >>> path = os.path.join(tempfile.mkdtemp(), "scheduler_config.json")
          >>> DDIMConfig(timestep_spacing="trailing").to_json(path)
          >>> DDIMConfig.from_json(path).timestep_spacing
          'trailing'
        """
        data = read_config_file(path)
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], subfolder: str | None = None) -> DDIMConfig:
        """Reads the scheduler config of a local diffusers model (nothing is downloaded).

        Args:
          path: a diffusers model folder (its ``scheduler/scheduler_config.json`` is read), a
            scheduler folder holding ``scheduler_config.json``, or that file itself.
          subfolder: a folder inside ``path`` to look in, as in diffusers
            (``from_pretrained(model_dir, subfolder="scheduler")``).

        Raises:
          FileNotFoundError: nothing matches; for a string that looks like a Hub id
            (``"org/model"``), the message says how to fetch the file.

        Example:
          >>> import tempfile, os
          >>> from ddim_jax import DDIMConfig
          >>> model_dir = tempfile.mkdtemp()
          >>> os.mkdir(os.path.join(model_dir, "scheduler"))
          >>> path = os.path.join(model_dir, "scheduler", "scheduler_config.json")
          >>> DDIMConfig(steps_offset=1).to_json(path)
          >>> DDIMConfig.from_pretrained(model_dir).steps_offset
          1
          >>> DDIMConfig.from_pretrained(model_dir, subfolder="scheduler").steps_offset
          1
        """
        return cls.from_json(find_config_file(path, subfolder))

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict (``trained_betas`` as a list or None).

        Example:
          >>> from ddim_jax import DDIMConfig
          >>> DDIMConfig().to_dict()["beta_schedule"]
          'linear'
        """
        d = dataclasses.asdict(self)
        if d["trained_betas"] is not None:
            d["trained_betas"] = list(d["trained_betas"])
        return d

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Writes a ``scheduler_config.json`` that diffusers' DDIMScheduler also reads.

        Example:
          >>> import tempfile, os
          >>> from ddim_jax import DDIMConfig
          >>> DDIMConfig().to_json(os.path.join(tempfile.mkdtemp(), "scheduler_config.json"))
        """
        data = {"_class_name": "DDIMScheduler", **self.to_dict()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
