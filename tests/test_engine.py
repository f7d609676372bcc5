"""The serving engine: each request equals `sample` on it alone (eta = 0 and > 0, guided and not,
text- and image-to-image), one tick and one admission program over a long mixed stream, bad
requests refused at submit, traced-bad ones NaN in their slot only, cancel, no request lost."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax
from ddim_jax import DDIMConfig, Engine, EngineCore, Request, create_state, sample, set_timesteps

M = 12
SHAPE = (2, 3)  # one request's latents
COND = (3,)
CONFIG = DDIMConfig(timestep_spacing="trailing", clip_sample=False)
BASE = create_state(CONFIG)


def column(v, like):
    """``v`` (scalar or (B,)) shaped to broadcast against ``like`` (B, ...)."""
    v = jnp.broadcast_to(v, like.shape[:1])
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def model_fn(x, t, w):  # elementwise; t: scalar (sample) or one per row (engine)
    return jnp.tanh(w * x) + 1e-3 * column(t, x).astype(x.dtype)


def cond_model_fn(x, t, w, cond):
    return model_fn(x, t, w) + 0.3 * jnp.sin(cond)[:, None, :]


@functools.partial(jax.jit, static_argnames=("layout", "static_steps"))
def _reference(num_steps, start, x, key, eta, scale, cond, *, layout, static_steps):
    """`sample` on one request alone: a runtime-length state (one program for every request),
    or the static one (``static_steps``: S and the start step are then Python ints)."""
    if static_steps:
        state, start = set_timesteps(BASE, static_steps[0]), static_steps[1]
    else:
        state = set_timesteps(BASE, num_steps, max_steps=M)
    fn, args = (model_fn, (0.7,)) if cond is None else (cond_model_fn, (0.7, cond))
    kwargs = (
        {}
        if scale is None
        else dict(guidance_scale=scale[0], guidance_rescale=scale[1], guidance_layout=layout)
    )
    return sample(fn, state, x, key=key, eta=eta, model_args=args, start_step=start, **kwargs)[0]


def reference(req: Request, *, uncond=None, guided=False, layout="concat", static=False):
    """The request's x at its start step and eta-noise key as `Request` documents, then `sample`."""
    noise_key, step_key = jax.random.split(req.key)
    noise = jax.random.normal(noise_key, SHAPE)[None]
    state = set_timesteps(BASE, req.num_steps)
    if req.init_latents is not None:
        t = state.timesteps[req.start_step]
        x = ddim_jax.add_noise(state, jnp.asarray(req.init_latents)[None], noise, t)
    else:
        x = noise if req.latents is None else jnp.asarray(req.latents)[None]
    cond = None if req.cond is None else jnp.asarray(req.cond)[None]
    if guided:
        u = jnp.asarray(uncond if req.uncond is None else req.uncond)[None]
        cond = jnp.concatenate([u, cond]) if layout == "concat" else jnp.stack([u, cond], 1)[0]
    out = _reference(
        jnp.int32(req.num_steps), jnp.int32(req.start_step), x, step_key[None], jnp.float32(req.eta),
        (jnp.float32([req.guidance_scale]), jnp.float32([req.guidance_rescale])) if guided else None, cond,
        layout=layout,
        static_steps=(req.num_steps, req.start_step) if static else None,
    )  # fmt: skip
    return np.asarray(out)


def random_requests(n, seed, *, cond=False, guided=False, img2img=True):
    rng = np.random.default_rng(seed)
    requests = []
    for i in range(n):
        s = int(rng.integers(1, M + 1))
        kind = rng.integers(3) if img2img else rng.integers(2)
        extra = {}
        if kind == 1:
            extra["latents"] = rng.normal(size=SHAPE).astype(np.float32)
        elif kind == 2:
            extra["init_latents"] = rng.uniform(-1, 1, size=SHAPE).astype(np.float32)
            extra["strength"] = float(rng.choice([0.3, 0.6, 1.0]))
            s = max(s, 4)
        if cond:
            extra["cond"] = rng.normal(size=COND).astype(np.float32)
            if guided and rng.integers(2):
                extra["uncond"] = rng.normal(size=COND).astype(np.float32)
        if guided:
            extra["guidance_scale"] = float(rng.uniform(0, 8))
            extra["guidance_rescale"] = float(rng.choice([0.0, 0.7]))
        eta = float(rng.choice([0.0, 0.5, 1.0]))
        requests.append(Request(s, jax.random.key(1000 * seed + i), eta=eta, **extra))
    return requests


def run_stream(engine, requests, arrivals_per_step=2):
    """Submits ``arrivals_per_step`` requests before each step; every handle ends done once."""
    handles, pending, finished = [], list(requests), []
    while pending or not engine.idle:
        for _ in range(arrivals_per_step):
            if pending:
                handles.append(engine.submit(pending.pop(0)))
        finished += engine.step()
    assert sorted(h.id for h in finished) == sorted(h.id for h in handles)  # each once, none lost
    assert all(h.status == "done" for h in handles)
    return handles


UNCOND = np.linspace(-1, 1, 3).astype(np.float32)
CASES = {
    "unguided": dict(),
    "unguided, cond": dict(cond_shape=COND),
    "guided, concat": dict(cond_shape=COND, guided=True),
    "guided, interleave": dict(cond_shape=COND, guided=True, guidance_layout="interleave"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_request_equals_sample_alone(name):
    options = CASES[name]
    cond, guided = "cond_shape" in options, options.get("guided", False)
    fn = cond_model_fn if cond else model_fn
    uncond = UNCOND if guided else None
    engine = Engine(
        fn, CONFIG, slots=3, latent_shape=SHAPE, max_steps=M, steps_per_tick=2, model_args=(0.7,),
        uncond=uncond, **options,
    )  # fmt: skip
    requests = random_requests(10, seed=len(name), cond=cond, guided=guided)
    handles = run_stream(engine, requests)
    layout = options.get("guidance_layout", "concat")
    for i, h in enumerate(handles):
        expected = reference(h.request, guided=guided, uncond=uncond, layout=layout, static=i < 2)
        np.testing.assert_allclose(h.result(), expected, rtol=1e-5, atol=1e-5, err_msg=repr(h.request))
    assert engine.traces == {"admit": 1, "tick": 1}
    stats = engine.stats()
    assert stats["done"] == 10 and stats["queued"] == stats["busy_slots"] == 0
    assert stats["model_calls"] == 2 * stats["ticks"]
    assert stats["request_steps"] == sum(r.num_steps - r.start_step for r in requests)


def test_same_request_in_any_slot_and_company_is_the_same():
    """One request run in different slots beside different neighbours: the same result (bitwise
    for this elementwise model), and equal to the static `sample` and the runtime-length one."""
    target = Request(9, jax.random.key(7), eta=0.8)
    results = []
    for slot, seed in [(0, 1), (2, 2), (1, 3)]:
        engine = Engine(model_fn, CONFIG, slots=3, latent_shape=SHAPE, max_steps=M, model_args=(0.7,))
        others = random_requests(2, seed)
        queue = others[:slot] + [target] + others[slot:]
        handles = [engine.submit(r) for r in queue]
        engine.run_until_idle()
        assert handles[slot].slot == slot
        results.append(handles[slot].result())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    np.testing.assert_allclose(results[0], reference(target, static=True), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[0], reference(target), rtol=1e-6, atol=1e-6)


def test_one_tick_and_one_admission_program_over_a_long_stream():
    engine = Engine(model_fn, CONFIG, slots=8, latent_shape=SHAPE, max_steps=M, model_args=(0.7,))
    requests = random_requests(240, seed=5)
    handles = run_stream(engine, requests, arrivals_per_step=3)
    assert engine.traces == {"admit": 1, "tick": 1}
    engine.model_args = (0.9,)  # new parameter values: the same program
    h = engine.submit(requests[0])
    assert np.isfinite(engine.wait(h)).all() and engine.traces["tick"] == 1
    for h in handles[::40]:
        np.testing.assert_allclose(h.result(), reference(h.request), rtol=1e-5, atol=1e-5)
    stats = engine.stats()
    assert stats["done"] == 241 and stats["refused"] == stats["cancelled"] == 0
    # slots' utilisation: the steps the requests needed over the slot-steps run
    assert stats["request_steps"] / (8 * stats["model_calls"]) > 0.7


def test_demo_unet_takes_one_timestep_per_slot():
    """The demo UNet (a conv model) in a guided engine: each request equals `sample` alone."""
    from ddim_jax.demo.unet import UNet

    unet = UNet(channels=(8,), in_channels=1, out_channels=1, emb_dim=16, zero_init=False)
    shape, m = (8, 8, 1), 6  # M < 8: the runtime reference loop compiles the model once
    params = jax.jit(unet.init)(jax.random.key(0), jnp.zeros((1, *shape)), jnp.int32(0), jnp.zeros((1, 4)))

    def fn(x, t, params, cond):
        return 0.1 * unet.apply(params, x, t, cond)

    engine = Engine(
        fn, CONFIG, slots=2, latent_shape=shape, max_steps=m, model_args=(params,), cond_shape=(4,),
        guided=True,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    requests = [
        Request(s, jax.random.key(s), eta=e, guidance_scale=3.0, cond=rng.normal(size=4).astype(np.float32))
        for s, e in [(5, 0.0), (6, 1.0), (3, 0.5)]
    ]
    handles = [engine.submit(r) for r in requests]
    engine.run_until_idle()

    @jax.jit
    def expected(params, num_steps, key, eta, cond):
        noise_key, step_key = jax.random.split(key)
        x_T = jax.random.normal(noise_key, shape)[None]
        state = set_timesteps(BASE, num_steps, max_steps=m)
        cond = jnp.concatenate([jnp.zeros((1, 4)), cond[None]])
        args = (params, cond)
        out = sample(fn, state, x_T, key=step_key[None], eta=eta, model_args=args, guidance_scale=3.0)
        return out[0]

    for h, r in zip(handles, requests, strict=True):
        want = expected(params, r.num_steps, r.key, r.eta, r.cond)
        np.testing.assert_allclose(h.result(), want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


REFUSED = [
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=M + 1), ValueError, "num_steps"),
    (dict(num_steps=3.0), ValueError, "num_steps"),
    (dict(key=jax.random.split(jax.random.key(0), 2)), TypeError, "key"),
    (dict(key=3), TypeError, "key"),
    (dict(eta=1.5), ValueError, "eta"),
    (dict(eta=float("nan")), ValueError, "eta"),
    (dict(guidance_scale=None), ValueError, "guidance_scale"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale"),
    (dict(cond=None), ValueError, "cond"),
    (dict(cond=np.zeros(4, np.float32)), ValueError, "cond"),
    (dict(uncond=np.zeros((1, 3), np.float32)), ValueError, "uncond"),
    (dict(latents=np.zeros((3, 2), np.float32)), ValueError, "latents"),
    (dict(latents=np.zeros(SHAPE, np.int32)), TypeError, "latents"),
    (dict(latents=np.full(SHAPE, np.nan, np.float32)), ValueError, "latents"),
    (dict(init_latents=np.zeros(SHAPE, np.float32)), ValueError, "strength"),
    (dict(init_latents=np.zeros(SHAPE, np.float32), strength=0.0), ValueError, "strength"),
    (dict(init_latents=np.zeros(SHAPE, np.float32), strength=1.5), ValueError, "strength"),
    (dict(init_latents=np.zeros(SHAPE, np.float32), strength=0.05), ValueError, "strength"),
    (
        dict(init_latents=np.zeros(SHAPE, np.float32), strength=0.5, latents=np.zeros(SHAPE)),
        ValueError,
        "latents",
    ),
]


def test_invalid_requests_are_refused_naming_the_field_and_change_nothing():
    engine = Engine(
        cond_model_fn, CONFIG, slots=2, latent_shape=SHAPE, max_steps=M, model_args=(0.7,), cond_shape=COND,
        guided=True,
    )  # fmt: skip
    good = dict(num_steps=5, key=jax.random.key(0), guidance_scale=2.0, cond=np.ones(COND, np.float32))
    queued = engine.submit(Request(**good))
    engine.step()
    running = engine.submit(Request(**good))  # queued behind... no: a free slot remains
    before = engine.stats()
    for change, error, field in REFUSED:
        with pytest.raises(error, match=field):
            engine.submit(Request(**{**good, **change}))
    with pytest.raises(TypeError, match="Request"):
        engine.submit(good)
    after = engine.stats()
    assert after["refused"] == before["refused"] + len(REFUSED) + 1
    assert {k: v for k, v in after.items() if k != "refused"} == {
        k: v for k, v in before.items() if k != "refused"
    }
    engine.run_until_idle()
    np.testing.assert_array_equal(queued.result(), running.result())  # same request, same result
    unguided = Engine(model_fn, CONFIG, slots=1, latent_shape=SHAPE, max_steps=M, model_args=(0.7,))
    for change, field in [(dict(guidance_scale=1.0), "guidance_scale"), (dict(cond=np.ones(3)), "cond")]:
        with pytest.raises(ValueError, match=field):
            unguided.submit(Request(5, jax.random.key(0), **change))


def test_engine_options_are_checked():
    kwargs = dict(slots=2, latent_shape=SHAPE, max_steps=M)
    for change, error, field in [
        (dict(slots=0), ValueError, "slots"),
        (dict(max_steps=1001), ValueError, "max_steps"),
        (dict(steps_per_tick=0), ValueError, "steps_per_tick"),
        (dict(latent_shape=(2, 0)), ValueError, "latent_shape"),
        (dict(guidance_layout="stack"), ValueError, "guidance_layout"),
        (dict(model_args=[1.0]), TypeError, "model_args"),
        (dict(model_dtype=jnp.int32), TypeError, "model_dtype"),
        (dict(uncond=np.zeros(3)), ValueError, "uncond"),
    ]:
        with pytest.raises(error, match=field):
            Engine(model_fn, CONFIG, **{**kwargs, **change})
    with pytest.raises(TypeError, match="config_or_state"):
        Engine(model_fn, "ddim", **kwargs)


def test_traced_bad_values_give_nan_in_their_slot_only():
    """Through the functional core (the host refuses these): a bad S, start step or eta, or
    NaN latents, make that slot NaN; the other slots are bitwise what they are beside a good one."""
    core = EngineCore(model_fn, BASE, slots=3, latent_shape=SHAPE, max_steps=M, steps_per_tick=3)
    admit, tick = jax.jit(core.admit), jax.jit(core.tick)
    neighbours = [
        core.request(7, jax.random.key(1), eta=0.5),
        core.request(M, jax.random.key(2), start_step=3),
    ]
    good = core.request(5, jax.random.key(3), eta=0.3)

    def run(middle):
        state = core.init()
        for slot, r in zip([0, 1, 2], [neighbours[0], middle, neighbours[1]], strict=True):
            state = admit(state, slot, r)
        finished = np.zeros(3, bool)
        results = np.zeros((3, *SHAPE), np.float32)
        while not finished.all():
            state, done = tick(state, jnp.asarray(finished), (0.7,))
            done = np.asarray(done) & ~finished
            results[done] = np.asarray(state.x)[done]
            finished |= done
        return results

    clean = run(good)
    assert np.isfinite(clean).all()
    bad = [
        good._replace(num_steps=jnp.int32(0)),
        good._replace(num_steps=jnp.int32(M + 1)),
        good._replace(start_step=jnp.int32(5)),
        good._replace(start_step=jnp.int32(-1)),
        good._replace(eta=jnp.float32(1.5)),
        good._replace(eta=jnp.float32(jnp.nan)),
        good._replace(latents=jnp.full(SHAPE, jnp.nan), draw_latents=jnp.bool_(False)),
    ]
    for r in bad:
        out = run(r)
        assert np.isnan(out[1]).all(), r
        np.testing.assert_array_equal(out[[0, 2]], clean[[0, 2]])


def test_cancel_frees_the_slot_and_nothing_leaks():
    engine = Engine(model_fn, CONFIG, slots=1, latent_shape=SHAPE, max_steps=M, model_args=(0.7,))
    first = engine.submit(Request(M, jax.random.key(0), eta=1.0))
    queued = engine.submit(Request(4, jax.random.key(1)))
    nxt = engine.submit(Request(6, jax.random.key(2), eta=0.5))
    engine.step()
    assert first.status == "running" and engine.cancel(queued) and queued.status == "cancelled"
    engine.step()
    assert engine.cancel(first) and first.status == "cancelled" and not engine.cancel(first)
    assert engine.stats()["busy_slots"] == 0
    with pytest.raises(RuntimeError, match="cancelled"):
        first.result()
    with pytest.raises(RuntimeError, match="running|queued"):
        nxt.result()
    result = engine.wait(nxt)  # admitted into the cancelled request's slot
    np.testing.assert_allclose(result, reference(nxt.request), rtol=1e-6, atol=1e-6)
    engine.step()  # nothing running: no tick
    stats = engine.stats()
    assert (stats["done"], stats["cancelled"], stats["busy_slots"]) == (1, 2, 0) and engine.idle
    # a freed slot is zeroed at the next tick (idle slots stay finite: zeros)
    h = engine.submit(Request(2, jax.random.key(3)))
    engine.step()
    engine.cancel(h)
    engine.submit(Request(3, jax.random.key(4)))
    engine.step()
    assert np.isfinite(np.asarray(engine.state.x)).all()


COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py forces 8 CPU)")
@pytest.mark.parametrize("layout", ["concat", "interleave"])
def test_sharded_engine_equals_one_device_and_its_tick_moves_no_data(layout):
    mesh = jax.make_mesh((8,), ("data",))
    requests = random_requests(12, seed=9, cond=True, guided=True)
    results = []
    for options in [{}, dict(mesh=mesh)]:
        engine = Engine(
            cond_model_fn, CONFIG, slots=8, latent_shape=SHAPE, max_steps=M, model_args=(0.7,),
            cond_shape=COND, guided=True, guidance_layout=layout, uncond=UNCOND, **options,
        )  # fmt: skip
        results.append(np.stack([h.result() for h in run_stream(engine, requests, 4)]))
    assert engine.traces == {"admit": 1, "tick": 1}
    assert engine.state.x.sharding.spec[0] == "data"
    np.testing.assert_array_equal(results[0], results[1])
    release = jax.device_put(
        np.zeros(8, bool), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )
    text = engine._tick.lower(engine.state, release, (0.7,)).compile().as_text()
    assert not [name for name in COLLECTIVES if name in text]
    with pytest.raises(ValueError, match="slots"):
        Engine(model_fn, CONFIG, slots=4, latent_shape=SHAPE, max_steps=M, mesh=mesh)


def test_legacy_keys_and_a_bfloat16_model():
    """A legacy uint32 key is the typed key's data (same result); ``model_dtype`` casts the
    model's input as `sample`'s does, the carry staying float32."""
    request = Request(4, jax.random.key(3), eta=0.5)
    engine = Engine(
        model_fn,
        CONFIG,
        slots=2,
        latent_shape=SHAPE,
        max_steps=M,
        model_args=(0.7,),
        model_dtype=jnp.bfloat16,
    )
    typed, legacy = (
        engine.submit(request),
        engine.submit(dataclasses.replace(request, key=jax.random.PRNGKey(3))),
    )
    engine.run_until_idle()
    np.testing.assert_array_equal(typed.result(), legacy.result())
    assert typed.result().dtype == np.float32
    noise_key, step_key = jax.random.split(request.key)
    x_T = jax.random.normal(noise_key, SHAPE)[None]
    state = set_timesteps(BASE, 4)
    expected = sample(
        model_fn, state, x_T, key=step_key[None], eta=0.5, model_args=(0.7,), model_dtype=jnp.bfloat16
    )[0]
    np.testing.assert_allclose(typed.result(), expected, rtol=1e-5, atol=1e-5)


def test_a_nan_slot_leaves_the_others_bitwise_unchanged_with_the_demo_unet():
    """GroupNorm and convolutions work per row: NaN latents in one slot (through the core) do not
    reach the others, which stay bitwise what they are beside a finite request."""
    from ddim_jax.demo.unet import UNet

    unet = UNet(channels=(8,), in_channels=1, out_channels=1, emb_dim=16, zero_init=False)
    shape = (8, 8, 1)
    params = jax.jit(unet.init)(jax.random.key(0), jnp.zeros((1, *shape)), jnp.int32(0))
    core = EngineCore(
        lambda x, t, p: 0.1 * unet.apply(p, x, t), BASE, slots=3, latent_shape=shape, max_steps=6
    )
    admit, tick = jax.jit(core.admit), jax.jit(core.tick)

    def run(middle):
        state = core.init()
        requests = [core.request(6, jax.random.key(1), eta=0.5), middle, core.request(4, jax.random.key(2))]
        for slot, r in enumerate(requests):
            state = admit(state, slot, r)
        for _ in range(6):
            state, done = tick(state, jnp.zeros(3, bool), (params,))
        assert np.asarray(done).all()
        return np.asarray(state.x)

    good = core.request(5, jax.random.key(3))
    clean = run(good)
    poisoned = run(good._replace(latents=jnp.full(shape, jnp.nan), draw_latents=jnp.bool_(False)))
    assert np.isfinite(clean).all() and np.isnan(poisoned[1]).all()
    np.testing.assert_array_equal(poisoned[[0, 2]], clean[[0, 2]])
