"""The cost per step of each guider against CFG's, and the guidance window's saving.

Two models: the elementwise stand-in (``0.1 * x``: the guider's own arithmetic is all the
work) and the demo's Flax UNet (the model dominates; the window calls it on the conditional
batch alone outside [0.2, 0.8) of the steps). Every contender is `ddim_jax.sample` with the
doubled batch, S = 25, timed round-robin in process CPU time (steadier than wall time on a
shared CPU; on a GPU, read the wall-clock suites).

Usage: ``python benchmarks/guidance_cost.py [--quick] [--repeats N] [--write]`` (``--write``
records the tables in benchmarks/RESULTS.md under this device's ``guidance_cost`` section).
"""

from __future__ import annotations

import functools
import os
import time

import _bench as B
import jax
import jax.numpy as jnp

import ddim_jax

STEPS = 25
WINDOW = (0.2, 0.8)

GUIDERS = {
    "cfg (guidance_scale=)": None,
    "cfg, rescale 0.7": lambda w: ddim_jax.cfg(w, 0.7),
    "cfg_zero_star": lambda w: ddim_jax.cfg_zero_star(w),
    "apg, momentum": lambda w: ddim_jax.apg(w, momentum=-0.5, norm_threshold=2.5, eta=0.0),
    "tangential_cfg": lambda w: ddim_jax.tangential_cfg(w),
    "cfg_pp": lambda w: ddim_jax.cfg_pp(w / 12.5),
    "scale_schedule": lambda w: ddim_jax.cfg(ddim_jax.scale_schedule(jnp.linspace(w, 1.0, STEPS))),
    "window [0.2, 0.8), conditional_args": lambda w: ddim_jax.guidance_window(
        ddim_jax.cfg(w), *WINDOW, conditional_args=(1,)
    ),
}


def guided_sample(model_fn, name, state, x, cond, params, w):
    """`sample` with the doubled batch ``[x, x]`` and conditioning ``[0, cond]``."""
    args = (params, jnp.concatenate([jnp.zeros_like(cond), cond]))
    factory = GUIDERS[name]
    if factory is None:
        return ddim_jax.sample(model_fn, state, x, model_args=args, guidance_scale=w)
    return ddim_jax.sample(model_fn, state, x, model_args=args, guider=factory(w))


def elementwise_model(x, t, params, cond):
    return params * x + cond.reshape((-1,) + (1,) * (x.ndim - 1))


def unet_model(shape, channels):
    from ddim_jax.demo.unet import UNet

    model = UNet(channels=channels, in_channels=shape[-1], out_channels=shape[-1], num_classes=0, emb_dim=32)
    x = B.latents(shape)
    params = jax.jit(model.init)(jax.random.key(0), x, jnp.int32(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    )

    def model_fn(x, t, params, cond):  # the conditioning shifts the output per example
        return model.apply(params, x, t) + cond.reshape((-1,) + (1,) * (x.ndim - 1))

    return model_fn, params


def measure(label, model_fn, params, shape, repeats):
    state = B.state_for(STEPS)
    x = B.latents(shape)
    cond = jnp.linspace(0.1, 0.5, shape[0])
    runs = {}
    for name in GUIDERS:
        fn = functools.partial(guided_sample, model_fn, name)
        compiled, _, _ = B.compile_jit(fn, state, x, cond, params, jnp.float32(5.0))
        args = (state, x, cond, params, jnp.float32(5.0))
        runs[name] = functools.partial(lambda c, a: B.block(c(*a)), compiled, args)
    med = B.interleaved(runs, repeats, clock=time.process_time)  # CPU seconds: steadier on a shared CPU
    base = med["cfg (guidance_scale=)"]
    return [[label, name, t / STEPS * 1e3, f"{t / base:.2f}"] for name, t in med.items()]


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or B.default_repeats(quick)
    rows = []
    shapes = [(4, 4, 32, 32)] if quick else [(8, 4, 64, 64)]
    for shape in shapes:
        rows += measure(
            f"model 0.1 x, {B.shape_str(shape)}", elementwise_model, jnp.float32(0.1), shape, repeats
        )
    unets = [((16, 8, 8, 1), (16, 32))] if quick else [((64, 8, 8, 1), (32, 64)), ((4, 32, 32, 4), (32, 64))]
    for shape, channels in unets:
        model_fn, params = unet_model(shape, channels)
        rows += measure(f"demo UNet {channels}, {B.shape_str(shape)}", model_fn, params, shape, repeats)
    share = (2 * (int(WINDOW[1] * STEPS) - int(WINDOW[0] * STEPS)) + STEPS - int(WINDOW[1] * STEPS)
             + int(WINDOW[0] * STEPS)) / (2 * STEPS)  # fmt: skip
    return (
        f"### Guidance methods: cost per step (S = {STEPS}, w = 5, doubled batch, process CPU time, "
        f"median of {repeats} interleaved repeats)\n\n"
        + B.table(["model / latents", "guider", "ms/step", "time / CFG's"], rows)
        + f"\n\nThe window guides {int(WINDOW[1] * STEPS) - int(WINDOW[0] * STEPS)} of {STEPS} steps and "
        f"calls the model on the conditional batch alone at the others: {share:.2f} of CFG's model work.\n"
    )


def main() -> None:
    p = B.parser(__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="record the tables in benchmarks/RESULTS.md")
    args = p.parse_args()
    body = f"## {B.device_label()}: guidance_cost\n\n{B.env_markdown()}\n\n{run(args.quick, args.repeats)}"
    print(body)
    if args.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        B.update_results(path, f"{B.device_label()} | guidance_cost", body)


if __name__ == "__main__":
    main()
