"""Sample one batch with a small Flax (linen) conv model on 1 device and on N devices, and compare.

The batch is split over a one-axis mesh with ``NamedSharding(mesh, P("data"))``; the model
parameters are replicated with ``NamedSharding(mesh, P())``. `ddim_jax.sample` itself is
unchanged: jit and the input shardings do the rest. With eta > 0 the result does not depend on
the number of devices: with ``--keys one`` the noise is drawn for the global batch from one
key; with ``--keys per-example`` each example draws from its own key
(``jax.random.split(key, batch)``, sharded like the batch), which also holds inside
``shard_map`` / ``pmap``.

On a CPU-only machine the N devices are simulated (``JAX_NUM_CPU_DEVICES``, set here before
JAX starts); they share the machine's cores, so N devices are not faster there.

Usage:
  python examples/sharded_sampling.py                      # 1 vs 8 devices, ~15 s on 2 CPU cores
  python examples/sharded_sampling.py --batch 256 --size 32 --steps 50 --devices 1 2 4 8
  python examples/sharded_sampling.py --keys per-example
"""

from __future__ import annotations

import argparse
import os
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[1, 8], help="device counts to compare")
    p.add_argument("--batch", type=int, default=64, help="global batch (divisible by each device count)")
    p.add_argument("--size", type=int, default=32, help="latent height and width")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--features", type=int, default=32, help="conv width of the model")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.5, help="DDIM eta (> 0 draws noise)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per device count (best is shown)")
    p.add_argument(
        "--keys", choices=["one", "per-example"], default="one", help="one key, or one per example"
    )
    args = p.parse_args()
    for n in args.devices:
        if n < 1 or args.batch % n:
            p.error(f"--batch {args.batch} must be divisible by every --devices entry, got {n}")
    return args


args = parse_args()
# Simulated CPU devices must be requested before JAX initializes its backends; this has no
# effect on GPU or TPU devices.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(max(args.devices)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ddim_jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))


class ConvDenoiser(nn.Module):
    """A small conv net predicting epsilon from (x_t, t): enough compute to time, untrained."""

    features: int
    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        freqs = jnp.exp(-jnp.arange(self.features // 2) * (np.log(1000.0) / (self.features // 2)))
        angles = t.astype(jnp.float32) * freqs
        temb = nn.Dense(self.features)(jnp.concatenate([jnp.sin(angles), jnp.cos(angles)]))
        h = nn.silu(nn.Conv(self.features, (3, 3))(x) + temb)
        h = nn.silu(nn.Conv(self.features, (3, 3))(h) + h)
        return nn.Conv(self.channels, (3, 3))(h)


def main() -> None:
    available = jax.devices()
    if max(args.devices) > len(available):
        raise SystemExit(f"asked for {max(args.devices)} devices, {len(available)} available")
    print(
        f"backend: {jax.default_backend()}, {len(available)} devices ({available[0].device_kind}), "
        f"host CPU cores: {os.cpu_count()}"
    )

    net = ConvDenoiser(args.features, args.channels)
    shape = (args.batch, args.size, args.size, args.channels)
    x_T = jax.random.normal(jax.random.key(0), shape)
    params = net.init(jax.random.key(1), x_T[:1], jnp.int32(0))
    state = ddim_jax.set_timesteps(ddim_jax.create_state(ddim_jax.DDIMConfig()), args.steps)

    def run(params, x_T, key, eta):
        model_fn = lambda x, t, p: net.apply(p, x, t)  # noqa: E731
        return ddim_jax.sample(model_fn, state, x_T, key=key, eta=eta, model_args=(params,))

    run = jax.jit(run)
    key = jax.random.key(2)
    if args.keys == "per-example":
        key = jax.random.split(key, args.batch)
    results = {}
    print(f"batch {shape}, {args.steps} steps, eta {args.eta}, keys: {args.keys}, {args.features} features")
    print(f"{'devices':>7} {'compile s':>10} {'run s':>8} {'samples/s':>10} {'max |diff| vs first':>20}")
    for n in args.devices:
        mesh = jax.make_mesh((n,), ("data",), devices=available[:n])
        batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        p_n, x_n = jax.device_put(params, replicated), jax.device_put(x_T, batch)
        key_n = jax.device_put(key, batch if args.keys == "per-example" else replicated)

        t0 = time.perf_counter()
        compiled = run.lower(p_n, x_n, key_n, args.eta).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = compiled(p_n, x_n, key_n, args.eta).block_until_ready()
            times.append(time.perf_counter() - t0)
        assert out.sharding.is_equivalent_to(batch, out.ndim), out.sharding
        results[n] = np.asarray(out)
        diff = float(np.max(np.abs(results[n] - results[args.devices[0]])))
        best = min(times)
        print(f"{n:>7} {compile_s:>10.2f} {best:>8.3f} {args.batch / best:>10.1f} {diff:>20.2e}")

    first = results[args.devices[0]]
    for n, r in results.items():
        if not np.allclose(r, first, rtol=0, atol=1e-4):
            raise SystemExit(
                f"{n} devices disagree with {args.devices[0]}: max diff {np.max(np.abs(r - first))}"
            )
    print(f"results agree across {args.devices} devices (atol 1e-4)")


if __name__ == "__main__":
    main()
