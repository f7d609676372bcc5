"""Sample quality (Frechet classifier distance), brightness spread and over-exposure of digit samples.

The DDIM paper reports FID (Frechet distance of Inception-v3 features). Inception knows
nothing of 8x8 digits, so this uses the same formula on the 32-d penultimate layer of a
small MLP classifier trained with optax on the training digits: "Frechet classifier distance"
(FCD). Lower is better; real held-out digits scored the same way give the floor. The
classifier is trained on brightness-varied digits (`ddim_jax.demo.data.vary_brightness`), the
data the demo's denoisers learn, and also tells which digit a sample shows.

For Lin et al.'s claims: `wasserstein_1d` and `std_ratio` compare the per-image brightness
of samples with real data's; `out_of_range_fraction` measures over-exposure.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "Classifier",
    "FeatureNet",
    "FeatureStats",
    "default_feature_net",
    "feature_stats",
    "frechet_distance",
    "out_of_range_fraction",
    "std_ratio",
    "train_classifier",
    "wasserstein_1d",
]


class Classifier(nn.Module):
    """MLP 64 -> 128 -> ``feature_dim`` -> 10; ``features=True`` returns the penultimate layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax.demo.metrics import Classifier
      >>> clf = Classifier()
      >>> p = clf.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
      >>> clf.apply(p, jnp.zeros((3, 8, 8, 1)), features=True).shape
      (3, 32)
    """

    hidden: int = 128
    feature_dim: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
        h = jnp.reshape(x, (x.shape[0], -1))
        h = nn.relu(nn.Dense(self.hidden)(h))
        h = nn.relu(nn.Dense(self.feature_dim)(h))
        return h if features else nn.Dense(10)(h)


class FeatureNet(NamedTuple):
    """A trained classifier: ``features(x)`` maps ``(N, 8, 8, 1)`` images to ``(N, feature_dim)``.

    Example (`train_classifier` makes real ones; raw pixels as a stand-in):
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import FeatureNet
      >>> pixels = FeatureNet(lambda x: np.reshape(x, (len(x), -1)), accuracy=1.0)
      >>> pixels.features(np.zeros((3, 8, 8, 1))).shape
      (3, 64)
    """

    features: Callable[[np.ndarray], np.ndarray]
    accuracy: float
    """Held-out accuracy, reported so the feature space is known to be meaningful."""
    predict: Callable[[np.ndarray], np.ndarray] | None = None
    """The predicted digit ``(N,)`` of each image (None for stand-ins without a classifier head)."""


class FeatureStats(NamedTuple):
    """Mean ``(D,)`` and covariance ``(D, D)`` of features, as `feature_stats` returns them.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import feature_stats
      >>> stats = feature_stats(np.eye(3))
      >>> stats.mean.shape, stats.cov.shape
      ((3,), (3, 3))
    """

    mean: np.ndarray
    cov: np.ndarray


@functools.lru_cache(maxsize=4)
def default_feature_net(seed: int = 0, steps: int = 400) -> FeatureNet:
    """`train_classifier` on `load_digits_split`'s fixed split, memoised per process.

    Example:
      >>> from ddim_jax.demo.metrics import default_feature_net
      >>> default_feature_net(0, 100) is default_feature_net(0, 100)
      True
    """
    import jax

    from ddim_jax.demo.data import load_digits_split, vary_brightness

    d = load_digits_split()
    copies = 4  # brightness-varied copies of the training digits (fixed draws: a fixed metric)
    x_train = np.concatenate([vary_brightness(d.x_train, jax.random.key(100 + i)) for i in range(copies)])
    x_test = np.asarray(vary_brightness(d.x_test, jax.random.key(99)))
    return train_classifier(x_train, np.tile(d.y_train, copies), x_test, d.y_test, steps=steps, seed=seed)


def train_classifier(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    steps: int = 400,
    seed: int = 0,
) -> FeatureNet:
    """Trains `Classifier` full-batch with adam (seconds on a CPU).

    Example:
      >>> from ddim_jax.demo.data import load_digits_split
      >>> from ddim_jax.demo.metrics import train_classifier
      >>> d = load_digits_split()
      >>> net = train_classifier(*d, steps=200)
      >>> net.accuracy > 0.9, net.features(d.x_test[:5]).shape
      (True, (5, 32))
    """
    clf = Classifier()
    params = clf.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))
    opt = optax.adamw(3e-3, weight_decay=1e-4)
    x, y = jnp.asarray(x_train), jnp.asarray(y_train)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(clf.apply(p, x), y).mean()

    @jax.jit
    def train(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return params

    params = train(params)
    accuracy = float(jnp.mean(jnp.argmax(clf.apply(params, jnp.asarray(x_test)), -1) == y_test))
    apply_features = jax.jit(lambda p, x: clf.apply(p, x, features=True))
    predict = jax.jit(lambda p, x: jnp.argmax(clf.apply(p, x), -1))
    return FeatureNet(
        lambda images: np.asarray(apply_features(params, jnp.asarray(images)), np.float64),
        accuracy,
        lambda images: np.asarray(predict(params, jnp.asarray(images))),
    )


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and covariance (float64) of ``(N, D)`` features.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import feature_stats
      >>> feature_stats(np.eye(3)).cov.shape
      (3, 3)
    """
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N >= 2, D), got {features.shape}")
    return FeatureStats(features.mean(0), np.cov(features, rowvar=False))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2)``, the FID formula.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import FeatureStats, frechet_distance
      >>> a = FeatureStats(np.zeros(2), np.eye(2))
      >>> b = FeatureStats(np.ones(2), 4 * np.eye(2))
      >>> round(frechet_distance(a, b), 6)  # 2 + (1 + 4 - 2 * 2) * 2
      4.0
    """
    vals, vecs = np.linalg.eigh(a.cov)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    middle = np.linalg.eigvalsh(sqrt_a @ b.cov @ sqrt_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0.0, None)).sum()
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """The 1-D Wasserstein (earth mover's) distance between two samples' empirical distributions.

    ``scipy.stats.wasserstein_distance`` of the flattened samples (which may differ in size),
    with a clear error for an empty one.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import wasserstein_1d
      >>> wasserstein_1d(np.array([0.0, 1.0]), np.array([0.5, 1.5]))  # every point moves 0.5
      0.5
      >>> wasserstein_1d(np.array([0.0]), np.array([0.0, 1.0]))  # half the mass moves 1
      0.5
    """
    from scipy.stats import wasserstein_distance

    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError(f"both samples must be non-empty, got sizes {a.size} and {b.size}")
    return float(wasserstein_distance(a, b))


def std_ratio(samples: np.ndarray, reference: np.ndarray) -> float:
    """``std(samples) / std(reference)`` over all values: below 1, the samples spread too little.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import std_ratio
      >>> std_ratio(np.array([0.0, 1.0]), np.array([0.0, 4.0]))
      0.25
    """
    ref = float(np.std(np.asarray(reference, np.float64)))
    if not ref > 0:
        raise ValueError(f"reference must not be constant (std {ref})")
    return float(np.std(np.asarray(samples, np.float64))) / ref


def out_of_range_fraction(x: np.ndarray, low: float = -1.0, high: float = 1.0, tol: float = 0.05) -> float:
    """Fraction of values beyond the data's range ``[low, high]`` by more than ``tol``: over-exposure.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.metrics import out_of_range_fraction
      >>> out_of_range_fraction(np.array([-1.5, -1.0, 0.0, 1.02, 1.2]))
      0.4
    """
    x = np.asarray(x, np.float64)
    return float(np.mean((x < low - tol) | (x > high + tol)))
