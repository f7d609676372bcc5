"""What a trained model for the brightness claim would cost here: one training step of the demo's
class-conditional UNet (value_and_grad + adam, batch 64) at the shipped 8x8 digits size against an
MNIST-size 32x32 one, measured side by side in one process (the 8x8 model first and last).

Usage: ``python benchmarks/demo_train_cost.py [--steps N]``
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from ddim_jax.demo.train import TrainSettings, make_model

CASES = [((16, 32), 8), ((32, 64, 64), 32), ((16, 32), 8)]


def step_seconds(channels: tuple[int, ...], size: int, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per training step, after one warm-up (compile) step."""
    model = make_model(TrainSettings(channels=channels))
    x = jnp.zeros((64, size, size, 1))
    t, y = jnp.zeros(64, jnp.int32), jnp.zeros(64, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x[:1], jnp.int32(0), None, y[:1])
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s, x):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((model.apply(q, x, t, labels=y) - x) ** 2))(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    p, s, loss = step(params, opt.init(params), x)
    jax.block_until_ready(loss)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        p, s, loss = step(p, s, x)
    jax.block_until_ready(loss)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per case")
    args = parser.parse_args()
    print("| UNet channels | image | wall ms / step | CPU ms / step |\n|---|---|---|---|")
    for channels, size in CASES:
        wall, cpu = step_seconds(channels, size, args.steps)
        print(f"| {channels} | {size}x{size}x1 | {1000 * wall:.0f} | {1000 * cpu:.0f} |")


if __name__ == "__main__":
    main()
