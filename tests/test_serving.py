"""Serving: the example's request stream compiles once per kind of request (generate, edit);
an edit is an exact round trip under its own conditioning; ahead-of-time lowering, jax.export
serialization and JAX's persistent compilation cache work with a runtime-length sampler."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 24


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location("serving", ROOT / "examples" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, params = module.make_model()
    config = ddim_jax.DDIMConfig(timestep_spacing="trailing", clip_sample=False)
    generate = module.make_generate(model, config, MAX_STEPS)
    edit = module.make_edit(model, config, MAX_STEPS)
    requests = module.random_requests(6, 1, seed=3, max_steps=MAX_STEPS)
    return module, generate, edit, params, requests


def request_args(params, request):
    key = jax.random.key(request["seed"])
    return (
        params,
        request["cond"],
        request["image"],
        key,
        np.int32(request["steps"]),
        np.int32(request["start"]),
        np.asarray(request["guidance"], np.float32),
        np.float32(request["eta"]),
    )


def test_a_stream_of_requests_compiles_once(serving, capsys):
    module, generate, edit, params, requests = serving
    assert len({(r["steps"], r["start"]) for r in requests}) == len(requests)
    assert [r["kind"] for r in requests].count("edit") == 2
    outputs = module.serve(generate, params, requests, edit=edit)
    assert all(o.shape == (1, 8, 8, 1) and np.isfinite(o).all() for o in outputs)
    assert module.TRACES == {"generate": 1, "edit": 1}
    assert capsys.readouterr().out.count("ms") == len(requests)


def test_an_edit_under_its_own_conditioning_gives_back_the_image(serving):
    """EDICT inversion is exact: source = target conditioning, guidance 1, any S and start step."""
    module, _, edit, params, requests = serving
    r = requests[2]
    for steps, start in [(r["steps"], r["start"]), (MAX_STEPS, 0)]:
        out = edit(params, r["cond"], r["cond"], r["image"], np.int32(steps), np.int32(start), np.float32(1))
        # float32 round-off that EDICT amplifies at few steps with this random-weight UNet (3e-3
        # at S = 8 without guidance); plain DDIM inversion misses by about 80 here
        np.testing.assert_allclose(out, r["image"], rtol=0, atol=1e-2)
    bad = edit(params, r["cond"], r["cond"], r["image"], np.int32(5), np.int32(5), np.float32(1))
    assert np.isnan(bad).all()  # start_step = S: out of range


def test_ahead_of_time_lowering_and_export(serving):
    """``generate.lower(...).compile()`` and a jax.export round trip (serialize, deserialize,
    call) give the jitted function's results for requests with different S and start_step."""
    module, generate, _, params, requests = serving
    first = request_args(params, requests[0])
    compiled = generate.lower(*first).compile()
    restored = jax.export.deserialize(module.export_generate(generate, first))
    for request in requests[:2]:
        args = request_args(params, request)
        expected = generate(*args)
        np.testing.assert_array_equal(compiled(*args), expected)
        np.testing.assert_allclose(restored.call(*args), expected, rtol=1e-5, atol=1e-5)


CACHE_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    import ddim_jax
    from jax import monitoring

    counts = {"hits": 0, "misses": 0}
    monitoring.register_event_listener(
        lambda event, **kw: counts.__setitem__("hits", counts["hits"] + 1)
        if event == "/jax/compilation_cache/cache_hits"
        else counts.__setitem__("misses", counts["misses"] + (event == "/jax/compilation_cache/cache_misses"))
    )
    jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    base = ddim_jax.create_state(ddim_jax.DDIMConfig())

    @jax.jit
    def generate(x, num_steps, start_step):
        state = ddim_jax.set_timesteps(base, num_steps, max_steps=50)
        return ddim_jax.sample(lambda x, t: 0.1 * x, state, x, start_step=start_step)

    out = generate(jnp.ones((1, 4)), 20, 3)
    print("hits", counts["hits"], "misses", counts["misses"], "finite", bool(jnp.isfinite(out).all()))
    """
)


def test_persistent_compilation_cache(tmp_path):
    """A second process finds the first one's program in the cache directory."""
    script = tmp_path / "cache_run.py"
    script.write_text(CACHE_SCRIPT.replace("CACHE_DIR", repr(str(tmp_path / "cache"))))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    first, second = (run.stdout.split() for run in runs)
    assert first[first.index("misses") + 1] != "0" and first[-1] == "True"
    assert second[second.index("hits") + 1] != "0" and second[-1] == "True"
    assert any((tmp_path / "cache").iterdir())


def test_export_keeps_out_of_range_requests_nan(serving):
    module, generate, _, params, requests = serving
    args = list(request_args(params, requests[0]))
    args[4] = jnp.int32(MAX_STEPS + 1)  # S > M
    assert np.isnan(generate(*args)).all()


def test_the_engine_mode_serves_every_image_in_one_tick_program(serving, capsys):
    module, _, _, params, requests = serving
    model, _ = module.make_model()
    config = ddim_jax.DDIMConfig(timestep_spacing="trailing", clip_sample=False)
    engine = module.make_engine(model, params, config, MAX_STEPS, slots=2)
    outputs = module.serve_with_engine(engine, requests[:4])
    images = sum(len(r["guidance"]) for r in requests[:4] if r["kind"] == "generate")
    assert len(outputs) == images == engine.stats()["done"] and all(np.isfinite(o).all() for o in outputs)
    assert engine.traces == {"admit": 1, "tick": 1}
    assert "slot-steps used" in capsys.readouterr().out
