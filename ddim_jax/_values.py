"""Checks on plain values, below every scheduler module: tracers, integers, shapes, ranges.

The bad-input rule lives here, written once: a value outside its `Interval` raises a
ValueError naming the parameter and the interval when it is known in Python (`check_in`),
and makes the call's floating outputs all NaN when it is traced (`check_in` returns the
traced verdict, `nan_unless` applies it). Nothing here knows the scheduler's types, so any
module may import it at module level.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Interval",
    "as_int32",
    "check_fraction",
    "check_in",
    "check_static_bools",
    "FINITE",
    "nan_unless",
    "numeric",
    "check_positive_int",
    "check_same_shape",
    "compute_dtype",
    "is_int_scalar",
    "is_traced",
    "shown",
]


def is_traced(x: Any) -> bool:
    """True when ``x`` has no concrete value at trace time (inside jit, grad, vmap, scan)."""
    return isinstance(x, jax.core.Tracer)


def shown(value: Any) -> str:
    """``repr(value)`` for an error message; a tracer's dtype and shape, not its repr."""
    if is_traced(value):
        return f"a traced {value.dtype}{list(jnp.shape(value))}"
    return repr(value)


def is_int_scalar(value: Any) -> bool:
    """A Python int (not bool) or an integer array of shape ``()``, traced or not."""
    if isinstance(value, bool):
        return False
    dtype = getattr(value, "dtype", None)
    return isinstance(value, int) or (
        dtype is not None and jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(value) == 0
    )


def check_positive_int(name: str, value: Any, what: str = "") -> int:
    """A Python int >= 1 (not a bool); ``what`` explains the parameter in the error."""
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be an int >= 1{what}, got {value!r}")
    return number


def check_same_shape(name: str, x: Any, ref_name: str, ref: Any) -> None:
    if jnp.shape(x) != jnp.shape(ref):
        raise ValueError(
            f"Shape mismatch: {name} has shape {jnp.shape(x)}, expected {ref_name}'s {jnp.shape(ref)}"
        )


def compute_dtype(*arrays: Any) -> jnp.dtype:
    """float32, or float64 when an input is float64 (with x64 enabled)."""
    dtype = jnp.result_type(*arrays)
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def check_fraction(name: str, value: Any, *, allow_zero: bool) -> bool | jax.Array:
    """A scalar in (0, 1] (or [0, 1]), by `check_in`: True, or a traced verdict for `nan_unless`."""
    if jnp.ndim(numeric(name, value)) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    return check_in(name, value, Interval(0, 1, low_open=not allow_zero))


class Interval(NamedTuple):
    """The valid values of a parameter, e.g. ``[0, 1]`` or ``[0, num_train_timesteps=1000)``.

    Example:
      >>> str(Interval(0, 1000, high_open=True, high_name="num_train_timesteps"))
      '[0, num_train_timesteps=1000)'
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    high_name: str | None = None

    def __str__(self) -> str:
        high = self.high if self.high_name is None else f"{self.high_name}={self.high}"
        return f"{'(' if self.low_open else '['}{self.low}, {high}{')' if self.high_open else ']'}"

    def holds(self, values: Any) -> Any:
        """Elementwise, for numpy or jax arrays; NaN is in no interval."""
        above = values > self.low if self.low_open else values >= self.low
        below = values < self.high if self.high_open else values <= self.high
        return above & below


FINITE = Interval(-math.inf, math.inf, low_open=True, high_open=True)
"""Every finite number: the range of a parameter that takes any real value (NaN and inf refused)."""


def numeric(name: str, value: Any) -> Any:
    """``value`` if it is a number or an array of numbers (a tracer, a jax or numpy array, a
    Python int or float), a Python list or tuple of numbers as a numpy array; anything else
    (a string, None, a bool, a complex number, a nested pytree) gets a TypeError naming ``name``.

    Example:
      >>> numeric("guidance_scale", [1.0, 2.0])
      array([1., 2.])
      >>> numeric("guidance_scale", ".5")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      TypeError: guidance_scale must be a number or an array of numbers, got the str '.5' ...
    """
    if is_traced(value) or isinstance(value, (jax.Array, np.ndarray, np.number)):
        kind = jnp.result_type(value)
        if jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating):
            return value
        raise TypeError(f"{name} must hold numbers (an integer or float dtype), got dtype {kind}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            array = np.asarray(None)
        if array.dtype.kind in "iuf" and array.size:
            return array
    what = f"the {type(value).__name__} {value!r}"
    if isinstance(value, str):
        what += " (convert it to a number first)"
    raise TypeError(f"{name} must be a number or an array of numbers, got {what}")


def check_in(name: str, value: Any, interval: Interval, why: str = "") -> bool | jax.Array:
    """The bad-input rule for one parameter (a scalar or an array: every element must be in).

    A value known in Python that is outside ``interval`` raises a ValueError naming ``name``
    and the interval (``why`` adds the reason); then True is returned. A traced value returns
    a traced bool, False when an element is outside (or NaN), for `nan_unless`. The
    comparison runs in the value's own dtype, before any narrowing cast, so an int64 under
    ``jax_enable_x64`` cannot wrap into range. A value that is not a number (a string, None,
    a bool: see `numeric`) gets a TypeError naming ``name``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> check_in("eta", 0.5, Interval(0, 1))
      True
      >>> check_in("eta", 1.5, Interval(0, 1))
      Traceback (most recent call last):
      ValueError: eta must be in [0, 1], got 1.5
      >>> jax.jit(lambda eta: check_in("eta", eta, Interval(0, 1)))(1.5)
      Array(False, dtype=bool)
    """
    value = numeric(name, value)
    if is_traced(value):
        return jnp.all(interval.holds(value))
    values = np.asarray(value)
    if values.size and not np.all(interval.holds(values)):
        expected = "finite" if interval == FINITE else f"in {interval}"
        raise ValueError(f"{name} must be {expected}{why}, got {values.tolist()}")
    return True


Outputs = TypeVar("Outputs")


def nan_unless(valid: bool | jax.Array, outputs: Outputs) -> Outputs:
    """The traced half of the rule: every floating array in the pytree ``outputs`` becomes all
    NaN where the traced bool ``valid`` is False (integer and bool leaves are kept). A Python
    True (every value known and checked) returns ``outputs`` as they are, at no cost.

    Example:
      >>> import jax.numpy as jnp
      >>> nan_unless(jnp.bool_(False), (jnp.ones(2), jnp.int32(3)))
      (Array([nan, nan], dtype=float32), Array(3, dtype=int32))
    """
    if valid is True:
        return outputs

    def poison(leaf: Any) -> Any:
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            return jnp.where(valid, leaf, jnp.nan)
        return leaf

    return jax.tree.map(poison, outputs)


def as_int32(value: Any) -> jax.Array:
    """``value`` as int32, saturating: a traced wider int (int64 under ``jax_enable_x64``)
    outside int32's range becomes the nearest int32 bound rather than wrapping, so it stays
    outside every valid range (all of which lie inside int32's) for the checks after the cast.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> with jax.enable_x64(True):
      ...     int(jax.jit(as_int32)(jnp.int64(2**32 + 5)))
      2147483647
    """
    dtype = jnp.dtype(jnp.result_type(value))
    wider = jnp.issubdtype(dtype, jnp.integer) and (dtype.itemsize > 4 or dtype == jnp.uint32)
    if is_traced(value) and wider:
        info = jnp.iinfo(jnp.int32)
        unsigned = jnp.issubdtype(dtype, jnp.unsignedinteger)
        value = jnp.minimum(value, info.max) if unsigned else jnp.clip(value, info.min, info.max)
    return jnp.asarray(value, jnp.int32)


def check_bool(name: str, value: Any) -> bool:
    """A Python bool (or a numpy bool scalar); a string such as ``"false"``, whose truth is
    True, an int or None gets a TypeError naming ``name``.

    Example:
      >>> check_bool("remat", "false")
      Traceback (most recent call last):
      TypeError: remat must be a bool (True or False), got the str 'false'
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got the {type(value).__name__} {value!r}")


def check_static_bools(**flags: Any) -> None:
    """Flags that choose the structure of the compiled program (``return_trajectory``,
    ``remat``, ...) must be Python bools: a traced one gets a TypeError that says it must be
    static, any other non-bool one `check_bool`'s."""
    for name, value in flags.items():
        if is_traced(value):
            raise TypeError(
                f"{name} must be a Python bool, got {shown(value)}: it chooses the structure of the "
                "compiled program, so it cannot be traced (pass it as a static argument, e.g. "
                f"jax.jit(f, static_argnames={name!r}), or close over it)"
            )
        check_bool(name, value)
