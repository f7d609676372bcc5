"""An SD-1.5-config UNet end to end (diffusers' ``FlaxUNet2DConditionModel``, random weights, CFG):
``ddim_jax.sample`` against the old Flax pipeline loop and against diffusers' torch UNet +
``DDIMScheduler``; the sampler's share outside the model; the runtime-step-count program against
the static one; ``parallel_sample``'s cost per round.

On a GPU the SD-1.5 config (860M parameters, 64x64x4 latents, 77x768 text, bf16 compute, batch 1
and 8, S = 25 and 50; torch in fp16). On a CPU (or with ``--reduced``) diffusers' tiny test UNet
at 16x16x4 latents, batch 1 and 8, S = 25 (and 50 for the runtime program), torch in fp32.
Needs diffusers with its Flax classes (0.35.x, the ``reference`` extra) and flax; torch for the
torch contender.

Usage: ``python benchmarks/sd_unet.py [--reduced] [--quick] [--repeats N]``
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import _bench as B
import jax
import jax.numpy as jnp
import numpy as np

import ddim_jax

GUIDANCE = 7.5
_spec = importlib.util.spec_from_file_location(
    "stable_diffusion", Path(__file__).resolve().parents[1] / "examples" / "stable_diffusion.py"
)
sd = importlib.util.module_from_spec(_spec)  # the SD-1.5 / tiny configs and the fast random init
_spec.loader.exec_module(sd)
SD_KWARGS = sd.SD15_SCHEDULER_KWARGS


def setting(reduced: bool, quick: bool) -> dict:
    if reduced or quick:
        return dict(
            name="diffusers' tiny test UNet (reduced)",
            unet=sd.TINY_UNET,
            latent=8,
            text=(16, sd.TINY_UNET["cross_attention_dim"]),
            cases=[(1, 25)] if quick else [(1, 25), (8, 25)],
            runtime_steps=(25,),
            max_steps=50,
            parallel_steps=25,
            windows=(4,) if quick else (4, 8, 16),
        )
    return dict(
        name="SD-1.5 config (860M)",
        unet=sd.SD15_UNET,
        latent=64,
        text=(77, 768),
        cases=[(1, 25), (1, 50), (8, 25), (8, 50)],
        runtime_steps=(25, 50),
        max_steps=50,
        parallel_steps=50,
        windows=(4, 8, 16),
    )


def flax_unet(config: dict):
    from diffusers import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(**config, dtype=jnp.bfloat16)
    return unet, sd.random_params(unet)


def old_scheduler():
    """diffusers' own FlaxDDIMScheduler (0.35 <= diffusers < 0.40), or None."""
    try:
        import diffusers
        from diffusers import FlaxDDIMScheduler
    except ImportError:
        return None
    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2])
    return FlaxDDIMScheduler(**SD_KWARGS) if (0, 35) <= version < (0, 40) else None


def old_pipeline_loop(scheduler, unet, steps: int):
    """``FlaxStableDiffusionPipeline._generate``'s loop: fori_loop over ``scheduler.step``."""

    def run(params, scheduler_state, latents, context):
        def body(i, carry):
            latents, s = carry
            t = jnp.array(s.timesteps, dtype=jnp.int32)[i]
            x = jnp.concatenate([latents] * 2)
            out = unet.apply({"params": params}, x, jnp.broadcast_to(t, x.shape[:1]), context).sample
            uncond, text = jnp.split(out, 2)
            eps = uncond + GUIDANCE * (text - uncond)
            return scheduler.step(s, eps, t, latents).to_tuple()

        s = scheduler.set_timesteps(scheduler_state, steps, latents.shape)
        return jax.lax.fori_loop(0, steps, body, (latents, s))[0]

    return run


def model_alone(unet, params, timesteps, latents, context):
    """The same UNet calls (doubled batch) scanned alone: the floor of any sampler."""

    def body(x, t):
        out = unet.apply(
            {"params": params}, jnp.concatenate([x, x]), jnp.broadcast_to(t, (2 * x.shape[0],)), context
        )
        return out.sample[: x.shape[0]].astype(jnp.float32), None

    return jax.lax.scan(body, latents, timesteps)[0]


def with_sample(unet, params, state, latents, context):
    return ddim_jax.sample(
        sd.make_model_fn(unet), state, latents, model_args=(params, context), guidance_scale=GUIDANCE,
        model_dtype=jnp.bfloat16,
    )  # fmt: skip


def torch_runner(config: dict, batch: int, steps: int, text: tuple[int, int], latent_size: int):
    """diffusers' torch UNet2DConditionModel + DDIMScheduler in a pipeline-style loop, or None."""
    device = B.torch_device()
    if device is None:
        return None
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    scheduler = DDIMScheduler(**SD_KWARGS)
    size = latent_size
    latents0 = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
    context = torch.randn(2 * batch, *text, device=device, dtype=dtype)

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps)
        latents = latents0
        for t in scheduler.timesteps:
            out = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            uncond, cond = out.chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, latents).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()
        return latents

    return run, dtype


def run(quick: bool = False, repeats: int | None = None, reduced: bool | None = None) -> str:
    t_start = time.perf_counter()
    reduced = (not B.on_gpu()) if reduced is None else reduced
    cfg = setting(reduced, quick)
    repeats = repeats or (2 if quick else (10 if B.on_gpu() else 3))
    unet, params = flax_unet(cfg["unet"])
    size = cfg["latent"]
    # On a shared CPU, CPU seconds of this process (all threads) are steadier than wall time.
    clock = time.perf_counter if B.on_gpu() else time.process_time
    old = old_scheduler()
    rows, notes = [], []
    share_rows = []
    static = {}  # (batch, steps) -> compiled ddim_jax.sample program, reused below
    for batch, steps in cfg["cases"]:
        if B.out_of_time():
            notes.append(f"skipped B={batch}, S={steps} (time budget)")
            continue
        state = B.state_for(steps, **SD_KWARGS)
        latents = jax.random.normal(jax.random.key(0), (batch, 4, size, size))
        context = jax.random.normal(jax.random.key(1), (2 * batch, *cfg["text"]), jnp.float32)
        contenders, compile_s = {}, {}
        jobs = [
            ("ddim_jax.sample", functools.partial(with_sample, unet), (params, state, latents, context)),
            (
                "UNet calls alone",
                functools.partial(model_alone, unet),
                (params, state.timesteps, latents, context),
            ),
        ]
        if old is not None:
            loop = old_pipeline_loop(old, unet, steps)
            jobs.append(
                (
                    "old pipeline loop (diffusers FlaxDDIMScheduler)",
                    loop,
                    (params, old.create_state(), latents, context),
                )
            )
        for label, fn, args in jobs:
            compiled, lo, co = B.compile_jit(fn, *args)
            if label == "ddim_jax.sample":
                static[batch, steps] = compiled
            compile_s[label] = lo + co
            contenders[label] = functools.partial(lambda c, a: B.block(c(*a)), compiled, args)
        torch_run = torch_runner(cfg["unet"], batch, steps, cfg["text"], size)
        if torch_run is not None:
            contenders[f"diffusers torch UNet + DDIMScheduler ({str(torch_run[1]).split('.')[-1]})"] = (
                torch_run[0]
            )
            compile_s[list(contenders)[-1]] = float("nan")
        med = B.interleaved(contenders, repeats, warmup=1, clock=clock)
        ours = med["ddim_jax.sample"]
        torch_t = [t for label, t in med.items() if label.startswith("diffusers torch")]
        if torch_t and batch == 1:
            B.record("sd_unet", f"torch / sample, B=1, S={steps}", torch_t[0] / ours)
        alone = med["UNet calls alone"]
        share_rows.append(
            [f"B={batch}, S={steps}", ours * 1e3, alone * 1e3, f"{(ours - alone) / ours * 100:.2f}%"]
        )
        B.record("sd_unet", f"B={batch}, S={steps}: outside the model", (ours - alone) / ours)
        for label, t in med.items():
            rows.append([f"B={batch}, S={steps}", label, t, t / steps * 1e3, t / batch, f"{t / ours:.2f}x",
                         "-" if np.isnan(compile_s[label]) else f"{compile_s[label]:.1f}"])  # fmt: skip

    # runtime step count (one program, set_timesteps(..., max_steps=M)) against the static program
    runtime_rows = []
    m = cfg["max_steps"]
    base = ddim_jax.create_state(sd.SD15_SCHEDULER)
    latents = jax.random.normal(jax.random.key(0), (1, 4, size, size))
    context = jax.random.normal(jax.random.key(1), (2, *cfg["text"]), jnp.float32)

    def runtime_fn(params, steps, latents, context):
        state = ddim_jax.set_timesteps(base, steps, max_steps=m)
        return with_sample(unet, params, state, latents, context)

    runtime_c, lo, co = B.compile_jit(runtime_fn, params, jnp.int32(m), latents, context)
    runtime_compile = lo + co
    for steps in cfg["runtime_steps"]:
        if B.out_of_time():
            notes.append(f"skipped runtime S={steps} (time budget)")
            continue
        state = B.state_for(steps, **SD_KWARGS)
        if (1, steps) not in static:
            static[1, steps] = B.compile_jit(
                functools.partial(with_sample, unet), params, state, latents, context
            )[0]
        static_c = static[1, steps]
        med = B.interleaved(
            {
                "static": lambda c=static_c, s=state: B.block(c(params, s, latents, context)),
                "runtime": lambda s=steps: B.block(runtime_c(params, jnp.int32(s), latents, context)),
            },
            repeats,
            clock=clock,
        )
        B.record("sd_unet", f"runtime / static, S={steps}", med["runtime"] / med["static"])
        ratio = med["runtime"] / med["static"]
        runtime_rows.append([f"S={steps} (M={m})", med["static"] / steps * 1e3, med["runtime"] / steps * 1e3,
                             f"{ratio:.3f}", f"{runtime_compile:.1f}"])  # fmt: skip

    # parallel_sample: cost per round (tolerance 0, a fixed number of rounds) against one step
    parallel_rows = []
    steps, rounds = cfg["parallel_steps"], 4
    state = B.state_for(steps, **SD_KWARGS)
    if (1, steps) not in static:
        static[1, steps] = B.compile_jit(
            functools.partial(with_sample, unet), params, state, latents, context
        )[0]
    step_c = static[1, steps]
    one_step = (
        B.interleaved({"s": lambda: B.block(step_c(params, state, latents, context))}, repeats, clock=clock)[
            "s"
        ]
        / steps
    )
    for window in cfg["windows"]:
        if B.out_of_time():
            notes.append(f"skipped parallel window {window} (time budget)")
            continue

        def par(params, state, latents, context, window=window):
            return ddim_jax.parallel_sample(
                sd.make_model_fn(unet), state, latents, window=window, tolerance=0.0, max_iterations=rounds,
                model_args=(params, context), guidance_scale=GUIDANCE, model_dtype=jnp.bfloat16,
            ).sample  # fmt: skip

        par_c, _, _ = B.compile_jit(par, params, state, latents, context)
        t = B.interleaved(
            {"p": lambda c=par_c: B.block(c(params, state, latents, context))}, repeats, clock=clock
        )["p"]
        per_round = t / rounds
        B.record("sd_unet", f"parallel round / step, window {window}", per_round / one_step)
        parallel_rows.append([window, per_round * 1e3, one_step * 1e3, f"{per_round / one_step:.1f}x"])

    where = "GPU, wall time" if B.on_gpu() else "CPU, CPU seconds of the process (all threads)"
    text = (
        f"### SD-class UNet end to end: {cfg['name']}, latents 4x{size}x{size}, text {cfg['text'][0]}x"
        f"{cfg['text'][1]}, CFG {GUIDANCE}, bf16 compute ({where}, median of {repeats} interleaved "
        "repeats)\n\n"
        + B.table(["case", "contender", "s", "ms/step", "s/image", "vs sample", "compile s"], rows)
        + "\n\nThe sampler's share outside the model: (sample - the same UNet calls scanned alone) "
        "/ sample.\n\n"
        + B.table(["case", "sample ms", "UNet alone ms", "outside the model"], share_rows)
        + "\n\nRuntime step count (one program for every S <= M) against a static program per S, batch 1:\n\n"
        + B.table(
            [
                "S",
                "static ms/step",
                "runtime ms/step",
                "runtime / static",
                "runtime compile s",
            ],
            runtime_rows,
        )  # fmt: skip
        + f"\n\n`parallel_sample`, batch 1, S = {steps}, {rounds} rounds forced (tolerance 0): "
        "cost per round\n\n"
        + B.table(["window", "ms/round", "ms/step of sample", "round / step"], parallel_rows)
        + f"\n\n_Whole benchmark: {time.perf_counter() - t_start:.0f} s._\n"
        + (f"\n{'; '.join(notes)}\n" if notes else "")
    )
    return text


def main() -> None:
    p = B.parser(__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="the tiny UNet (the default on a CPU)")
    args = p.parse_args()
    print(run(args.quick, args.repeats, True if args.reduced else None))


if __name__ == "__main__":
    main()
