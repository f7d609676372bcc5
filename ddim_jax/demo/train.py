"""Training the class-conditional digits denoiser with optax, and the parameter cache keyed by the settings.

The model is called as ``model_fn(x, t, params, labels)`` (`denoiser_fn`): ``labels`` are the
digits 0-9, or `NULL_LABEL` (10) for "no class", which training uses with probability
``label_dropout`` so that the one network also gives the unconditional prediction that
classifier-free guidance needs. Training images get a random brightness (`vary_brightness`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import ddim_jax
from ddim_jax.demo.data import vary_brightness
from ddim_jax.demo.unet import UNet

__all__ = [
    "DEFAULT_CACHE_DIR",
    "NULL_LABEL",
    "NUM_CLASSES",
    "TrainSettings",
    "cache_path",
    "denoiser_fn",
    "fixed_settings",
    "load_or_train",
    "make_model",
    "train_denoiser",
]

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "ddim_jax")
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
"""The "no class" label: the unconditional branch of classifier-free guidance."""

_CACHE_VERSION = 3  # bump when the training code changes what a given set of settings produces


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained parameters (and so the cache key).

    Attributes:
      channels: UNet channels per level (8x8, then 4x4, ...).
      train_steps: optimizer steps.
      batch_size: digits per step.
      learning_rate: peak learning rate (linear warmup, cosine decay).
      ema_decay: decay of the parameter moving average that is kept and sampled from.
      seed: seed of the initialisation and the training noise.
      num_train_timesteps: T of the noise schedule.
      prediction_type: what the network predicts, ``"epsilon"`` or ``"v_prediction"``.
      rescale_betas_zero_snr: rescale the schedule to zero terminal SNR (Lin et al. 2023).
      label_dropout: probability of training with `NULL_LABEL` instead of the digit.

    The noise schedule is Stable Diffusion's: ``scaled_linear`` betas from 0.00085 to 0.012.

    Example:
      >>> from ddim_jax.demo.train import TrainSettings
      >>> TrainSettings(train_steps=10).cache_key() != TrainSettings(train_steps=20).cache_key()
      True
    """

    channels: tuple[int, ...] = (16, 32)
    train_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-3
    ema_decay: float = 0.995
    seed: int = 0
    num_train_timesteps: int = 1000
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train_steps", "batch_size", "num_train_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels!r}")
        if 8 % 2 ** (len(self.channels) - 1):
            raise ValueError(f"channels may have at most 4 levels for 8x8 digits, got {self.channels!r}")
        if not 0.0 < self.learning_rate < 1.0:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")

    def scheduler_config(self, clip_sample: bool = False, **sampling: object) -> ddim_jax.DDIMConfig:
        """The DDIM config of the training schedule, plus sampling-only settings.

        ``clip_sample`` and ``sampling`` (e.g. ``timestep_spacing="trailing"``,
        ``steps_offset=1``) only affect sampling. ``clip_sample`` is off by default: clipping
        x0 at every step (diffusers' default) measurably breaks fine-step eta = 0 sampling
        and inversion here.

        Example:
          >>> from ddim_jax.demo.train import TrainSettings
          >>> s = TrainSettings()
          >>> s.scheduler_config().clip_sample, s.scheduler_config(timestep_spacing="trailing").beta_end
          (False, 0.012)
        """
        return ddim_jax.DDIMConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=self.prediction_type,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
            clip_sample=clip_sample,
            **sampling,
        )

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict, plus the cache format ``version``.

        Example:
          >>> from ddim_jax.demo.train import TrainSettings
          >>> TrainSettings().to_dict()["channels"]
          [16, 32]
        """
        return {**dataclasses.asdict(self), "channels": list(self.channels), "version": _CACHE_VERSION}

    def cache_key(self) -> str:
        """A short hash of the settings (and the cache format version).

        Example:
          >>> from ddim_jax.demo.train import TrainSettings
          >>> len(TrainSettings().cache_key()), TrainSettings().cache_key() == TrainSettings().cache_key()
          (16, True)
        """
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def fixed_settings(settings: TrainSettings) -> TrainSettings:
    """``settings`` with Lin et al.'s training fixes: zero terminal SNR and v-prediction.

    Example:
      >>> from ddim_jax.demo.train import TrainSettings, fixed_settings
      >>> s = fixed_settings(TrainSettings())
      >>> s.prediction_type, s.rescale_betas_zero_snr, s.scheduler_config().rescale_betas_zero_snr
      ('v_prediction', True, True)
    """
    return dataclasses.replace(settings, prediction_type="v_prediction", rescale_betas_zero_snr=True)


def make_model(settings: TrainSettings) -> UNet:
    """The class-conditional UNet for 8x8 one-channel digits (one norm group: ~25% cheaper on CPU than 8).

    Example:
      >>> from ddim_jax.demo.train import TrainSettings, make_model
      >>> make_model(TrainSettings()).channels, make_model(TrainSettings()).num_classes
      ((16, 32), 10)
    """
    return UNet(
        channels=tuple(settings.channels),
        in_channels=1,
        out_channels=1,
        num_groups=1,
        num_classes=NUM_CLASSES,
    )


def denoiser_fn(model: UNet):
    """``model_fn(x, t, params, labels)`` for `ddim_jax.sample` / `ddim_jax.invert`.

    Pass ``model_args=(params, labels)``: both stay traced under ``jax.jit``. ``labels`` are
    ints ``(B,)`` in 0-9, or `NULL_LABEL` for an unconditional prediction. With
    ``guidance_scale`` the loop calls it on the doubled batch, so pass
    ``labels = concat([full(B, NULL_LABEL), digits])``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ddim_jax
      >>> from ddim_jax.demo.train import NULL_LABEL, TrainSettings, denoiser_fn, make_model
      >>> model = make_model(TrainSettings(channels=(4,)))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), 0, None, jnp.array([NULL_LABEL]))
      >>> state = ddim_jax.set_timesteps(ddim_jax.create_state(TrainSettings().scheduler_config()), 5)
      >>> digits = jnp.array([3, 7])
      >>> labels = jnp.concatenate([jnp.full(2, NULL_LABEL), digits])  # [uncond, cond]
      >>> ddim_jax.sample(denoiser_fn(model), state, jnp.zeros((2, 8, 8, 1)), model_args=(params, labels),
      ...                 guidance_scale=3.0).shape
      (2, 8, 8, 1)
    """

    def model_fn(x, t, params, labels):
        return model.apply(params, x, t, labels=labels)

    return model_fn


def train_denoiser(
    settings: TrainSettings,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    progress: bool = True,
    log_every: int = 50,
):
    """Trains the class-conditional UNet on ``x_train`` (NHWC in [-1, 1]) and its labels; returns EMA params.

    Each step draws a batch, gives every image a random brightness (`vary_brightness`),
    replaces its label by `NULL_LABEL` with probability ``label_dropout``, and takes the
    DDPM loss ``|target - model(add_noise(x0, eps, t), t, label)|^2`` with ``t`` uniform in
    [0, T) and ``target`` eps or v (`ddim_jax.get_velocity`) per ``prediction_type``. The
    progress bar shows the loss every ``log_every`` steps.

    Example:
      >>> from ddim_jax.demo.data import load_digits_split
      >>> from ddim_jax.demo.train import TrainSettings, train_denoiser
      >>> settings = TrainSettings(channels=(4,), train_steps=2, batch_size=4, prediction_type="v_prediction")
      >>> d = load_digits_split()
      >>> params = train_denoiser(settings, d.x_train, d.y_train, progress=False)
      >>> sorted(params)
      ['params']
    """
    from tqdm.auto import tqdm

    data = jnp.asarray(x_train, jnp.float32)
    labels = jnp.asarray(y_train, jnp.int32)
    if labels.shape != data.shape[:1]:
        raise ValueError(
            f"y_train must have shape ({data.shape[0]},) like x_train's batch, got {labels.shape}"
        )
    key = jax.random.key(settings.seed)
    init_key, key = jax.random.split(key)
    params = _init_params(make_model(settings), init_key)
    run_step, opt = _train_step(
        dataclasses.replace(settings, prediction_type="epsilon", rescale_betas_zero_snr=False, seed=0),
        data.shape,
    )
    carry = (params, opt.init(params), jax.tree.map(jnp.copy, params))  # distinct buffers: donated
    tables = _loss_tables(settings)
    keys = jax.random.split(key, settings.train_steps)
    name = (
        f"train {settings.prediction_type}{' zero-SNR' if settings.rescale_betas_zero_snr else ''} denoiser"
    )
    bar = tqdm(total=settings.train_steps, desc=name, unit="step", disable=not progress)
    for i in range(settings.train_steps):
        carry, loss = run_step(carry, keys[i], data, labels, tables)
        if (i + 1) % log_every == 0 or i + 1 == settings.train_steps:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        bar.update(1)
    bar.close()
    ema = carry[2] if settings.train_steps > 1 else carry[0]
    return jax.device_get(ema)


def _init_params(model: UNet, key: jax.Array):
    return _jitted_init(model)(
        key, jnp.zeros((1, 8, 8, 1)), jnp.zeros((), jnp.int32), None, jnp.zeros(1, jnp.int32)
    )


@functools.lru_cache(maxsize=8)
def _jitted_init(model: UNet):
    return jax.jit(model.init)


def _loss_tables(settings: TrainSettings) -> tuple[jax.Array, ...]:
    """Per-timestep weights of the forward process and of the target, from the schedule.

    ``x_t = a[t] x0 + b[t] eps`` (`ddim_jax.add_noise`), ``target = c[t] eps + d[t] x0``: eps
    is (1, 0), v is (a, -b) (`ddim_jax.get_velocity`). As arrays, one compiled training step
    serves every schedule and prediction type.
    """
    ab = np.asarray(ddim_jax.create_state(settings.scheduler_config()).alphas_cumprod, np.float64)
    a, b = np.sqrt(ab), np.sqrt(1.0 - ab)
    if settings.prediction_type == "v_prediction":
        c, d = a, -b
    else:
        c, d = np.ones_like(a), np.zeros_like(a)
    return tuple(jnp.asarray(v, jnp.float32) for v in (a, b, c, d))


@functools.lru_cache(maxsize=4)
def _train_step(settings: TrainSettings, data_shape: tuple[int, ...]):
    """The compiled training step for ``settings`` (whose schedule and prediction type come in as tables)."""
    model = make_model(settings)
    warmup = min(200, max(1, settings.train_steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        settings.learning_rate,
        warmup,
        max(settings.train_steps, warmup + 1),
        settings.learning_rate / 20,
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    def loss_fn(p, x0, y, t, noise, tables):
        a, b, c, d = (v[t][:, None, None, None] for v in tables)
        xt = a * x0 + b * noise
        target = c * noise + d * x0
        return jnp.mean((model.apply(p, xt, t, labels=y) - target) ** 2)

    def train_step(carry, step_key, data, labels, tables):
        p, s, ema = carry
        k_idx, k_bright, k_drop, k_t, k_noise = jax.random.split(step_key, 5)
        idx = jax.random.randint(k_idx, (settings.batch_size,), 0, data.shape[0])
        x0 = vary_brightness(data[idx], k_bright)
        drop = jax.random.bernoulli(k_drop, settings.label_dropout, (settings.batch_size,))
        y = jnp.where(drop, NULL_LABEL, labels[idx])
        t = jax.random.randint(k_t, (settings.batch_size,), 0, settings.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        loss, grads = jax.value_and_grad(loss_fn)(p, x0, y, t, noise, tables)
        updates, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        ema = jax.tree.map(lambda e, q: settings.ema_decay * e + (1 - settings.ema_decay) * q, ema, p)
        return (p, s, ema), loss

    # A Python loop of one jitted step: on XLA:CPU a lax.scan over these steps measured ~16x slower
    # (backward convolutions inside a loop body), while DDIM sampling's scan runs at full speed.
    # Compiled here, before any progress bar starts, so its rate and ETA are the steps' own.
    params = jax.eval_shape(functools.partial(_init_params, model), jax.random.key(0))
    carry = (params, jax.eval_shape(opt.init, params), params)
    abstract = (
        carry,
        jax.eval_shape(lambda: jax.random.key(0)),
        jax.ShapeDtypeStruct(data_shape, jnp.float32),
        jax.ShapeDtypeStruct(data_shape[:1], jnp.int32),
        (jax.ShapeDtypeStruct((settings.num_train_timesteps,), jnp.float32),) * 4,
    )
    return jax.jit(train_step, donate_argnums=0).lower(*abstract).compile(), opt


def cache_path(settings: TrainSettings, cache_dir: str | os.PathLike[str]) -> Path:
    """Where `load_or_train` keeps the parameters for ``settings``.

    Example:
      >>> from ddim_jax.demo.train import TrainSettings, cache_path
      >>> cache_path(TrainSettings(), "/tmp/c").name.startswith("digits_unet_")
      True
    """
    return Path(cache_dir).expanduser() / f"digits_unet_{settings.cache_key()}.msgpack"


def load_or_train(
    settings: TrainSettings,
    x_train: np.ndarray,
    y_train: np.ndarray,
    cache_dir: str | os.PathLike[str] | None,
    *,
    progress: bool = True,
):
    """Returns ``(params, from_cache)``: cached params for these settings, else freshly trained ones.

    With ``cache_dir=None`` nothing is read or written. The cache file name holds a hash of
    the settings, so changed settings never reuse stale parameters; a JSON file beside it
    records the settings in readable form.

    Example:
      >>> import tempfile
      >>> from ddim_jax.demo.data import load_digits_split
      >>> from ddim_jax.demo.train import TrainSettings, load_or_train
      >>> s = TrainSettings(channels=(4,), train_steps=2, batch_size=4)
      >>> d, digits = tempfile.mkdtemp(), load_digits_split()
      >>> [load_or_train(s, digits.x_train, digits.y_train, d, progress=False)[1] for _ in range(2)]
      [False, True]
    """
    model = make_model(settings)
    template = jax.eval_shape(functools.partial(_init_params, model), jax.random.key(0))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    path = None if cache_dir is None else cache_path(settings, cache_dir)
    if path is not None and path.is_file():
        try:
            return flax.serialization.from_bytes(template, path.read_bytes()), True
        except (ValueError, KeyError, TypeError):  # a corrupt or incompatible file: retrain
            pass
    params = train_denoiser(settings, x_train, y_train, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(flax.serialization.to_bytes(params))
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
    return params, False
