"""The DDIM paper's Tables 1 and 2 in miniature, on the digits model.

Table 1: sample quality (Frechet classifier distance, see `ddim_jax.demo.metrics`) against
the number of sampling steps S and eta. Table 2: reconstruction MSE (on the [0, 1] pixel
scale, as in the paper) of held-out digits encoded with `ddim_jax.invert` and decoded with
`ddim_jax.sample` at eta = 0, against S.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.data import load_digits_split, to_unit_range
from ddim_jax.demo.metrics import FeatureNet, feature_stats, frechet_distance
from ddim_jax.demo.train import (
    DEFAULT_CACHE_DIR,
    NULL_LABEL,
    NUM_CLASSES,
    TrainSettings,
    denoiser_fn,
    fixed_settings,
    load_or_train,
    make_model,
)
from ddim_jax.demo.unet import UNet

__all__ = ["Sampler", "quality_table", "reconstruction_table", "tables_markdown", "trained_sampler"]


class _StepBar:
    """Feeds `ddim_jax.sample`'s host callback into a tqdm bar (the steps of all cells)."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.seen = bar, 0

    def start_cell(self) -> None:
        self.seen = 0

    def resume(self) -> None:
        """Leaves the time since the last update (a compile) out of the bar's rate and ETA."""
        if self.bar is not None and hasattr(self.bar, "unpause"):
            self.bar.unpause()

    def __call__(self, step_index: Any, timestep: Any, x0: Any) -> None:
        done = int(step_index) + 1
        advance = done - self.seen if done >= self.seen else done  # a new loop (invert, then sample)
        if self.bar is not None:
            self.bar.update(advance)
        self.seen = done


class Sampler:
    """Jitted DDIM sampling and inversion of one (class-conditional) model, compiled once per S.

    The model is called as `denoiser_fn`'s ``model_fn(x, t, params, labels)``. Params,
    noise, labels, eta, keys, guidance scale and rescale are traced arguments, so new values
    reuse the program: one compiled program per (kind, config, S, guided, shapes), compiled
    ahead of the run so a progress bar's ETA leaves the compiler out.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax.demo.experiments import Sampler
      >>> sampler = Sampler.untrained()  # class-conditional; labels default to NULL_LABEL
      >>> x = sampler.sample(jnp.zeros((2, 8, 8, 1)), 3, 0.0, jax.random.key(1), labels=jnp.array([3, 7]))
      >>> x.shape, sampler.reconstruct(x, 3).shape
      ((2, 8, 8, 1), (2, 8, 8, 1))
    """

    def __init__(self, model: UNet, params: Any, config: ddim_jax.DDIMConfig, bar: Any = None) -> None:
        self.model, self.params, self.config = model, params, config
        _PROGRESS.bar = bar

    @classmethod
    def untrained(cls, channels: Sequence[int] = (4,), config: ddim_jax.DDIMConfig | None = None) -> Sampler:
        """A sampler on an untrained class-conditional UNet with all-zero parameters, for examples
        and smoke tests (the parameters come from ``jax.eval_shape``: nothing is trained).

        Example:
          >>> Sampler.untrained().config.num_train_timesteps
          1000
        """
        model = make_model(TrainSettings(channels=tuple(channels)))
        params = jax.tree.map(jnp.zeros_like, _param_shapes(model))
        return cls(model, params, config or ddim_jax.DDIMConfig())

    def with_config(self, config: ddim_jax.DDIMConfig) -> Sampler:
        """The same model and parameters, sampled with another config (e.g. another spacing).

        Example:
          >>> import ddim_jax
          >>> trailing = ddim_jax.DDIMConfig(timestep_spacing="trailing")
          >>> Sampler.untrained().with_config(trailing).config.timestep_spacing
          'trailing'
        """
        return Sampler(self.model, self.params, config, _PROGRESS.bar)

    def _labels(self, labels: Any, batch: int) -> jax.Array | None:
        if self.model.num_classes == 0:
            if labels is not None:
                raise ValueError("labels were given, but the model is not class-conditional (num_classes=0)")
            return None
        if labels is None:
            return jnp.full((batch,), NULL_LABEL, jnp.int32)
        labels = np.asarray(labels)
        if labels.shape != (batch,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be ints of shape ({batch},), got {labels.dtype} {labels.shape}")
        if labels.min() < 0 or labels.max() > NULL_LABEL:
            raise ValueError(f"labels must be in [0, {NULL_LABEL}] ({NULL_LABEL}: no class), got {labels}")
        return jnp.asarray(labels, jnp.int32)

    def _run(self, kind: str, num_steps: int, *args: Any) -> np.ndarray:
        program = _compiled(kind, self.model, self.config, num_steps, args)
        _PROGRESS.start_cell()
        return np.asarray(jax.block_until_ready(program(self.params, *args)))

    def sample(
        self,
        x_T: jax.Array,
        num_steps: int,
        eta: float,
        key: jax.Array,
        labels: Any = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
    ) -> np.ndarray:
        """Denoises ``x_T`` with S = ``num_steps`` DDIM steps; returns images (about [-1, 1]).

        ``labels``: the digit per example, or None for `NULL_LABEL` (unconditional). With
        ``guidance_scale`` w, classifier-free guidance ``uncond + w (cond - uncond)`` and
        ``guidance_rescale`` phi (Lin et al. Alg. 2); ``guidance_scale=None`` costs one model
        call per step, guidance two.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> sampler = Sampler.untrained()
          >>> sampler.sample(jnp.ones((2, 8, 8, 1)), 3, 1.0, jax.random.key(1), [0, 9], 7.5, 0.7).shape
          (2, 8, 8, 1)
        """
        x_T = jnp.asarray(x_T, jnp.float32)
        labels = self._labels(labels, x_T.shape[0])
        if guidance_scale is None:
            return self._run("sample", num_steps, x_T, jnp.float32(eta), key, labels)
        if labels is None:
            raise ValueError("guidance_scale needs a class-conditional model (num_classes > 0)")
        w, phi = jnp.float32(guidance_scale), jnp.float32(guidance_rescale)
        return self._run("guided", num_steps, x_T, jnp.float32(eta), key, labels, w, phi)

    def reconstruct(self, x0: jax.Array, num_steps: int, labels: Any = None) -> np.ndarray:
        """Encodes ``x0`` with `ddim_jax.invert` and decodes it with eta = 0 sampling, S steps each.

        Example:
          >>> import jax.numpy as jnp
          >>> Sampler.untrained().reconstruct(jnp.zeros((2, 8, 8, 1)), 3).shape
          (2, 8, 8, 1)
        """
        x0 = jnp.asarray(x0, jnp.float32)
        return self._run("reconstruct", num_steps, x0, self._labels(labels, x0.shape[0]))

    def edit(
        self,
        x0: jax.Array,
        num_steps: int,
        source: Any,
        target: Any,
        guidance_scale: float = 1.0,
        method: str = "ddim",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inverts ``x0`` under the ``source`` labels; samples the latents under ``source`` and ``target``.

        ``method`` picks the inversion: ``"ddim"`` (`ddim_jax.invert` / `ddim_jax.sample`),
        ``"edict"`` or ``"bdia"`` (exact; the config must have ``clip_sample=False``). Both
        directions use classifier-free guidance at ``guidance_scale`` (w = 1 is the plain
        conditional model, at two model calls per step). Returns ``(reconstruction, edited)``:
        the round trip under the same conditioning, and the same latents sampled under ``target``.

        Example:
          >>> import jax.numpy as jnp
          >>> from ddim_jax import DDIMConfig
          >>> sampler = Sampler.untrained(config=DDIMConfig(clip_sample=False))
          >>> recon, edited = sampler.edit(jnp.zeros((2, 8, 8, 1)), 3, [3, 1], [8, 6], 2.0, "bdia")
          >>> recon.shape, edited.shape
          ((2, 8, 8, 1), (2, 8, 8, 1))
        """
        if method not in _EDIT_LOOPS:
            raise ValueError(f"method must be one of {list(_EDIT_LOOPS)}, got {method!r}")
        x0 = jnp.asarray(x0, jnp.float32)
        source, target = self._labels(source, x0.shape[0]), self._labels(target, x0.shape[0])
        if source is None:
            raise ValueError("edit needs a class-conditional model (num_classes > 0)")
        out = self._run(f"edit_{method}", num_steps, x0, source, target, jnp.float32(guidance_scale))
        return out[: x0.shape[0]], out[x0.shape[0] :]


_EDIT_LOOPS = {
    "ddim": (ddim_jax.invert, ddim_jax.sample),
    "edict": (ddim_jax.edict_invert, ddim_jax.edict_sample),
    "bdia": (ddim_jax.bdia_invert, ddim_jax.bdia_sample),
}
"""Inversion methods of `Sampler.edit`: (invert, sample) loops."""

_PROGRESS = _StepBar(None)  # one host-side progress sink, so compiled loops are shared by all Samplers


def _signature(args: tuple) -> tuple:
    return tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args) if hasattr(a, "shape"))


def _compiled(kind: str, model: UNet, config: ddim_jax.DDIMConfig, num_steps: int, args: tuple) -> Any:
    """The compiled loop for (kind, model, config, S, argument shapes); memoised per process."""
    cache_key = (kind, model, config, num_steps, _signature(args), jax.tree.structure(args))
    if cache_key not in _PROGRAMS:
        run = _loop(kind, model, config, num_steps)
        _PROGRAMS[cache_key] = jax.jit(run).lower(_param_shapes(model), *args).compile()
        _PROGRESS.resume()
    return _PROGRAMS[cache_key]


_PROGRAMS: dict[tuple, Any] = {}


@functools.lru_cache(maxsize=8)
def _param_shapes(model: UNet) -> Any:
    labels = jnp.zeros(1, jnp.int32) if model.num_classes else None
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.int32(0), None, labels)


def _loop(kind: str, model: UNet, config: ddim_jax.DDIMConfig, num_steps: int) -> Any:
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps)
    model_fn = denoiser_fn(model)
    every = max(1, num_steps // (20 if kind in ("sample", "guided") else 10))
    progress = {"callback": _PROGRESS, "callback_every": every}

    if kind == "sample":

        def run(params, x_T, eta, key, labels):
            return ddim_jax.sample(
                model_fn, state, x_T, key=key, eta=eta, model_args=(params, labels), **progress
            )

    elif kind == "guided":

        def run(params, x_T, eta, key, labels, w, phi):
            both = jnp.concatenate([jnp.full_like(labels, NULL_LABEL), labels])  # [uncond, cond]
            args = {"model_args": (params, both), "guidance_scale": w, "guidance_rescale": phi}
            return ddim_jax.sample(model_fn, state, x_T, key=key, eta=eta, **args, **progress)

    elif kind.startswith("edit_"):
        invert_fn, sample_fn = _EDIT_LOOPS[kind.removeprefix("edit_")]

        def guided(params, labels, w):
            both = jnp.concatenate([jnp.full_like(labels, NULL_LABEL), labels])  # [uncond, cond]
            return {"model_args": (params, both), "guidance_scale": w, **progress}

        def run(params, x0, source, target, w):
            latents = invert_fn(model_fn, state, x0, **guided(params, source, w))
            twice = jax.tree.map(lambda v: jnp.concatenate([v, v]), latents)  # reconstruct and edit at once
            return sample_fn(model_fn, state, twice, **guided(params, jnp.concatenate([source, target]), w))

    else:

        def run(params, x0, labels):
            args = {"model_args": (params, labels), **progress}
            return ddim_jax.sample(model_fn, state, ddim_jax.invert(model_fn, state, x0, **args), **args)

    return run


def trained_sampler(
    settings: TrainSettings | None = None,
    cache_dir: str | None = DEFAULT_CACHE_DIR,
    *,
    progress: bool = True,
    **sampling: Any,
) -> Sampler:
    """A `Sampler` on the trained class-conditional digits model (cached by ``ddim-jax demo``, else trained).

    ``settings`` defaults to the demo's zero-terminal-SNR v-prediction model (Lin et al.'s
    fixed setting); ``sampling`` are sampling-only config fields (default: trailing spacing).
    Its model is `denoiser_fn`'s ``model_fn(x, t, params, labels)`` with ``labels`` 0-9 or
    `NULL_LABEL`; ``sampler.model``, ``sampler.params`` and ``sampler.config`` give it to
    `ddim_jax.invert` / `ddim_jax.sample` directly (e.g. invert a digit under its own label,
    then sample under another).

    Example (tiny settings, not cached):
      >>> import jax
      >>> from ddim_jax.demo.train import TrainSettings
      >>> tiny = TrainSettings(channels=(4,), train_steps=2, batch_size=4)
      >>> sampler = trained_sampler(tiny, cache_dir=None, progress=False)
      >>> x_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
      >>> sampler.sample(x_T, 5, 0.0, jax.random.key(1), labels=[3, 4]).shape
      (2, 8, 8, 1)
    """
    settings = settings or fixed_settings(TrainSettings())
    sampling = sampling or ({"timestep_spacing": "trailing"} if settings.rescale_betas_zero_snr else {})
    digits = load_digits_split()
    params, _ = load_or_train(settings, digits.x_train, digits.y_train, cache_dir, progress=progress)
    return Sampler(make_model(settings), params, settings.scheduler_config(**sampling))


def balanced_labels(num_samples: int) -> np.ndarray:
    """Labels 0, 1, ..., 9, 0, 1, ...: the ten digits in equal shares, for tables that score
    samples against all digits (conditional sampling without guidance, w = 1).

    Example:
      >>> balanced_labels(12).tolist()
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    """
    return np.arange(num_samples) % NUM_CLASSES


def quality_table(
    sampler: Sampler,
    features: FeatureNet,
    x_reference: np.ndarray,
    x_real_test: np.ndarray,
    *,
    steps: Sequence[int],
    etas: Sequence[float],
    num_samples: int,
    seed: int,
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """Table 1: FCD of ``num_samples`` DDIM samples to the reference digits per (eta, S).

    Samples are class-conditional without guidance, the ten digits in equal shares
    (`balanced_labels`). All cells start from the same x_T (common random numbers), so
    differences between cells come from the sampler, not from the draw. The floor is the FCD of
    ``num_samples`` real held-out digits (same sample size, so the same estimator bias).

    Returns:
      ``(table, eta0_samples)``: the table as a JSON-ready dict, and the eta = 0 samples per S.

    Example (raw pixels stand in for the classifier's features):
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import FeatureNet
      >>> sampler = Sampler.untrained()
      >>> pixels = FeatureNet(lambda x: np.reshape(x, (len(x), -1)), accuracy=1.0)
      >>> x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1))
      >>> table, eta0 = quality_table(sampler, pixels, x, x, steps=[3], etas=[0.0], num_samples=2, seed=0)
      >>> list(table["eta"]), list(table["eta"]["0"]), eta0[3].shape
      (['0'], ['3'], (2, 8, 8, 1))
    """
    ref = feature_stats(features.features(x_reference))
    n_floor = min(num_samples, len(x_real_test))
    floor = frechet_distance(ref, feature_stats(features.features(x_real_test[:n_floor])))
    key = jax.random.key(seed)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (num_samples, 8, 8, 1), jnp.float32)
    labels = balanced_labels(num_samples)
    rows: dict[str, dict[str, float]] = {}
    eta0: dict[int, np.ndarray] = {}
    for eta in etas:
        row = {}
        for s in steps:
            cell_key = jax.random.fold_in(jax.random.fold_in(key, 1 + s), int(round(eta * 1000)))
            images = sampler.sample(x_T, s, eta, cell_key, labels=labels)
            row[str(s)] = frechet_distance(ref, feature_stats(features.features(images)))
            if eta == 0:
                eta0[s] = images
        rows[f"{eta:g}"] = row
    table = {
        "metric": "Frechet classifier distance (FID formula on a digits-MLP's 32-d penultimate features)",
        "reference": f"{len(x_reference)} training digits",
        "num_samples": num_samples,
        "steps": list(steps),
        "eta": rows,
        "real_data_floor": floor,
        "real_data_floor_num": n_floor,
        "classifier_test_accuracy": features.accuracy,
    }
    return table, eta0


def reconstruction_table(sampler: Sampler, x0: np.ndarray, *, steps: Sequence[int]) -> dict[str, Any]:
    """Table 2: per-pixel MSE on [0, 1] between held-out digits and invert-then-sample, per S (eta = 0).

    Example:
      >>> import numpy as np
      >>> sampler = Sampler.untrained()
      >>> table = reconstruction_table(sampler, np.zeros((2, 8, 8, 1)), steps=[3])
      >>> table["num_digits"], list(table["mse"])
      (2, ['3'])
    """
    target = to_unit_range(x0)
    mse = {str(s): float(np.mean((to_unit_range(sampler.reconstruct(x0, s)) - target) ** 2)) for s in steps}
    return {
        "metric": "per-pixel MSE on the [0, 1] scale, DDIM inversion then eta=0 sampling, same S",
        "num_digits": len(x0),
        "steps": list(steps),
        "mse": mse,
    }


def tables_markdown(quality: dict[str, Any], recon: dict[str, Any]) -> str:
    """Renders both tables as markdown.

    Example:
      >>> q = {"steps": [10], "eta": {"0": {"10": 1.5}}, "num_samples": 8, "real_data_floor": 0.5,
      ...      "real_data_floor_num": 8, "classifier_test_accuracy": 0.97, "reference": "r", "metric": "m"}
      >>> r = {"steps": [10], "mse": {"10": 0.01}, "num_digits": 4, "metric": "m"}
      >>> print(tables_markdown(q, r).splitlines()[4])
      | 0 | 1.50 |
    """
    steps = quality["steps"]
    lines = [
        f"### Table 1: sample quality, FCD (lower is better), {quality['num_samples']} samples per cell",
        "",
        "| eta \\ S | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for eta, row in quality["eta"].items():
        lines.append(f"| {eta} | " + " | ".join(f"{row[str(s)]:.2f}" for s in steps) + " |")
    lines += [
        "",
        f"Real-data floor (FCD of {quality['real_data_floor_num']} held-out real digits): "
        f"{quality['real_data_floor']:.2f}. Reference statistics: {quality['reference']}; "
        f"classifier held-out accuracy {quality['classifier_test_accuracy']:.3f}.",
        "",
        f"### Table 2: reconstruction MSE ([0, 1] pixels) of {recon['num_digits']} held-out digits, "
        "invert then sample, eta = 0",
        "",
        "| S | " + " | ".join(str(s) for s in recon["steps"]) + " |",
        "|---|" + "---|" * len(recon["steps"]),
        "| MSE | " + " | ".join(f"{recon['mse'][str(s)]:.2e}" for s in recon["steps"]) + " |",
    ]
    return "\n".join(lines) + "\n"
