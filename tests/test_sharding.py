"""Batch-sharded sampling: jit + NamedSharding, shard_map and pmap on 8 CPU devices (see conftest.py).

Checks that `sample` and `invert` need no changes to run sharded: results equal the unsharded
ones, outputs keep the batch sharding, the compiled loops move no data between devices (guidance
under jit excepted, see `test_jit_guided_keeps_sharding`), and eta noise depends on the key and
the global batch only, not on how the batch is split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ddim_jax import DDIMConfig, create_state, invert, sample, set_timesteps

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (conftest.py forces 8 CPU)")

N = 8  # devices
B = 16  # global batch: 2 examples per device
LATENT = (4, 6)
COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


def collectives(compiled) -> set[str]:
    """The cross-device collectives in a compiled program's HLO."""
    text = compiled.as_text()
    return {name for name in COLLECTIVES if name in text}


def model_fn(x, t, w, emb):
    """Per-example stand-in model: param ``w`` (shared) and conditioning ``emb`` (one row per example)."""
    return jnp.tanh(w * x + 0.3 * emb[:, :, None]) + 1e-3 * t.astype(x.dtype)


def make_state(steps=4, **config):
    return set_timesteps(create_state(DDIMConfig(**config)), steps)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N,), ("data",))


def data(seed=0, batch=B):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (batch, *LATENT))
    uncond = jnp.zeros((batch, LATENT[0]))
    cond = jax.random.normal(k2, (batch, LATENT[0]))
    return x, uncond, cond, jax.random.uniform(k3, (), minval=0.5, maxval=1.5)


# name -> (config, loop kwargs); "invert" runs `invert`, the rest `sample`.
CASES = {
    "sample": ({"prediction_type": "v_prediction"}, {}),
    "sample_threshold_eta": ({"thresholding": True, "sample_max_value": 1.5}, {"eta": 0.5}),
    "invert": ({"clip_sample": False}, {}),
}


def doubled_conditioning(uncond, cond, layout):
    """Conditioning rows of the doubled batch in ``layout``: diffusers' concat([uncond, cond]),
    or the interleaved [uncond_0, cond_0, uncond_1, ...]."""
    if layout == "concat":
        return jnp.concatenate([uncond, cond])
    return jnp.stack([uncond, cond], axis=1).reshape(2 * uncond.shape[0], *uncond.shape[1:])


@functools.cache
def loop_fn(case, guided=False, guidance_rescale=0.0, layout="concat"):
    """``f(x, key, w, uncond, cond)`` running the case's loop on whatever batch it is given.

    Cached, like `jitted`, so tests share compiled programs."""
    config, kwargs = CASES[case]
    state = make_state(**config)

    def f(x, key, w, uncond, cond):
        extra = {}
        if guided:
            extra = {"guidance_scale": 3.0, "guidance_rescale": guidance_rescale, "guidance_layout": layout}
        emb = doubled_conditioning(uncond, cond, layout) if guided else cond
        if case == "invert":
            return invert(model_fn, state, x, model_args=(w, emb), **extra)
        key_kw = {"key": key} if kwargs.get("eta", 0) > 0 else {}
        return sample(model_fn, state, x, model_args=(w, emb), **kwargs, **key_kw, **extra)

    return f


@functools.cache
def jitted(case, guided=False, guidance_rescale=0.0, layout="concat"):
    return jax.jit(loop_fn(case, guided, guidance_rescale, layout))


def put(mesh, x, key, w, uncond, cond):
    """The batch sharded over ``data``; key and parameter replicated (JAX's own API)."""
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.device_put((x, key, w, uncond, cond), (batch, rep, rep, batch, batch))


def run_collective_free_keeping_sharding(f, args):
    """Compiles ``f`` for the sharded ``args``, asserts its HLO has no collectives, runs it and
    asserts the output is sharded like the batch (``args[0]``)."""
    compiled = f.lower(*args).compile()
    assert collectives(compiled) == set()
    out = compiled(*args)
    assert out.sharding.is_equivalent_to(args[0].sharding, out.ndim)
    return out


@pytest.mark.parametrize("case", ["sample_threshold_eta", "invert"])
def test_jit_batch_sharded_is_collective_free_and_exact(mesh, case):
    x, uncond, cond, w = data()
    key = jax.random.key(1)
    f = jitted(case)
    ref = f(x, key, w, uncond, cond)  # one device
    args = put(mesh, x, key, w, uncond, cond)
    out = run_collective_free_keeping_sharding(f, args)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_jit_guided_keeps_sharding(mesh):
    """Guidance under jit gives the same result, sharded like the input. Not collective-free:
    diffusers' [uncond, cond] layout puts the two halves of the doubled batch on different
    devices, so GSPMD moves latents between devices every step (a collective-permute, or an
    all-gather of the latent batch, depending on shapes). guidance_layout="interleave" and
    `shard_map` avoid it (next tests)."""
    x, uncond, cond, w = data()
    key = jax.random.key(1)
    f = jitted("sample_threshold_eta", guided=True, guidance_rescale=0.7)
    ref = f(x, key, w, uncond, cond)
    args = put(mesh, x, key, w, uncond, cond)
    out = f(*args)
    assert out.sharding.is_equivalent_to(args[0].sharding, out.ndim)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["sample_threshold_eta", "invert"])
def test_jit_guided_interleaved_is_collective_free_and_exact(mesh, case):
    """guidance_layout="interleave" keeps each example's [uncond, cond] pair on its device, so
    the guided loop under plain jit moves no data, and equals diffusers' concat layout."""
    x, uncond, cond, w = data()
    key = jax.random.key(1)
    ref = jitted(case, True, 0.7, "concat")(x, key, w, uncond, cond)  # one device, concat layout
    f = jitted(case, True, 0.7, "interleave")
    args = put(mesh, x, key, w, uncond, cond)
    out = run_collective_free_keeping_sharding(f, args)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("case", "guided"), [("invert", False), ("invert", True), ("sample_threshold_eta", True)]
)
def test_shard_map_is_collective_free(mesh, case, guided):
    """Inside shard_map each device runs the loop on its slice; with guidance each device builds
    its own [uncond, cond] conditioning, so the loop needs no communication at all."""
    x, uncond, cond, w = data()
    key = jax.random.key(1)
    f = loop_fn(case, guided=guided, guidance_rescale=0.7 if guided else 0.0)
    ref = jitted(case, guided, 0.7 if guided else 0.0)(x, key, w, uncond, cond)
    spec = (P("data"), P(), P(), P("data"), P("data"))
    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=P("data")))
    args = put(mesh, x, key, w, uncond, cond)
    out = run_collective_free_keeping_sharding(g, args)
    if CASES[case][1].get("eta", 0) == 0:
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    else:  # with eta > 0 each device draws its own noise from the same key (see per-device keys)
        rows = slice(5 * (B // N), 6 * (B // N))
        local = jitted(case, guided, 0.7)(x[rows], key, w, uncond[rows], cond[rows])
        np.testing.assert_allclose(np.asarray(out)[rows], local, rtol=0, atol=1e-5)


def test_pmap_guided():
    case = "sample"
    x, uncond, cond, w = data()
    key = jax.random.key(1)
    f = loop_fn(case, guided=True)
    ref = jitted(case, guided=True)(x, key, w, uncond, cond)
    per_device = lambda a: a.reshape(N, B // N, *a.shape[1:])  # noqa: E731
    p = jax.pmap(f, axis_name="data", in_axes=(0, None, None, 0, 0))
    args = (per_device(x), key, w, per_device(uncond), per_device(cond))
    compiled = p.lower(*args).compile()
    out = compiled(*args)
    assert len(out.sharding.device_set) == N
    assert {s.data.shape for s in out.addressable_shards} == {(1, B // N, *LATENT)}
    assert collectives(compiled) == set()
    np.testing.assert_allclose(out.reshape(ref.shape), ref, rtol=0, atol=1e-5)


# --- randomness -------------------------------------------------------------------------------


def eta_sampler(steps=3):
    state = make_state(steps)
    return jax.jit(lambda x, key: sample(lambda x, t: 0.5 * jnp.tanh(x), state, x, key=key, eta=1.0))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_eta_noise_does_not_depend_on_sharding(mesh, impl):
    """One key, one global batch: the same samples on 1 device and split over 8 (noise is drawn
    for the global batch under jit), for every key implementation JAX documents as "identical
    across shardings". Only threefry (with jax_threefry_partitionable, the default) lets each
    device generate just its own slice of the noise; with rbg keys every device generates
    the bits of the whole batch."""
    assert jax.config.jax_threefry_partitionable
    batch, latent = 64, (3, 5)
    x = jax.random.normal(jax.random.key(0), (batch, *latent))
    key = jax.random.key(7, impl=impl)
    f = eta_sampler()
    one = f(x, key)
    x8 = jax.device_put(x, NamedSharding(mesh, P("data")))
    compiled = f.lower(x8, key).compile()
    eight = compiled(x8, key)
    np.testing.assert_allclose(eight, one, rtol=0, atol=1e-6)
    assert collectives(compiled) == set()
    global_bits = f"u32[{batch},{latent[0]},{latent[1]}]"  # the whole batch's random bits
    assert (global_bits in compiled.as_text()) == (impl != "threefry2x32")
    # A different key changes the samples: the noise really enters the result.
    assert float(jnp.max(jnp.abs(f(x, jax.random.key(8, impl=impl)) - one))) > 0.1


def test_shard_map_per_device_keys(mesh):
    """Under shard_map (or pmap) every device sees the same key: fold in the device index."""
    state = make_state(3)
    x = jax.device_put(jnp.zeros((B, *LATENT)), NamedSharding(mesh, P("data")))

    def run(fold):
        def local(x, key):
            if fold:
                key = jax.random.fold_in(key, jax.lax.axis_index("data"))
            return sample(lambda x, t: 0.5 * jnp.tanh(x), state, x, key=key, eta=1.0)

        g = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data")))
        return np.asarray(g(x, jax.random.key(3))).reshape(N, B // N, *LATENT)

    same, distinct = run(fold=False), run(fold=True)
    for d in range(1, N):
        np.testing.assert_array_equal(same[d], same[0])  # the pitfall: identical noise everywhere
        assert np.max(np.abs(distinct[d] - distinct[0])) > 0.1
    # pmap: the same recipe.
    p = jax.pmap(
        lambda x, key: sample(
            lambda x, t: 0.5 * jnp.tanh(x),
            state,
            x,
            key=jax.random.fold_in(key, jax.lax.axis_index("data")),
            eta=1.0,
        ),
        axis_name="data",
        in_axes=(0, None),
    )
    out = np.asarray(p(jnp.zeros((N, B // N, *LATENT)), jax.random.key(3)))
    np.testing.assert_array_equal(out, distinct)


def test_per_example_keys_make_samples_independent_of_device_count():
    """One key per example (``jax.random.split(key, batch)``, sharded with the batch): shard_map
    on 2, 4 or 8 devices and pmap give the samples one device gives, with no index folding;
    under jit the program has no collectives."""
    state = make_state(3)
    x = jax.random.normal(jax.random.key(0), (B, *LATENT))
    keys = jax.random.split(jax.random.key(3), B)

    def fn(x, keys):
        return sample(lambda x, t: 0.5 * jnp.tanh(x), state, x, key=keys, eta=1.0)

    one = np.asarray(jax.jit(fn)(x, keys))
    for n in (2, 4, N):
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        args = jax.device_put((x, keys), NamedSharding(mesh, P("data")))
        g = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))
        np.testing.assert_allclose(g(*args), one, rtol=0, atol=1e-6)
    out = run_collective_free_keeping_sharding(jax.jit(fn), args)
    np.testing.assert_allclose(out, one, rtol=0, atol=1e-6)
    p = jax.pmap(fn)(x.reshape(N, B // N, *LATENT), keys.reshape(N, B // N))
    np.testing.assert_allclose(np.asarray(p).reshape(one.shape), one, rtol=0, atol=1e-6)


# --- parameters, conditioning, multi-host -------------------------------------------------------


def test_flax_params_replicated_no_recompile(mesh):
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, t, emb):
            h = nn.Conv(8, (3,))(x) + nn.Dense(8)(emb)[:, None, :]
            return nn.Conv(x.shape[-1], (3,))(nn.silu(h)) * (1 + 1e-3 * t)

    net = Net()
    x, _, cond, _ = data()
    x = x.transpose(0, 2, 1)  # (batch, length, channels)
    params = jax.jit(net.init)(jax.random.key(0), x, jnp.int32(0), cond)
    state = make_state(3)

    traces = []

    def run(params, x, cond, key, eta):
        traces.append(None)
        return sample(
            lambda x, t, p, c: net.apply(p, x, t, c), state, x, key=key, eta=eta, model_args=(params, cond)
        )

    f = jax.jit(run)
    ref = f(params, x, cond, jax.random.key(1), 0.3)
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sharded = (jax.device_put(params, rep), jax.device_put(x, batch), jax.device_put(cond, batch))
    out = f(*sharded, jax.random.key(1), 0.3)
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # New values (params, batch, key, eta) reuse the sharded program: no new trace, no recompile.
    n_traces = len(traces)
    params2 = jax.tree.map(lambda p: 1.1 * p, sharded[0])
    f(params2, jax.device_put(x + 1, batch), sharded[2], jax.random.key(2), 0.6).block_until_ready()
    assert len(traces) == n_traces


def test_model_sharded_params_2d_mesh():
    """Large models: shard parameters over a "model" axis and the batch over "data", with JAX's API."""
    # Auto axes let GSPMD choose the matmul's output sharding (Explicit axes, jax.make_mesh's
    # default, would ask the model for out_sharding).
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    x, _, cond, _ = data()
    k1, k2 = jax.random.split(jax.random.key(4))
    params = {
        "w1": jax.random.normal(k1, (LATENT[1], 32)) / 3,
        "w2": jax.random.normal(k2, (32, LATENT[1])) / 6,
    }

    def mlp(x, t, p, emb):
        return jnp.tanh(x @ p["w1"] + emb[:, :, None]) @ p["w2"] + 1e-3 * t

    state = make_state(3)
    f = jax.jit(lambda p, x, c: sample(mlp, state, x, model_args=(p, c)))
    ref = f(params, x, cond)
    p_sh = {"w1": NamedSharding(mesh, P(None, "model")), "w2": NamedSharding(mesh, P("model", None))}
    batch = NamedSharding(mesh, P("data"))
    out = f(jax.device_put(params, p_sh), jax.device_put(x, batch), jax.device_put(cond, batch))
    assert out.sharding.is_equivalent_to(batch, out.ndim)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)


def test_process_local_batch_assembly(mesh):
    """Multi-host recipe on one process: each process passes its local rows to
    jax.make_array_from_process_local_data (here one process holds the whole batch)."""
    assert jax.process_count() == 1
    x, uncond, cond, w = data()
    batch = NamedSharding(mesh, P("data"))
    per_process = B // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    global_x = jax.make_array_from_process_local_data(batch, np.asarray(x)[rows])
    global_cond = jax.make_array_from_process_local_data(batch, np.asarray(cond)[rows], (B, LATENT[0]))
    assert global_x.shape == x.shape and global_x.sharding == batch
    key = jax.random.key(1)
    f = jitted("sample_threshold_eta")  # the programs test_jit_batch_sharded... compiled
    out = f(global_x, key, w, uncond, global_cond)
    np.testing.assert_allclose(out, f(x, key, w, uncond, cond), rtol=0, atol=1e-6)
    assert out.sharding.is_equivalent_to(batch, out.ndim)
