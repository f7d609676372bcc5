"""Per-step cost of the bad-input rule (docs/exactness.md): `step` and `sample` with their checks
live (traced timestep and eta, so the NaN select is in the program) against a copy of the same
arithmetic without any check, side by side in one run.

- step: 50 steps of ``ddim_jax.step`` in a jitted ``fori_loop`` (traced t from the state's table,
  traced eta with ``variance_noise``), against the same loop over `ddim_jax._step`'s arithmetic
  (`alpha_at`, `prev_timestep`, `step_coefficients`, `ddim_update`) with no check at all.
- sample: ``ddim_jax.sample`` with a traced eta (checked once, NaN select on the result) against
  a Python eta (checked in Python, no select), and the hand-written fused floor.

Usage: ``python benchmarks/checks_cost.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import time

import _bench as B
import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax._step import alpha_at, ddim_update, prev_timestep, step_coefficients

FULL_SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (64, 4, 64, 64)]
QUICK_SHAPES = [(1, 4, 32, 32), (8, 4, 32, 32)]
STEPS = 50


def unchecked_step(state, model_output, t, sample, eta, noise):
    """`ddim_jax.step`'s arithmetic for a scalar int32 t, traced eta and given noise: no checks."""
    alpha_t = alpha_at(state, t)
    alpha_prev = alpha_at(state, prev_timestep(state, t))
    coef = step_coefficients(state.config, alpha_t, alpha_prev, eta, True)
    return ddim_update(state.config, coef, model_output, sample, noise=noise)


def step_loop(step_fn):
    def run(state, x, eta, noise):
        def body(i, x):
            t = state.timesteps[i]
            return step_fn(state, B.model_fn(x, t), t, x, eta, noise).prev_sample

        return jax.lax.fori_loop(0, state.timesteps.shape[0], body, x)

    return run


def checked_step(state, model_output, t, sample, eta, noise):
    return ddim_jax.step(state, model_output, t, sample, eta=eta, variance_noise=noise)


def contenders(shape):
    state = B.state_for(STEPS)
    x = B.latents(shape)
    noise = 0.5 * B.latents(shape)
    eta = jnp.float32(0.5)
    key = jax.random.key(1)
    res: dict[str, jax.Array] = {}
    out = {}

    def add(name, fn, *args):
        compiled, _, _ = B.compile_jit(fn, *args)
        out[name] = lambda: res.__setitem__(name, B.block(compiled(*args)))

    add("step, checked", step_loop(checked_step), state, x, eta, noise)
    add("step, no checks", step_loop(unchecked_step), state, x, eta, noise)
    add(
        "sample, traced eta (checked)",
        lambda state, x, eta, key: ddim_jax.sample(B.model_fn, state, x, eta=eta, key=key),
        state,
        x,
        eta,
        key,
    )
    add(
        "sample, Python eta",
        lambda state, x, key: ddim_jax.sample(B.model_fn, state, x, eta=0.5, key=key),
        state,
        x,
        key,
    )
    coef = B.floor_coefficients(state)
    add("floor (fused scan, eta = 0)", B.floor_sample, coef, x, state.timesteps)
    return out, res


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or B.default_repeats(quick)
    rows = []
    for shape in QUICK_SHAPES if quick else FULL_SHAPES:
        cs, res = contenders(shape)
        med = B.interleaved(cs, repeats, min_time=0.05, clock=time.process_time)
        pairs = {
            "step, checked": "step, no checks",
            "sample, traced eta (checked)": "sample, Python eta",
        }
        for name, seconds in med.items():
            base = pairs.get(name)
            ratio = f"{seconds / med[base]:.3f}" if base else ""
            same = ""
            if base:
                same = "yes" if np.array_equal(np.asarray(res[name]), np.asarray(res[base])) else "no"
            rows.append([B.shape_str(shape), name, seconds / STEPS * 1e6, ratio, same])
        B.record("checks_cost", B.shape_str(shape), med["step, checked"] / med["step, no checks"])
    header = ["latents", "contender", "us/step", "x unchecked", "bitwise equal"]
    return (
        "\n".join(
            [
                f"### Cost of the bad-input checks ({STEPS} steps, model = `0.1 * x`, eta = 0.5, float32, "
                f"median of {repeats} interleaved repeats, CPU time of the process)",
                "",
                B.table(header, rows),
                "",
                "`step, checked`: `ddim_jax.step` in a jitted `fori_loop`, timestep and eta traced (its "
                "range checks and NaN select are in the program); `step, no checks`: the same "
                "arithmetic from `ddim_jax._step` without them. `sample, traced eta`: the loop checks "
                "eta once and selects NaN on the result; `Python eta`: checked in Python, no select. "
                "`x unchecked`: time over the row named in the pair.",
            ]
        )
        + "\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
