"""Runtime step count: one program for every S (``set_timesteps(state, S, max_steps=M)``, M = 1000)
against the static program compiled for each S, per step, at S = 10, 50, 250; compile times;
the number of programs a stream of requests compiles; the static loop's scan ``unroll``.

Both contenders get the state's tables as jit arguments (the static one: ``set_timesteps(state,
S)`` passed in; the runtime one: S passed in, the padded state built inside). Models: the
elementwise stand-in ``0.1 * x`` and the demo's Flax UNet.

Usage: ``python benchmarks/dynamic_steps.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import functools
import time

import _bench as B
import jax
import numpy as np

import ddim_jax

MAX_STEPS = 1000
STEPS = (10, 50, 250)
QUICK_STEPS = (10, 50)
ELEMENTWISE_SHAPE = {"cpu": (8, 4, 64, 64), "gpu": (8, 4, 64, 64), "quick": (1, 4, 16, 16)}
# (name, NHWC shape, UNet channels)
UNET = {
    "cpu": ("digits", (8, 8, 8, 1), (32, 64)),
    "gpu": ("latent 4x64x64", (8, 64, 64, 4), (64, 128)),
    "quick": ("digits", (2, 8, 8, 1), (8, 16)),
}
STREAM_REQUESTS = 20
UNROLLS = (1, 2, 5, 10)


def static_program(model_fn):
    def run(state, x, *model_args):
        return ddim_jax.sample(model_fn, state, x, model_args=model_args)

    return run


def runtime_program(model_fn, base, max_steps):
    def run(num_steps, x, *model_args):
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        return ddim_jax.sample(model_fn, state, x, model_args=model_args)

    return run


def per_step_rows(label, model_fn, model_args, x, steps, max_steps, repeats, min_time=0.01):
    """Rows of per-step time for both programs at each S, and their compile times."""
    base = ddim_jax.create_state(ddim_jax.DDIMConfig(**{**B.SD_CONFIG, "steps_offset": 0}))
    runtime, lo, co = B.compile_jit(
        runtime_program(model_fn, base, max_steps), np.int32(steps[0]), x, *model_args
    )
    rows = []
    for s in steps:
        state = ddim_jax.set_timesteps(base, s)
        static, s_lo, s_co = B.compile_jit(static_program(model_fn), state, x, *model_args)
        runs = {
            "static": functools.partial(lambda f, a: B.block(f(*a)), static, (state, x, *model_args)),
            "runtime": functools.partial(lambda f, a: B.block(f(*a)), runtime, (np.int32(s), x, *model_args)),
        }
        wall = B.interleaved(runs, repeats, min_time=min_time, stat=min)  # min: robust to other load
        ratio = wall["runtime"] / wall["static"]
        cpu_ratio = "n/a"
        if not B.on_gpu():  # CPU seconds of this process: steadier than wall time on a shared CPU
            cpu = B.interleaved(runs, repeats, min_time=min_time, stat=min, clock=time.process_time)
            ratio = cpu["runtime"] / cpu["static"]
            cpu_ratio = f"{ratio:.3f}"
        B.record("dynamic", f"{label}, S={s}", ratio)
        diff = B.rel_diff(runtime(np.int32(s), x, *model_args), static(state, x, *model_args))
        rows.append(
            [
                label,
                s,
                wall["static"] / s * 1e6,
                wall["runtime"] / s * 1e6,
                f"{wall['runtime'] / wall['static']:.3f}",
                cpu_ratio,
                f"{s_lo + s_co:.2f}",
                diff,
            ]
        )
    B.record("dynamic compile", f"{label}: runtime (M={max_steps})", lo + co)
    return rows, lo + co


def stream(x, max_steps, seed=0):
    """A stream of requests with random (S, start_step): programs compiled, wall time."""
    rng = np.random.default_rng(seed)
    requests = [(int(s), int(rng.integers(0, s))) for s in rng.integers(5, 101, STREAM_REQUESTS)]
    base = ddim_jax.create_state(ddim_jax.DDIMConfig(**{**B.SD_CONFIG, "steps_offset": 0}))

    def static(state, x, start):
        return ddim_jax.sample(B.model_fn, state, x, start_step=start)

    def runtime(num_steps, x, start):
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        return ddim_jax.sample(B.model_fn, state, x, start_step=start)

    static_jit, runtime_jit = jax.jit(static, static_argnums=2), jax.jit(runtime)
    walls = {}
    for name, call in [
        (
            "static (a program per S and start_step)",
            lambda s, k: static_jit(ddim_jax.set_timesteps(base, s), x, k),
        ),
        ("runtime (S, start_step traced)", lambda s, k: runtime_jit(np.int32(s), x, np.int32(k))),
    ]:
        t0 = time.perf_counter()
        for s, k in requests:
            B.block(call(s, k))
        walls[name] = time.perf_counter() - t0
    programs = {
        "static (a program per S and start_step)": static_jit._cache_size(),
        "runtime (S, start_step traced)": runtime_jit._cache_size(),
    }
    B.record("stream programs", "runtime", programs["runtime (S, start_step traced)"])
    B.record("stream programs", "static", programs["static (a program per S and start_step)"])
    return [[name, len(requests), programs[name], f"{walls[name]:.2f}"] for name in walls]


def unroll_rows(x, repeats):
    """The static loop with ``unroll=u`` (50 steps, elementwise model)."""
    state = B.state_for(50)
    runs = {}
    for u in UNROLLS:
        fn = jax.jit(functools.partial(lambda u, x: ddim_jax.sample(B.model_fn, state, x, unroll=u), u))
        B.block(fn(x))
        runs[f"unroll={u}"] = functools.partial(lambda f: B.block(f(x)), fn)
    med = B.interleaved(runs, repeats, stat=min)
    base = med["unroll=1"]
    return [[B.shape_str(x.shape), name, t / 50 * 1e6, f"{t / base:.2f}"] for name, t in med.items()]


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or (3 if quick else 15 if B.on_gpu() else 9)
    kind = "quick" if quick else ("gpu" if B.on_gpu() else "cpu")
    steps = QUICK_STEPS if quick else STEPS
    max_steps = 100 if quick else MAX_STEPS
    x = B.latents(ELEMENTWISE_SHAPE[kind])
    rows, compile_rows = [], []
    label = f"elementwise, {B.shape_str(x.shape)}"
    part, runtime_compile = per_step_rows(label, B.model_fn, (), x, steps, max_steps, 2 * repeats, 0.05)
    rows += part
    compile_rows.append([label, f"{runtime_compile:.2f}"])
    if not B.out_of_time():
        from unet_e2e import make_model

        name, shape, channels = UNET[kind]
        model, params = make_model(shape, channels)
        label = f"UNet {name}, B={shape[0]}, ch={channels}"
        model_fn = functools.partial(lambda m, x, t, p: m.apply(p, x, t), model)
        part, runtime_compile = per_step_rows(
            label, model_fn, (params,), B.latents(shape), steps, max_steps, max(3, repeats // 2)
        )
        rows += part
        compile_rows.append([label, f"{runtime_compile:.2f}"])
    stream_rows = stream(x, max_steps)
    unrolled = unroll_rows(x, repeats)
    return (
        f"### Runtime step count (M = {max_steps}) against a static program per S "
        f"(eta = 0; elementwise: best of {2 * repeats} interleaved repeats of >= 50 ms; "
        f"UNet: best of {max(3, repeats // 2)})\n\n"
        + B.table(
            [
                "model / latents",
                "S",
                "static us/step",
                "runtime us/step",
                "runtime / static (wall)",
                "runtime / static (CPU time)",
                "static compile s",
                "rel. diff",
            ],
            rows,
        )
        + "\n\n`us/step`: wall time. On a CPU the goal uses the ratio of this process's CPU "
        "seconds (all threads), which other load on a shared machine disturbs less than wall time.\n"
        + "\nCompile time of the one runtime program (lower + compile; the static ones' are above):\n\n"
        + B.table(["model / latents", "runtime compile s"], compile_rows)
        + f"\n\nA stream of {STREAM_REQUESTS} requests, S in [5, 100], random start_step "
        f"(elementwise, {B.shape_str(x.shape)}; wall time includes compilation):\n\n"
        + B.table(["program", "requests", "programs compiled", "stream wall s"], stream_rows)
        + "\n\nThe static loop's `unroll` (50 steps, elementwise):\n\n"
        + B.table(["latents", "sample(..., unroll=u)", "us/step", "x unroll=1"], unrolled)
        + "\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
