"""The cost of eta > 0 (drawing noise each step): eta = 1 against eta = 0 for `ddim_jax.sample`
with jax's default PRNG (threefry) and the ``rbg`` / ``unsafe_rbg`` key implementations, the
fused floor with the same noise, and diffusers with eta = 0 and 1.

Usage: ``python benchmarks/eta_noise.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import _bench as B
import jax

import ddim_jax

FULL_SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (64, 4, 64, 64), (8, 4, 128, 128)]
GPU_SHAPES = [(1, 4, 64, 64), (64, 4, 64, 64), (8, 4, 128, 128)]
QUICK_SHAPES = [(8, 4, 32, 32)]
STEPS = 50
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def sample_eta(state, x, key):
    return ddim_jax.sample(B.model_fn, state, x, key=key, eta=1.0)


def sample_eta0(state, x):
    return ddim_jax.sample(B.model_fn, state, x)


def measure(shape, repeats):
    state = B.state_for(STEPS)
    x_T = B.latents(shape)
    res: dict[str, jax.Array] = {}
    runs = {}

    def add(name, fn, *args):
        compiled, _, _ = B.compile_jit(fn, *args)
        runs[name] = lambda: res.__setitem__(name, B.block(compiled(*args)))

    add("sample, eta=0", sample_eta0, state, x_T)
    for impl in KEY_IMPLS:
        add(f"sample, eta=1, {impl}", sample_eta, state, x_T, jax.random.key(1, impl=impl))
    coef1 = B.floor_coefficients(state, eta=1.0)
    for impl in ("threefry2x32", "rbg"):
        add(
            f"floor, eta=1, {impl}", B.floor_sample, coef1, x_T, state.timesteps, jax.random.key(1, impl=impl)
        )
    for eta in (0.0, 1.0):
        diff = B.diffusers_runner(shape, STEPS, eta=eta)
        if diff is not None:
            runs[f"diffusers, eta={eta:g}"] = diff[0]
    med = B.interleaved(runs, repeats)
    check = B.rel_diff(res["sample, eta=1, threefry2x32"], res["floor, eta=1, threefry2x32"])
    return med, check


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or B.default_repeats(quick)
    rows, checks = [], []
    for shape in QUICK_SHAPES if quick else (GPU_SHAPES if B.on_gpu() else FULL_SHAPES):
        med, check = measure(shape, repeats)
        checks.append(f"{B.shape_str(shape)}: {check}")
        base = med["sample, eta=0"]
        dbase = med.get("diffusers, eta=0")
        for name, t in med.items():
            ref = dbase if name.startswith("diffusers") else base
            rows.append([B.shape_str(shape), name, t / STEPS * 1e6, t / ref])
            if name.startswith("sample, eta=1"):
                B.record(f"eta:{name.rsplit(', ', 1)[1]}", B.shape_str(shape), t / ref)
    header = ["latents", "contender", "us/step", "x eta=0 (same library)"]
    return (
        f"### eta = 1 against eta = 0 ({STEPS} steps, median of {repeats} interleaved repeats)\n\n"
        + B.table(header, rows)
        + "\n\nKeys: `jax.random.key(1, impl=...)` passed to `sample(..., key=key, eta=1.0)`. "
        "The floor draws the same noise (`jax.random.split(key, S)[i]`); sample vs floor at eta=1 "
        "(threefry), rel. diff: " + "; ".join(checks) + "\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
