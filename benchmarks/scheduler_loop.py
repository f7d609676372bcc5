"""Scheduler-only 50-step loop: `ddim_jax.sample` against the fused floor, diffusers, and a
Python loop of a jitted `ddim_jax.step` (model = the elementwise stand-in ``0.1 * x``).

Usage: ``python benchmarks/scheduler_loop.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import _bench as B
import jax
import numpy as np

import ddim_jax

FULL_SHAPES = [(1, 4, 64, 64), (8, 4, 64, 64), (64, 4, 64, 64), (8, 4, 128, 128)]
QUICK_SHAPES = [(1, 4, 32, 32), (8, 4, 32, 32)]
STEPS = 50


def sample_fn(state, x):
    return ddim_jax.sample(B.model_fn, state, x)


def contenders(shape, steps):
    """name -> (run, result, compile seconds or None)."""
    state = B.state_for(steps)
    x_T = B.latents(shape)
    coef = B.floor_coefficients(state)
    out: dict[str, tuple] = {}

    floor, lo, co = B.compile_jit(B.floor_sample, coef, x_T, state.timesteps)
    res = {}
    out["floor (fused scan)"] = (
        lambda: res.__setitem__("floor", B.block(floor(coef, x_T, state.timesteps))),
        lambda: res["floor"],
        lo + co,
    )
    samp, lo, co = B.compile_jit(sample_fn, state, x_T)
    out["ddim_jax.sample"] = (
        lambda: res.__setitem__("sample", B.block(samp(state, x_T))),
        lambda: res["sample"],
        lo + co,
    )

    model_j = jax.jit(B.model_fn)
    step_j = jax.jit(lambda state, eps, t, x: ddim_jax.step(state, eps, t, x).prev_sample)
    ts = list(state.timesteps)

    def step_loop():
        x = x_T
        for t in ts:
            x = step_j(state, model_j(x, t), t, x)
        res["loop"] = B.block(x)

    out["loop of jitted step"] = (step_loop, lambda: res["loop"], None)

    diff = B.diffusers_runner(shape, steps)
    if diff is not None:
        out["diffusers (torch)"] = (*diff, None)
    return out


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or B.default_repeats(quick)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    rows, notes = [], []
    for shape in shapes:
        cs = contenders(shape, STEPS)
        # first call (compile for the Python loop) outside the timed repeats
        first = {name: B.timed(c[0]) for name, c in cs.items()}
        med = B.interleaved({name: c[0] for name, c in cs.items()}, repeats, warmup=0)
        ref = np.asarray(cs["floor (fused scan)"][1]())
        floor_t = med["floor (fused scan)"]
        diff_t = med.get("diffusers (torch)")
        B.record("floor", B.shape_str(shape), med["ddim_jax.sample"] / floor_t)
        if diff_t is not None:
            B.record("diffusers", B.shape_str(shape), diff_t / med["ddim_jax.sample"])
        for name, (_, result, compile_s) in cs.items():
            if compile_s is None and name != "diffusers (torch)":
                compile_s = max(first[name] - med[name], 0.0)
            rows.append(
                [
                    B.shape_str(shape),
                    name,
                    med[name] / STEPS * 1e6,
                    med[name] / floor_t,
                    "n/a" if diff_t is None else diff_t / med[name],
                    "n/a" if compile_s is None else f"{compile_s:.2f}",
                    B.rel_diff(result(), ref),
                ]
            )
    if not B.torch_device():
        notes.append("diffusers/torch not available on this device: its rows are missing.")
    header = [
        "latents",
        "contender",
        "us/step",
        "x floor",
        "speedup vs diffusers",
        "compile s",
        "rel. diff vs floor",
    ]
    text = [
        f"### Scheduler-only loop ({STEPS} steps, model = `0.1 * x`, float32, median of {repeats} "
        "interleaved repeats)",
        "",
        B.table(header, rows),
        "",
        "`compile s`: lower + compile for the scans; for the Python loop, first call minus a "
        "steady call. diffusers runs pipeline-style (`for t in scheduler.timesteps`), on the "
        "same device. `rel. diff`: max |x - floor| / max |floor| of the final samples.",
    ]
    text += [f"\n{n}" for n in notes]
    return "\n".join(text) + "\n"


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
