"""One process of a multi-process (multi-controller) JAX run; test_multiprocess.py launches N of them.

Each process gets a few CPU devices of its own, calls ``jax.distributed.initialize`` against
process 0's coordinator on 127.0.0.1, builds the global mesh over all processes' devices,
assembles every global input from its own rows (``jax.make_array_from_process_local_data``),
runs each loop of `LOOPS` under ``jax.jit`` and gathers the result on every process
(``process_allgather``, a cross-process collective: gloo on CPU). Process 0 writes the
gathered results to ``<out>/results.npz``; the test compares them with a single-process run
of the same `LOOPS` entries, which it imports from here.

Adding a loop to the test is one entry in `LOOPS`: a name and a function
``(state, inputs) -> output``, an array or a pytree of arrays that are batch first and sharded
like ``inputs.x`` (e.g. a pair of latents), for example
``"invert_plain": lambda s, d: invert(model_fn, s, d.x, model_args=(d.w, d.cond))``.

With ``--rounds 0`` the processes repeat the loops and the gather until an error ends them:
the fault test kills one process and times how long the others take to fail.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ddim_jax
from ddim_jax import (
    DDIMConfig,
    DDIMState,
    bdia_invert,
    create_state,
    edict_invert,
    invert,
    parallel_sample,
    sample,
    set_timesteps,
)

BATCH = 24  # global batch; divisible by every device count the tests use (4, 6, 8)
LATENT = (4, 6)
STEPS = 4


class Inputs(NamedTuple):
    """The global inputs of every loop: batch rows (sharded) and values shared by all rows (replicated)."""

    x: jax.Array  # (BATCH, *LATENT) latents
    keys: jax.Array  # (BATCH, 2) uint32: one (legacy threefry) key per example
    cond: jax.Array  # (BATCH, LATENT[0]) conditioning
    pairs: jax.Array  # (2 * BATCH, LATENT[0]) guidance conditioning [uncond_0, cond_0, uncond_1, ...]
    key: jax.Array  # (2,) uint32: one key for the whole batch, replicated
    w: jax.Array  # () model parameter, replicated
    steps: jax.Array  # () int32 runtime step count (set_timesteps(..., max_steps=2 * STEPS)), replicated


REPLICATED = ("key", "w", "steps")


def model_fn(x, t, w, emb):
    """Per-example stand-in model: parameter ``w`` (shared) and conditioning ``emb`` (one row per example)."""
    return jnp.tanh(w * x + 0.3 * emb[:, :, None]) + 1e-3 * t.astype(x.dtype)


def ddim_state() -> DDIMState:
    """The schedule the loops run (built after ``initialize``: no JAX computation may run before it)."""
    return set_timesteps(create_state(DDIMConfig(prediction_type="v_prediction", clip_sample=False)), STEPS)


GUIDED = {"guidance_scale": 3.0, "guidance_rescale": 0.7, "guidance_layout": "interleave"}

# name -> loop(state, inputs): what every process runs on the global arrays, under jax.jit.
LOOPS: dict[str, Callable[[DDIMState, Inputs], Any]] = {
    "sample_guided_eta_keys": lambda s, d: sample(
        model_fn, s, d.x, key=d.keys, eta=0.5, model_args=(d.w, d.pairs), **GUIDED
    ),
    "sample_eta_one_key": lambda s, d: sample(model_fn, s, d.x, key=d.key, eta=1.0, model_args=(d.w, d.cond)),
    "invert_guided": lambda s, d: invert(model_fn, s, d.x, model_args=(d.w, d.pairs), **GUIDED),
    "edict_invert_guided": lambda s, d: edict_invert(model_fn, s, d.x, model_args=(d.w, d.pairs), **GUIDED),
    "bdia_invert_guided": lambda s, d: bdia_invert(model_fn, s, d.x, model_args=(d.w, d.pairs), **GUIDED),
    "parallel_sample_guided_eta_keys": lambda s, d: (
        parallel_sample(
            model_fn, s, d.x, window=2, key=d.keys, eta=0.5, model_args=(d.w, d.pairs), **GUIDED
        ).sample
    ),
    "sample_runtime_steps": lambda s, d: sample(
        model_fn,
        set_timesteps(s, d.steps, max_steps=2 * STEPS),
        d.x,
        key=d.keys,
        eta=0.5,
        model_args=(d.w, d.pairs),
        **GUIDED,
    ),
}


# Both sides of the comparison compile with these options: LLVM optimisation level 0 compiles
# these loops ~3x faster on CPU (the eta noise's threefry dominates), and the level changes
# float rounding (by ~1 ulp), so the single-process reference must use the same.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_loop(name: str, state: DDIMState, inputs: Inputs) -> Callable[[DDIMState, Inputs], Any]:
    """`LOOPS` entry ``name`` compiled for these (global or single-device) arguments."""
    return jax.jit(LOOPS[name]).lower(state, inputs).compile(COMPILER_OPTIONS)


def output_arrays(name: str, output: Any) -> dict[str, jax.Array]:
    """A loop's output arrays by name: ``"<loop>.<i>"`` for the i-th leaf of its output pytree."""
    return {f"{name}.{i}": leaf for i, leaf in enumerate(jax.tree.leaves(output))}


def global_inputs() -> dict[str, np.ndarray]:
    """The whole batch as host arrays, the same in every process (seeded numpy: no JAX compute)."""
    rng = np.random.default_rng(0)
    uncond = np.zeros((BATCH, LATENT[0]), np.float32)
    cond = rng.standard_normal((BATCH, LATENT[0]), np.float32)
    return {
        "x": rng.standard_normal((BATCH, *LATENT), np.float32),
        "keys": rng.integers(0, 2**32, (BATCH, 2), np.uint32),
        "cond": cond,
        "pairs": np.stack([uncond, cond], axis=1).reshape(2 * BATCH, LATENT[0]),
        "key": rng.integers(0, 2**32, (2,), np.uint32),
        "w": np.float32(0.8),
        "steps": np.int32(STEPS - 1),
    }


def local_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The rows of a batch-sharded global array of ``shape`` that this process's devices hold."""
    rows = [index[0] for index in sharding.addressable_devices_indices_map(shape).values()]
    return slice(min(r.start for r in rows), max(r.stop for r in rows))


def batch_mesh(devices: list[jax.Device]) -> jax.sharding.Mesh:
    """The one-axis ``"data"`` mesh the loops run on (global devices in a worker)."""
    return jax.make_mesh((len(devices),), ("data",), devices=devices)


def assemble(mesh: jax.sharding.Mesh) -> Inputs:
    """Every global input, from this process's part of it: its rows, or all of a replicated value."""
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    arrays = {}
    for name, value in global_inputs().items():
        if name in REPLICATED:
            arrays[name] = jax.make_array_from_process_local_data(replicated, value)
        else:
            rows = value[local_rows(batch, value.shape)]
            arrays[name] = jax.make_array_from_process_local_data(batch, rows, value.shape)
    return Inputs(**arrays)


def engine_stream(mesh: jax.sharding.Mesh | None) -> list[np.ndarray]:
    """A guided `ddim_jax.Engine` (4 slots, sharded over ``mesh``) serving a fixed stream of
    mixed requests; the results in submission order. Every process calls it: process 0 submits
    (and decides admission), the others follow its broadcasts; only process 0 gets results."""
    engine = ddim_jax.Engine(
        lambda x, t, w, emb: model_fn(x, t[:, None, None], w, emb),  # t: one timestep per row
        DDIMConfig(clip_sample=False), slots=4, latent_shape=LATENT, max_steps=8,
        model_args=(np.float32(0.8),), cond_shape=(LATENT[0],), guided=True, guidance_layout="interleave",
        mesh=mesh,
    )  # fmt: skip
    if jax.process_index() != 0:
        engine.run_until_idle()
        return []
    rng = np.random.default_rng(1)
    handles = []
    for i in range(10):
        extra = {}
        if i % 3 == 2:
            extra = dict(init_latents=rng.standard_normal(LATENT, np.float32), strength=0.5)
        request = ddim_jax.Request(
            int(rng.integers(2, 9)), jax.random.key(i), eta=float(i % 2), guidance_scale=float(i),
            cond=rng.standard_normal(LATENT[0], np.float32), **extra,
        )  # fmt: skip
        handles.append(engine.submit(request))
    engine.cancel(handles[4])
    engine.run_until_idle()
    return [h.result() for h in handles if h.status == "done"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coordinator", required=True, help="127.0.0.1:port of process 0's coordinator")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--devices", type=int, default=2, help="CPU devices of this process")
    p.add_argument("--out", type=Path, required=True, help="folder for process 0's results.npz")
    p.add_argument(
        "--loops", nargs="+", choices=list(LOOPS), default=list(LOOPS), help="LOOPS entries to run"
    )
    p.add_argument("--rounds", type=int, default=1, help="times to run the loops; 0: until an error")
    p.add_argument("--engine", action="store_true", help="run engine_stream instead of the loops")
    p.add_argument("--heartbeat-timeout", type=int, default=100, help="seconds (JAX's default: 100)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    # JAX ends the processes that outlive a dead one with SIGABRT: no core dumps for that.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Before JAX initialises its backend: this process's CPU devices (also on a machine with
    # GPUs), and gloo for the cross-process collectives on CPU (the gather below needs them).
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=args.coordinator,  # JAX's default binds all interfaces, [::]
        initialization_timeout=60,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )
    if jax.device_count() != args.num_processes * args.devices:
        raise SystemExit(f"expected {args.num_processes} x {args.devices} devices, got {jax.devices()}")
    if args.engine:
        results = engine_stream(batch_mesh(jax.devices()))
        print(f"process {args.process_id}: engine done, {time.perf_counter() - start:.1f} s", flush=True)
        if args.process_id == 0:
            np.savez(args.out / "results.npz", engine=np.stack(results))
        jax.distributed.shutdown()
        return
    inputs = assemble(batch_mesh(jax.devices()))
    state = ddim_state()
    loops = {name: compile_loop(name, state, inputs) for name in args.loops}
    done = 0
    while args.rounds == 0 or done < args.rounds:
        results = {}
        for name, loop in loops.items():
            for key, out in output_arrays(name, loop(state, inputs)).items():
                if not out.sharding.is_equivalent_to(inputs.x.sharding, out.ndim):
                    raise SystemExit(f"{key}: output sharded as {out.sharding}, not like the batch")
                results[key] = multihost_utils.process_allgather(out, tiled=True)
        done += 1
        if done in (1, args.rounds):
            elapsed = time.perf_counter() - start
            print(f"process {args.process_id}: round {done} done, {elapsed:.1f} s", flush=True)
    if args.process_id == 0:
        np.savez(args.out / "results.npz", **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
