"""End to end with the demo's Flax UNet (`ddim_jax.demo.unet.UNet`): `ddim_jax.sample` against
the same number of model calls alone in a ``lax.scan``, i.e. the share of time spent outside
the model, plus the fused floor with the same model.

Usage: ``python benchmarks/unet_e2e.py [--quick] [--repeats N]``
"""

from __future__ import annotations

import functools

import _bench as B
import jax

import ddim_jax

# (name, NHWC latent shape, UNet channels, steps)
QUICK = [("digits", (16, 8, 8, 1), (16, 32), 10)]
CPU = [
    ("digits", (64, 8, 8, 1), (32, 64), 20),
    ("digits", (256, 8, 8, 1), (32, 64), 20),
    ("latent 4x32x32", (1, 32, 32, 4), (32, 64), 20),
]
GPU = [
    ("digits", (256, 8, 8, 1), (32, 64), 50),
    ("latent 4x64x64", (8, 64, 64, 4), (64, 128), 50),
]


def make_model(shape, channels):
    from ddim_jax.demo.unet import UNet

    model = UNet(channels=channels, in_channels=shape[-1], out_channels=shape[-1])

    @jax.jit
    def init(x):
        params = model.init(jax.random.key(0), x, jax.numpy.array(999))
        # the last conv is zero-initialised: perturb every weight so the output is not trivially 0
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [
            p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(tree, leaves)

    return model, init(B.latents(shape))


def model_only(model, params, timesteps, x):
    def body(x, t):
        return model.apply(params, x, t), None

    return jax.lax.scan(body, x, timesteps)[0]


def with_sample(model, params, state, x):
    return ddim_jax.sample(lambda x, t, p: model.apply(p, x, t), state, x, model_args=(params,))


def with_floor(model, params, coef, timesteps, x):
    return B.floor_sample(coef, x, timesteps, model=lambda x, t: model.apply(params, x, t))


def run(quick: bool = False, repeats: int | None = None) -> str:
    repeats = repeats or (3 if quick else (10 if B.on_gpu() else 3))
    configs = QUICK if quick else (GPU if B.on_gpu() else CPU)
    rows, skipped = [], []
    for name, shape, channels, steps in configs:
        if B.out_of_time():
            skipped.append(f"{name}, B={shape[0]}")
            continue
        model, params = make_model(shape, channels)
        state = B.state_for(steps)
        x = B.latents(shape)
        coef = B.floor_coefficients(state)
        runs, compile_s = {}, {}
        for label, fn, args in [
            ("model calls alone", functools.partial(model_only, model), (params, state.timesteps, x)),
            ("ddim_jax.sample", functools.partial(with_sample, model), (params, state, x)),
            ("floor + model", functools.partial(with_floor, model), (params, coef, state.timesteps, x)),
        ]:
            compiled, lo, co = B.compile_jit(fn, *args)
            compile_s[label] = lo + co
            runs[label] = functools.partial(lambda c, a: B.block(c(*a)), compiled, args)
        med = B.interleaved(runs, repeats)
        alone = med["model calls alone"]
        B.record("unet", f"{name}, B={shape[0]}", (med["ddim_jax.sample"] - alone) / med["ddim_jax.sample"])
        for label, t in med.items():
            rows.append(
                [
                    f"{name}, B={shape[0]}, ch={channels}",
                    label,
                    t / steps * 1e3,
                    t / shape[0] * 1e3,
                    f"{(t - alone) / t * 100:.1f}%" if label != "model calls alone" else "-",
                    f"{compile_s[label]:.1f}",
                ]
            )
    header = [
        "model / latents",
        "contender",
        "ms/step",
        "ms/image (all steps)",
        "outside the model",
        "compile s",
    ]
    return (
        f"### End to end with the demo UNet (float32, median of {repeats} interleaved repeats)\n\n"
        + B.table(header, rows)
        + "\n\n`outside the model` = (time - model-only time) / time: the scheduler's share, "
        "with the same number of UNet calls scanned alone.\n"
        + (f"\nSkipped (time budget spent): {'; '.join(skipped)}\n" if skipped else "")
    )


def main() -> None:
    args = B.parser(__doc__.splitlines()[0]).parse_args()
    print(run(args.quick, args.repeats))


if __name__ == "__main__":
    main()
