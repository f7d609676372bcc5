"""scikit-learn's handwritten digits (shipped with the package, no download) as NHWC images in [-1, 1]."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BRIGHTNESS_RANGE",
    "Digits",
    "load_digits_split",
    "mean_brightness",
    "to_unit_range",
    "vary_brightness",
]

BRIGHTNESS_RANGE = (0.0, 0.6)
"""Range of the random background level b (on the [0, 1] scale) that `vary_brightness` draws."""


class Digits(NamedTuple):
    """A fixed train / held-out split of the 1,797 8x8 digits.

    Attributes:
      x_train: ``(N_train, 8, 8, 1)`` float32 in [-1, 1].
      y_train: ``(N_train,)`` int32 labels 0-9.
      x_test: ``(N_test, 8, 8, 1)`` float32 in [-1, 1] (never seen in training).
      y_test: ``(N_test,)`` int32 labels.

    Example:
      >>> from ddim_jax.demo.data import load_digits_split
      >>> d = load_digits_split()
      >>> d.x_test.shape, d.y_test.shape, d.y_test.dtype.name
      ((449, 8, 8, 1), (449,), 'int32')
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.25, split_seed: int = 0) -> Digits:
    """Loads ``sklearn.datasets.load_digits``, scales pixels 0..16 to [-1, 1] and splits it.

    Args:
      test_fraction: fraction held out (for the metric's floor and the reconstructions).
      split_seed: seed of the split's permutation.

    Example:
      >>> from ddim_jax.demo.data import load_digits_split
      >>> d = load_digits_split()
      >>> d.x_train.shape, d.x_test.shape, float(d.x_train.min()), float(d.x_train.max())
      ((1348, 8, 8, 1), (449, 8, 8, 1), -1.0, 1.0)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def to_unit_range(x: np.ndarray) -> np.ndarray:
    """Maps [-1, 1] images to [0, 1] (clipped), the scale of the paper's reconstruction MSE.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.data import to_unit_range
      >>> to_unit_range(np.array([-2.0, 0.0, 1.0])).tolist()
      [0.0, 0.5, 1.0]
    """
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def vary_brightness(x: jax.Array, key: jax.Array) -> jax.Array:
    """Gives each image a random background level and contrast, so overall brightness varies widely.

    On the [0, 1] scale, with ``u`` the digit's ink (0 = paper, 1 = full ink), the image
    becomes ``b + c * u`` with background ``b ~ U(0, 0.6)`` and contrast
    ``c ~ U(0.4, 1 - b)`` per image: it stays in [0, 1], the digit stays visible, and the
    per-image mean brightness spreads from about 0.1 to 0.7 (Lin et al.'s point is that a
    schedule with non-zero terminal SNR cannot reproduce such spread from pure noise).
    Works in and out of ``jax.jit``; returns float32 in [-1, 1] like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax.demo.data import vary_brightness
      >>> x = -jnp.ones((3, 8, 8, 1))  # blank paper
      >>> y = vary_brightness(x, jax.random.key(0))
      >>> bool((y >= -1).all() and (y <= 1).all()), bool(jnp.ptp(y[:, 0, 0, 0]) > 0)
      (True, True)
    """
    x = jnp.asarray(x, jnp.float32)
    k_b, k_c = jax.random.split(key)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    low, high = BRIGHTNESS_RANGE
    background = jax.random.uniform(k_b, shape, minval=low, maxval=high)
    contrast = jax.random.uniform(k_c, shape, minval=0.4, maxval=1.0 - background)
    return 2.0 * (background + contrast * (x + 1.0) / 2.0) - 1.0


def mean_brightness(x: np.ndarray) -> np.ndarray:
    """Per-image mean brightness on the [0, 1] scale (pixels clipped to the displayable range).

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.data import mean_brightness
      >>> mean_brightness(np.stack([-np.ones((8, 8, 1)), np.full((8, 8, 1), 3.0)])).tolist()
      [0.0, 1.0]
    """
    x = to_unit_range(x)
    return x.reshape(len(x), -1).mean(axis=1)
