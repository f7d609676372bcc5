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
from ddim_jax.demo.data import to_unit_range
from ddim_jax.demo.metrics import FeatureNet, feature_stats, frechet_distance
from ddim_jax.demo.unet import UNet

__all__ = ["Sampler", "quality_table", "reconstruction_table", "tables_markdown"]


class _StepBar:
    """Feeds `ddim_jax.sample`'s host callback into a tqdm bar (the steps of all cells)."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.seen = bar, 0

    def start_cell(self) -> None:
        self.seen = 0

    def __call__(self, step_index: Any, timestep: Any, x0: Any) -> None:
        done = int(step_index) + 1
        advance = done - self.seen if done >= self.seen else done  # a new loop (invert, then sample)
        if self.bar is not None:
            self.bar.update(advance)
        self.seen = done


class Sampler:
    """Jitted DDIM sampling and inversion for one model, compiled once per number of steps S.

    Params, noise, eta and keys are traced arguments, so new values reuse the program.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax import DDIMConfig
      >>> from ddim_jax.demo.unet import UNet
      >>> model = UNet(channels=(4,))
      >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.int32(0))
      >>> sampler = Sampler(model, params, DDIMConfig())
      >>> x = sampler.sample(jnp.zeros((2, 8, 8, 1)), 3, 0.0, jax.random.key(1))
      >>> x.shape, sampler.reconstruct(x, 3).shape
      ((2, 8, 8, 1), (2, 8, 8, 1))
    """

    def __init__(self, model: UNet, params: Any, config: ddim_jax.DDIMConfig, bar: Any = None) -> None:
        self.model, self.params, self.config = model, params, config
        _PROGRESS.bar = bar

    @classmethod
    def untrained(cls, channels: Sequence[int] = (4,), config: ddim_jax.DDIMConfig | None = None) -> Sampler:
        """A sampler on an untrained UNet with all-zero parameters, for examples and smoke tests
        (the parameters come from ``jax.eval_shape``: nothing is initialized or trained).

        Example:
          >>> Sampler.untrained().config.num_train_timesteps
          1000
        """
        model = UNet(channels=tuple(channels))
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.int32(0))
        return cls(model, jax.tree.map(jnp.zeros_like, shapes), config or ddim_jax.DDIMConfig())

    def sample(self, x_T: jax.Array, num_steps: int, eta: float, key: jax.Array) -> np.ndarray:
        """Denoises ``x_T`` with S = ``num_steps`` DDIM steps; returns images in [-1, 1].

        Example:
          >>> import jax, jax.numpy as jnp
          >>> sampler = Sampler.untrained()
          >>> sampler.sample(jnp.ones((2, 8, 8, 1)), 3, 1.0, jax.random.key(1)).shape
          (2, 8, 8, 1)
        """
        run = _compiled("sample", self.model, self.config, num_steps)
        _PROGRESS.start_cell()
        return np.asarray(jax.block_until_ready(run(self.params, jnp.asarray(x_T), jnp.float32(eta), key)))

    def reconstruct(self, x0: jax.Array, num_steps: int) -> np.ndarray:
        """Encodes ``x0`` with `ddim_jax.invert` and decodes it with eta = 0 sampling, S steps each.

        Example:
          >>> import jax.numpy as jnp
          >>> Sampler.untrained().reconstruct(jnp.zeros((2, 8, 8, 1)), 3).shape
          (2, 8, 8, 1)
        """
        run = _compiled("reconstruct", self.model, self.config, num_steps)
        _PROGRESS.start_cell()
        return np.asarray(jax.block_until_ready(run(self.params, jnp.asarray(x0))))


_PROGRESS = _StepBar(None)  # one host-side progress sink, so compiled loops are shared by all Samplers


@functools.lru_cache(maxsize=64)
def _compiled(kind: str, model: UNet, config: ddim_jax.DDIMConfig, num_steps: int) -> Any:
    """The jitted loop for (model, config, S); cached so repeated demo runs in one process reuse it."""
    state = ddim_jax.set_timesteps(ddim_jax.create_state(config), num_steps)

    def model_fn(x, t, params):
        return model.apply(params, x, t)

    if kind == "sample":
        every = max(1, num_steps // 20)

        def run(params, x_T, eta, key):
            return ddim_jax.sample(
                model_fn,
                state,
                x_T,
                key=key,
                eta=eta,
                model_args=(params,),
                callback=_PROGRESS,
                callback_every=every,
            )

    else:
        every = max(1, num_steps // 10)

        def run(params, x0):
            args = {"model_args": (params,), "callback": _PROGRESS, "callback_every": every}
            return ddim_jax.sample(model_fn, state, ddim_jax.invert(model_fn, state, x0, **args), **args)

    return jax.jit(run)


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

    All cells start from the same x_T (common random numbers), so differences between
    cells come from the sampler, not from the draw. The floor is the FCD of
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
    rows: dict[str, dict[str, float]] = {}
    eta0: dict[int, np.ndarray] = {}
    for eta in etas:
        row = {}
        for s in steps:
            cell_key = jax.random.fold_in(jax.random.fold_in(key, 1 + s), int(round(eta * 1000)))
            images = sampler.sample(x_T, s, eta, cell_key)
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
