"""Serve a stream of requests with different step counts, strengths, guidance and seeds from
one compiled program per kind of request; each image in a request's batch carries its own
guidance scale.

``generate(params, cond, latents, key, num_steps, start_step, guidance_scale, eta)`` is jitted
once: the number of steps is a runtime value (``set_timesteps(state, num_steps,
max_steps=MAX_STEPS)``, padded tables of static length), and so are the image-to-image start
step, the guidance scales (one per image: shape ``(batch,)``), eta and the key. A request with
S steps and start step k costs S - k model calls. ``edit(params, source_cond, target_cond,
image, num_steps, start_step, guidance_scale)`` is the editing request, jitted once too: EDICT
inverts the image under its own conditioning up to the start step, exactly, then samples it
back under the new one (4 (S - k) model calls). The model is the demo's small
class-conditional UNet with random weights (a stand-in for a real denoiser), on 8x8
single-channel latents.

With ``--engine``, the generate requests go through ``ddim_jax.Engine`` instead (continuous
batching: each image is a request in one of ``--slots`` slots, every tick one model call over
all of them, each at its own timestep; see docs/engine.md).

Usage:
  python examples/serving.py                         # 20 requests, ~15 s on 2 CPU cores, most of it compiling
  python examples/serving.py --engine --slots 4      # the generate requests through ddim_jax.Engine
  python examples/serving.py --requests 50 --max-steps 250
  python examples/serving.py --export generate.bin   # also save the program (jax.export)
"""

from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax
from ddim_jax.demo.unet import UNet

MAX_STEPS = 100  # the static bound M: any request with 1 <= S <= M runs in the same program
LATENT_SHAPE = (8, 8, 1)  # NHWC
COND_DIM = 16
TRACES = collections.Counter()  # traces (compilations) per program: the body runs only when jax traces


def make_model(seed: int = 0) -> tuple[UNet, Any]:
    """The demo UNet, conditioned on a (batch, COND_DIM) embedding, with random weights."""
    model = UNet(channels=(16, 32), in_channels=1, out_channels=1, emb_dim=32, zero_init=False)
    x = jnp.zeros((1, *LATENT_SHAPE))
    params = jax.jit(model.init)(jax.random.key(seed), x, jnp.int32(0), jnp.zeros((1, COND_DIM)))
    return model, params


def make_generate(model: UNet, config: ddim_jax.DDIMConfig, max_steps: int = MAX_STEPS):
    """The jitted serving function; every argument is traced, so it compiles once."""
    base = ddim_jax.create_state(config)

    def model_fn(x, t, params, cond):  # x is the doubled [uncond; cond] batch
        return model.apply(params, x, t, cond)

    @jax.jit
    def generate(params, cond, latents, key, num_steps, start_step, guidance_scale, eta):
        """``latents``: x_T noise when ``start_step == 0``, else the image to edit (x0),
        noised here to the start step's level (image-to-image / SDEdit)."""
        TRACES["generate"] += 1
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        noise_key, sample_key = jax.random.split(key)
        t_start = state.timesteps[jnp.clip(start_step, 0, max_steps - 1)]
        noised = ddim_jax.add_noise(state, latents, jax.random.normal(noise_key, latents.shape), t_start)
        x = jnp.where(start_step > 0, noised, latents)
        uncond = jnp.zeros_like(cond)
        return ddim_jax.sample(
            model_fn,
            state,
            x,
            key=sample_key,
            eta=eta,
            model_args=(params, jnp.concatenate([uncond, cond])),
            guidance_scale=guidance_scale,
            start_step=start_step,
        )

    return generate


def make_edit(model: UNet, config: ddim_jax.DDIMConfig, max_steps: int = MAX_STEPS):
    """The jitted editing function (EDICT inversion, then sampling under new conditioning); every
    argument is traced, so it compiles once. ``config`` needs ``clip_sample=False``."""
    base = ddim_jax.create_state(config)

    def model_fn(x, t, params, cond):
        return model.apply(params, x, t, cond)

    @jax.jit
    def edit(params, source_cond, target_cond, image, num_steps, start_step, guidance_scale):
        """``image`` (x0) encoded to the start step's noise level under ``source_cond``, then
        denoised under ``target_cond`` with classifier-free guidance."""
        TRACES["edit"] += 1
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=max_steps)
        latents = ddim_jax.edict_invert(
            model_fn, state, image, model_args=(params, source_cond), start_step=start_step
        )
        return ddim_jax.edict_sample(
            model_fn,
            state,
            latents,
            model_args=(params, jnp.concatenate([jnp.zeros_like(target_cond), target_cond])),
            guidance_scale=guidance_scale,
            start_step=start_step,
        )

    return edit


def random_requests(n: int, batch: int, seed: int, max_steps: int) -> list[dict[str, Any]]:
    """Requests with steps in [5, max_steps], strengths, a guidance scale per image, etas and
    seeds; every third one an edit (with a source conditioning)."""
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        steps = int(rng.integers(5, max_steps + 1))
        strength = 1.0 if i % 2 == 0 else float(rng.uniform(0.3, 0.9))  # every other one edits
        start = steps - int(steps * strength)  # diffusers' strength -> start step
        requests.append(
            dict(
                kind="edit" if i % 3 == 2 else "generate",
                source=rng.normal(size=(batch, COND_DIM)).astype(np.float32),
                steps=steps,
                start=start,
                strength=strength,
                guidance=rng.uniform(1.0, 9.0, size=batch).astype(np.float32),  # one per image
                eta=float(rng.choice([0.0, 0.5, 1.0])),
                seed=int(rng.integers(2**31)),
                cond=rng.normal(size=(batch, COND_DIM)).astype(np.float32),
                image=rng.uniform(-1, 1, size=(batch, *LATENT_SHAPE)).astype(np.float32),
            )
        )
    return requests


def serve(
    generate, params, requests: list[dict[str, Any]], *, edit=None, verbose: bool = True
) -> list[np.ndarray]:
    """Runs the requests one after another (edits with ``edit``); prints each one's latency."""
    outputs = []
    for i, r in enumerate(requests):
        key = jax.random.key(r["seed"])
        latents = r["image"] if r["start"] > 0 else np.asarray(jax.random.normal(key, r["image"].shape))
        steps, start_step, guidance = np.int32(r["steps"]), np.int32(r["start"]), np.float32(r["guidance"])
        start = time.perf_counter()
        if r["kind"] == "edit":
            out = edit(params, r["source"], r["cond"], r["image"], steps, start_step, guidance)
            calls, what = 4 * (r["steps"] - r["start"]), "edit (EDICT)"
        else:
            out = generate(params, r["cond"], latents, key, steps, start_step, guidance, np.float32(r["eta"]))
            calls, what = r["steps"] - r["start"], f"generate eta={r['eta']:.1f}"
        out = np.asarray(jax.block_until_ready(out))
        ms = 1e3 * (time.perf_counter() - start)
        outputs.append(out)
        if verbose:
            print(
                f"request {i:2d}: steps={r['steps']:3d} strength={r['strength']:.2f} "
                f"(model calls {calls:3d}) guidance={np.round(r['guidance'], 1).tolist()} "
                f"{what}: {ms:7.1f} ms"
            )
    return outputs


def make_engine(model: UNet, params: Any, config: ddim_jax.DDIMConfig, max_steps: int, slots: int):
    """A guided `ddim_jax.Engine` over the UNet: one request per image, conditioning per request."""

    def model_fn(x, t, params, cond):  # t: one timestep per row of the doubled batch
        return model.apply(params, x, t, cond)

    return ddim_jax.Engine(
        model_fn, config, slots=slots, latent_shape=LATENT_SHAPE, max_steps=max_steps,
        model_args=(params,), cond_shape=(COND_DIM,), guided=True,
    )  # fmt: skip


def serve_with_engine(engine, requests: list[dict[str, Any]], verbose: bool = True) -> list[np.ndarray]:
    """Submits every image of the generate requests at once and runs the engine until idle;
    returns each image's result (request order) and prints the latency and slot use."""
    handles = []
    for r in requests:
        if r["kind"] != "generate":
            continue
        for b in range(len(r["guidance"])):
            extra = {}
            if r["start"] > 0:
                extra = dict(init_latents=r["image"][b], strength=r["strength"])
            request = ddim_jax.Request(
                r["steps"], jax.random.fold_in(jax.random.key(r["seed"]), b), eta=r["eta"],
                guidance_scale=float(r["guidance"][b]), cond=r["cond"][b], **extra,
            )  # fmt: skip
            handles.append(engine.submit(request))
    start, finished_at = time.perf_counter(), {}
    while not engine.idle:
        for h in engine.step():
            finished_at[h.id] = time.perf_counter() - start
    stats = engine.stats()
    if verbose:
        latencies = np.asarray([finished_at[h.id] for h in handles])
        used = stats["request_steps"] / (stats["model_calls"] * stats["slots"])
        print(
            f"engine: {len(handles)} images in {time.perf_counter() - start:.2f} s, latency p50 "
            f"{np.percentile(latencies, 50):.2f} s, max {latencies.max():.2f} s; {stats['ticks']} ticks, "
            f"slot-steps used {used:.0%}; compiled programs: {engine.traces}"
        )
    return [h.result() for h in handles]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--batch", type=int, default=2, help="images per request")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="the static bound M on steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", metavar="FILE", help="serialize the program with jax.export to FILE")
    p.add_argument("--engine", action="store_true", help="serve the generate requests with ddim_jax.Engine")
    p.add_argument("--slots", type=int, default=4, help="the engine's slots (with --engine)")
    args = p.parse_args(argv)
    if not 5 <= args.max_steps <= 1000:
        p.error(f"--max-steps must be in [5, 1000], got {args.max_steps}")
    model, params = make_model(args.seed)
    config = ddim_jax.DDIMConfig(timestep_spacing="trailing", clip_sample=False)
    generate = make_generate(model, config, args.max_steps)
    edit = make_edit(model, config, args.max_steps)
    requests = random_requests(args.requests, args.batch, args.seed, args.max_steps)
    if args.engine:
        outputs = serve_with_engine(make_engine(model, params, config, args.max_steps, args.slots), requests)
        assert all(np.isfinite(o).all() for o in outputs)
        return 0
    start = time.perf_counter()
    outputs = serve(generate, params, requests, edit=edit)
    total = time.perf_counter() - start
    print(f"{len(requests)} requests in {total:.2f} s (the first of each kind includes compilation)")
    print(f"compiled programs: {dict(TRACES)}")
    assert all(np.isfinite(o).all() for o in outputs)
    if args.export:
        r = requests[0]
        example = (
            params,
            r["cond"],
            r["image"],
            jax.random.key(0),
            *(np.int32(1),) * 2,
            r["guidance"],
            np.float32(1),
        )
        with open(args.export, "wb") as f:
            f.write(export_generate(generate, example))
        print(f"exported to {args.export}")
    return 0


def export_generate(generate, example_args: tuple) -> bytes:
    """The compiled program's portable form (StableHLO, ``jax.export``): load it anywhere with
    ``jax.export.deserialize(data).call(*args)``; only the shapes of ``example_args`` matter."""
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), example_args)
    return jax.export.export(generate)(*specs).serialize()


if __name__ == "__main__":
    raise SystemExit(main())
