"""Compile time against num_inference_steps (10, 50, 250, 1000): one ``lax.scan`` keeps it flat.

Each measurement is a fresh ``jax.jit`` (lower + compile). For contrast, a Python ``for`` loop
of `ddim_jax.step` inside one jit (unrolled: its program grows with the steps) at 10 and 50.

Usage: ``python benchmarks/compile_time.py [--quick]``
"""

from __future__ import annotations

import _bench as B
import jax

import ddim_jax

SHAPE = (8, 4, 64, 64)
FULL_STEPS = (10, 50, 250, 1000)
QUICK_STEPS = (10, 50, 250)
UNROLLED_STEPS = (10, 50)


def contenders():
    """Fresh functions each call, so no tracing or compilation cache is reused."""

    def sample_eta0(state, x):
        return ddim_jax.sample(B.model_fn, state, x)

    def sample_eta1(state, x, key):
        return ddim_jax.sample(B.model_fn, state, x, key=key, eta=1.0)

    def unrolled(state, x):
        for t in state.timesteps:
            x = ddim_jax.step(state, B.model_fn(x, t), t, x).prev_sample
        return x

    return {"sample, eta=0": sample_eta0, "sample, eta=1": sample_eta1, "unrolled step loop in jit": unrolled}


def run(quick: bool = False, repeats: int | None = None) -> str:
    shape = (1, 4, 16, 16) if quick else SHAPE
    x = B.latents(shape)
    key = jax.random.key(0)
    B.compile_jit(contenders()["sample, eta=0"], B.state_for(10, steps_offset=0), x)  # warm up the compiler
    rows = []
    for steps in QUICK_STEPS if quick else FULL_STEPS:
        state = B.state_for(steps, steps_offset=0)  # offset 1 is invalid at 1000 steps
        for name, fn in contenders().items():
            if name.startswith("unrolled") and steps not in UNROLLED_STEPS:
                continue
            args = (state, x, key) if name == "sample, eta=1" else (state, x)
            _, lower_s, compile_s = B.compile_jit(fn, *args)
            if name == "sample, eta=0":
                B.record("compile", f"{steps} steps", lower_s + compile_s)
            rows.append([steps, name, f"{lower_s:.3f}", f"{compile_s:.3f}", f"{lower_s + compile_s:.3f}"])
    return (
        f"### Compile time against steps (latents {B.shape_str(shape)}, fresh jit each)\n\n"
        + B.table(["steps", "program", "lower s", "compile s", "total s"], rows)
        + "\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
