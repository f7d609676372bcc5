"""Peak memory against steps, with and without the trajectory, and against batch size.

From XLA's ``compiled.memory_analysis()`` (argument / output / temp bytes of the compiled
program); on GPU also the allocator's running peak (``device.memory_stats()``) after running
each program, in increasing order of size.

Usage: ``python benchmarks/memory.py [--quick]``
"""

from __future__ import annotations

import _bench as B

import ddim_jax

SHAPE = (8, 4, 64, 64)
FULL_STEPS = (10, 50, 250, 1000)
QUICK_STEPS = (10, 50)
BATCHES = (1, 8, 64)


def make(trajectory):
    def fn(state, x):
        return ddim_jax.sample(B.model_fn, state, x, return_trajectory=trajectory)

    return fn


def peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() if B.on_gpu() else None
    return None if not stats else stats.get("peak_bytes_in_use")


def shape_key(shape):
    return f"B={shape[0]}"


def measure(shape, steps, trajectory):
    state = B.state_for(steps, steps_offset=0)  # offset 1 is invalid at 1000 steps
    x = B.latents(shape)
    compiled, _, _ = B.compile_jit(make(trajectory), state, x)
    mem = compiled.memory_analysis()
    if mem is not None:
        total = mem.output_size_in_bytes + mem.temp_size_in_bytes
        B.record("memory", f"{shape_key(shape)}, {steps} steps, trajectory={trajectory}", total)
    peak = None
    if B.on_gpu():
        out = B.block(compiled(state, x))
        peak = peak_bytes()
        del out
    get = (lambda name: getattr(mem, name, None)) if mem is not None else (lambda name: None)
    return [
        B.shape_str(shape),
        steps,
        "yes" if trajectory else "no",
        B.mib(get("argument_size_in_bytes")),
        B.mib(get("output_size_in_bytes")),
        B.mib(get("temp_size_in_bytes")),
        B.mib(peak),
    ]


def run(quick: bool = False, repeats: int | None = None) -> str:
    shape = (1, 4, 16, 16) if quick else SHAPE
    steps_list = QUICK_STEPS if quick else FULL_STEPS
    rows = [measure(shape, s, False) for s in steps_list]
    rows += [measure(shape, s, True) for s in steps_list]
    batch_rows = [measure((b, *shape[1:]), 50, False) for b in ((1, 2) if quick else BATCHES)]
    header = ["latents", "steps", "trajectory", "args MiB", "output MiB", "temp MiB", "GPU running peak MiB"]
    latent_mib = B.mib(4 * 1 * shape[1] * shape[2] * shape[3])
    return (
        "### Memory (XLA memory_analysis of the jitted `sample`)\n\n"
        + B.table(header, rows + batch_rows)
        + f"\n\nOne float32 latent of 1x{'x'.join(map(str, shape[1:]))} is {latent_mib} MiB. "
        "`GPU running peak` is the allocator's peak since the process started (programs run "
        "from small to large; n/a off GPU).\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
