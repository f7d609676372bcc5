"""Checks on plain values, below every scheduler module: tracers, integers, shapes, ranges.

Nothing here knows the scheduler's types, so any module may import it at module level.
"""

from __future__ import annotations

import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "check_fraction",
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


def check_fraction(name: str, value: Any, *, allow_zero: bool) -> None:
    """A scalar in (0, 1] (or [0, 1]); a traced value is checked for shape only."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    if is_traced(value):
        return
    low = 0.0 if allow_zero else np.nextafter(0.0, 1.0)
    number = float(value)
    if not low <= number <= 1.0:
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {number}")
