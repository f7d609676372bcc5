"""Runtime step count: one program for every S (``set_timesteps(state, S, max_steps=M)``, M = 1000)
against the static program compiled for each S, per step, at S = 10, 50, 250; compile times;
the number of programs a stream of requests compiles; both loops' ``unroll``.

Both contenders get the state's tables as jit arguments (the static one: ``set_timesteps(state,
S)`` passed in; the runtime one: S passed in, the padded state built inside). Models: the
elementwise stand-in ``0.1 * x`` and the demo's Flax UNet. The runtime loop runs blocks of
``ddim_jax._loop.RUNTIME_BLOCK`` steps per while-loop iteration; the "one step per iteration"
column traces the same loop with blocks of 1 (the runtime loop before issue 22), in the same run.

Usage: ``python benchmarks/dynamic_steps.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import contextlib
import functools
import time

import _bench as B
import jax
import numpy as np

import ddim_jax
from ddim_jax import _loop

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


@contextlib.contextmanager
def steps_per_iteration(block):
    """Traces the runtime loop with ``block`` steps per while-loop iteration (1: one step each)."""
    saved, _loop.RUNTIME_BLOCK = _loop.RUNTIME_BLOCK, block
    try:
        yield
    finally:
        _loop.RUNTIME_BLOCK = saved


def static_program(model_fn):
    def run(state, x, *model_args):
        return ddim_jax.sample(model_fn, state, x, model_args=model_args)

    return run


def runtime_program(model_fn, base, max_steps, unroll=1):
    def run(num_steps, x, *model_args):
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        return ddim_jax.sample(model_fn, state, x, model_args=model_args, unroll=unroll)

    return run


def per_step_rows(label, model_fn, model_args, x, steps, max_steps, repeats, min_time=0.01):
    """Rows of per-step time for the static program, the runtime one and the runtime one with a
    step per iteration, at each S, and the runtime program's compile time."""
    base = ddim_jax.create_state(ddim_jax.DDIMConfig(**{**B.SD_CONFIG, "steps_offset": 0}))
    program = runtime_program(model_fn, base, max_steps)
    runtime, lo, co = B.compile_jit(program, np.int32(steps[0]), x, *model_args)
    with steps_per_iteration(1):
        one_step, _, _ = B.compile_jit(program, np.int32(steps[0]), x, *model_args)
    rows = []
    for s in steps:
        state = ddim_jax.set_timesteps(base, s)
        static, s_lo, s_co = B.compile_jit(static_program(model_fn), state, x, *model_args)
        call = lambda f, a: B.block(f(*a))  # noqa: E731
        runs = {
            "static": functools.partial(call, static, (state, x, *model_args)),
            "runtime": functools.partial(call, runtime, (np.int32(s), x, *model_args)),
            "one step": functools.partial(call, one_step, (np.int32(s), x, *model_args)),
        }
        wall = B.interleaved(runs, repeats, min_time=min_time, stat=min)  # min: robust to other load
        ratio = {name: wall[name] / wall["static"] for name in ("runtime", "one step")}
        cpu_ratio = {name: "n/a" for name in ratio}
        if not B.on_gpu():  # CPU seconds of this process: steadier than wall time on a shared CPU
            cpu = B.interleaved(runs, repeats, min_time=min_time, stat=min, clock=time.process_time)
            ratio = {name: cpu[name] / cpu["static"] for name in ratio}
            cpu_ratio = {name: f"{r:.3f}" for name, r in ratio.items()}
        B.record("dynamic", f"{label}, S={s}", ratio["runtime"])
        diff = B.rel_diff(runtime(np.int32(s), x, *model_args), static(state, x, *model_args))
        rows.append(
            [
                label,
                s,
                wall["static"] / s * 1e6,
                wall["runtime"] / s * 1e6,
                wall["one step"] / s * 1e6,
                f"{wall['runtime'] / wall['static']:.3f}",
                f"{wall['one step'] / wall['static']:.3f}",
                cpu_ratio["runtime"],
                cpu_ratio["one step"],
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


def unroll_rows(x, repeats, max_steps):
    """Both loops with ``unroll=u`` (50 steps, elementwise model; the runtime one's state padded
    to ``max_steps``)."""
    state = B.state_for(50)
    base = ddim_jax.create_state(state.config)
    runs = {}
    for u in UNROLLS:
        static = jax.jit(functools.partial(lambda u, x: ddim_jax.sample(B.model_fn, state, x, unroll=u), u))
        runtime = jax.jit(runtime_program(B.model_fn, base, max_steps, unroll=u))
        B.block(static(x)), B.block(runtime(np.int32(50), x))
        runs[f"static, unroll={u}"] = functools.partial(lambda f: B.block(f(x)), static)
        runs[f"runtime, unroll={u}"] = functools.partial(lambda f: B.block(f(np.int32(50), x)), runtime)
    med = B.interleaved(runs, repeats, stat=min)
    base_time = med["static, unroll=1"]
    return [[B.shape_str(x.shape), name, t / 50 * 1e6, f"{t / base_time:.2f}"] for name, t in med.items()]


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
    unrolled = unroll_rows(x, repeats, max_steps)
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
                "one step per iteration us/step",
                "runtime / static (wall)",
                "one step / static (wall)",
                "runtime / static (CPU time)",
                "one step / static (CPU time)",
                "static compile s",
                "rel. diff",
            ],
            rows,
        )
        + "\n\n`us/step`: wall time. On a CPU the goal uses the ratio of this process's CPU "
        "seconds (all threads), which other load on a shared machine disturbs less than wall time. "
        f"`runtime`: blocks of {_loop.RUNTIME_BLOCK} steps per while-loop iteration (an inner scan), "
        "the rest one per iteration; `one step per iteration`: the same loop traced with blocks of "
        "1 (the runtime loop before issue 22), timed in the same rounds.\n"
        + "\nCompile time of the one runtime program (lower + compile; the static ones' are above):\n\n"
        + B.table(["model / latents", "runtime compile s"], compile_rows)
        + f"\n\nA stream of {STREAM_REQUESTS} requests, S in [5, 100], random start_step "
        f"(elementwise, {B.shape_str(x.shape)}; wall time includes compilation):\n\n"
        + B.table(["program", "requests", "programs compiled", "stream wall s"], stream_rows)
        + f"\n\nBoth loops' `unroll` (50 steps, elementwise; runtime: M = {max_steps}):\n\n"
        + B.table(["latents", "sample(..., unroll=u)", "us/step", "x static unroll=1"], unrolled)
        + "\n"
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
