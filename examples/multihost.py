"""Sample across hosts: one process per host (or per GPU), joined by ``jax.distributed``.

Every process runs this same script (JAX's multi-controller model). Each one calls
``jax.distributed.initialize``, builds the global mesh over all processes' devices, builds
its own rows of the global batch (starting noise, class labels, one eta key per example) and
assembles the global arrays with ``jax.make_array_from_process_local_data``. ``ddim_jax.sample``
then runs unchanged under ``jax.jit``: guided (``guidance_layout="interleave"``, so each
example's [uncond, cond] pair stays on its device), eta > 0 with per-example keys. The
result is gathered to every process and summarised by process 0; ``--check`` has process 0
recompute the whole batch on one device and compare.

Launch:
  python examples/multihost.py --local 2        # 2 processes on this machine, 2 CPU devices each
  python examples/multihost.py --local 4 --local-devices 1 --batch 32
  # a TPU slice (jax.distributed finds the hosts), one process per host:
  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \\
      --command="cd ddim_jax && python3 examples/multihost.py"
  # a GPU cluster with Slurm (found automatically), one process per GPU:
  srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 python3 examples/multihost.py
  # anywhere else, on each host i of N:
  python3 examples/multihost.py --coordinator HOST0:1234 --num-processes N --process-id i

When a process dies, JAX's coordination service ends the others after about
``--heartbeat-timeout`` seconds at most (tests/test_multiprocess.py measures it).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local", type=int, default=0, metavar="N", help="launch N processes on this machine")
    p.add_argument("--local-devices", type=int, default=2, help="CPU devices per process with --local")
    p.add_argument("--coordinator", help="HOST:PORT of process 0 (default: found by jax.distributed)")
    p.add_argument(
        "--num-processes", type=int, help="number of processes (default: found by jax.distributed)"
    )
    p.add_argument("--process-id", type=int, help="this process's index (default: found by jax.distributed)")
    p.add_argument("--cpu-devices", type=int, help=argparse.SUPPRESS)  # set by --local for its children
    p.add_argument(
        "--heartbeat-timeout", type=int, default=100, help="seconds before a silent process counts as dead"
    )
    p.add_argument(
        "--timeout", type=float, default=600, help="--local: seconds before the processes are killed"
    )
    p.add_argument(
        "--batch", type=int, default=16, help="global batch (divisible by the global device count)"
    )
    p.add_argument("--size", type=int, default=16, help="latent height and width")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--features", type=int, default=32, help="conv width of the model")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.5, help="DDIM eta")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="classifier-free guidance weight")
    p.add_argument("--check", action="store_true", help="process 0 recomputes the batch on one device")
    args = p.parse_args(argv)
    if args.local < 0 or args.local_devices < 1:
        p.error(f"--local must be >= 0 and --local-devices >= 1, got {args.local} and {args.local_devices}")
    return args


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs ``args.local`` copies of this script on 127.0.0.1 (CPU devices, gloo collectives).

    Returns the first non-zero exit code, or 0. If one process fails, the others are killed
    at once rather than left to JAX's heartbeat; all are killed after ``--timeout`` seconds."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The children get this command line, without --local (the last --local wins), plus where they stand.
    common = [*argv, "--local", "0", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.local)]
    common += ["--cpu-devices", str(args.local_devices)]
    procs = []
    try:
        for i in range(args.local):
            command = [sys.executable, os.path.abspath(__file__), *common, "--process-id", str(i)]
            procs.append(subprocess.Popen(command))
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                return failed[0] if failed else 0
            time.sleep(0.1)
        print(f"timed out after {args.timeout} s", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()


args = parse_args(sys.argv[1:])
if args.local:  # the launcher needs no JAX: start the processes and wait for them
    sys.exit(launch_local(args, sys.argv[1:]))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ddim_jax  # noqa: E402

NUM_CLASSES = 10  # class labels 1..10; label 0 is the unconditional ("null") class


class ConditionalDenoiser(nn.Module):
    """A small class-conditional conv net predicting epsilon from (x_t, t, label); untrained."""

    features: int
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        half = self.features // 2
        angles = t.astype(jnp.float32) * jnp.exp(-jnp.arange(half) * (np.log(1000.0) / half))
        temb = nn.Dense(self.features)(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)]))
        cemb = nn.Dense(self.features)(jax.nn.one_hot(labels, NUM_CLASSES + 1))[:, None, None, :]
        h = nn.silu(nn.Conv(self.features, (3, 3))(x) + temb + cemb)
        h = nn.silu(nn.Conv(self.features, (3, 3))(h) + h)
        return nn.Conv(self.channels, (3, 3))(h)


def batch_rows(args: argparse.Namespace, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows ``rows`` of the global batch: every row comes from its own keys, so any process
    (or one process, for ``--check``) builds the same rows."""
    noise_keys = jax.random.split(jax.random.key(0), args.batch)[rows]
    eta_keys = jax.random.split(jax.random.key(1), args.batch)[rows]
    shape = (args.size, args.size, args.channels)
    return {
        "x_T": np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(noise_keys)),
        "labels": 1 + rows % NUM_CLASSES,
        "eta_keys": np.asarray(jax.random.key_data(eta_keys)),  # uint32; typed keys again inside jit
    }


def initialize(args: argparse.Namespace) -> None:
    if args.cpu_devices:  # a --local child: CPU devices, gloo for cross-process CPU collectives
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    loopback = args.coordinator is not None and args.coordinator.rsplit(":", 1)[0] in (
        "127.0.0.1",
        "localhost",
    )
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=args.coordinator if loopback else None,  # else JAX's default: all interfaces
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )


def main() -> int:
    initialize(args)
    me, devices = jax.process_index(), jax.devices()
    if args.batch % len(devices):
        raise SystemExit(f"--batch {args.batch} must be divisible by the global device count {len(devices)}")

    def say(*text: str) -> None:
        if me == 0:
            print(*text, flush=True)

    say(f"{jax.process_count()} processes, {len(devices)} {devices[0].platform} devices in all")

    mesh = jax.make_mesh((len(devices),), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    # This process's rows of the global batch: the rows its own devices hold.
    indices = batch.addressable_devices_indices_map((args.batch,)).values()
    rows = np.unique(np.concatenate([np.arange(args.batch)[i] for i in indices]))
    local = batch_rows(args, rows)
    x_T, labels, eta_keys = (
        jax.make_array_from_process_local_data(batch, local[name], (args.batch, *local[name].shape[1:]))
        for name in ("x_T", "labels", "eta_keys")
    )

    net = ConditionalDenoiser(args.features, args.channels)
    example = (jnp.zeros((1, args.size, args.size, args.channels)), jnp.int32(0), jnp.zeros((1,), jnp.int32))
    # Every process runs the same init program; the parameters come out replicated on all devices.
    params = jax.jit(lambda: net.init(jax.random.key(2), *example), out_shardings=replicated)()
    state = ddim_jax.set_timesteps(ddim_jax.create_state(ddim_jax.DDIMConfig()), args.steps)

    def model_fn(x, t, params, labels):
        return net.apply(params, x, t, labels)

    @jax.jit
    def generate(params, x_T, labels, eta_keys, eta, scale):
        # The doubled batch's labels, interleaved per example: [null, label_0, null, label_1, ...].
        pairs = jnp.stack([jnp.zeros_like(labels), labels], axis=1).reshape(-1)
        keys = jax.random.wrap_key_data(eta_keys)
        return ddim_jax.sample(
            model_fn,
            state,
            x_T,
            key=keys,
            eta=eta,
            model_args=(params, pairs),
            guidance_scale=scale,
            guidance_layout="interleave",
        )

    inputs = (params, x_T, labels, eta_keys, args.eta, args.guidance_scale)
    start = time.perf_counter()
    compiled = generate.lower(*inputs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = compiled(*inputs).block_until_ready()
    run_s = time.perf_counter() - start
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    samples = multihost_utils.process_allgather(out, tiled=True)  # the whole batch, on every process
    say(
        f"batch {samples.shape}, {args.steps} steps, eta {args.eta}, guidance {args.guidance_scale}: "
        f"compile {compile_s:.2f} s, sample {run_s:.3f} s; mean {samples.mean():.4f}, std {samples.std():.4f}"
    )
    if args.check and me == 0:
        # The same rows, built and sampled by this process alone on one device.
        whole = batch_rows(args, np.arange(args.batch))
        one = jax.local_devices()[0]
        local_params = jax.tree.map(lambda p: p.addressable_data(0), params)  # replicated: any copy
        single = jax.device_put((whole["x_T"], whole["labels"], whole["eta_keys"]), one)
        reference = np.asarray(generate(local_params, *single, args.eta, args.guidance_scale))
        diff = float(np.max(np.abs(samples - reference)))
        print(f"check: one device, one process gives max |diff| {diff:.2e}")
        if diff > 1e-5:
            return 1
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
