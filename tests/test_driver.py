"""The loop driver: a method states its own parts, `run_loop` runs it in every mode, and the
shared machinery names no loop."""

from __future__ import annotations

import ast
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddim_jax as dj
from ddim_jax._loop import MODEL_CALL_OPTIONS, LoopOptions, Method, Plan, Prepared, Supports, run_loop
from ddim_jax._step import StepOutput

PACKAGE = pathlib.Path(dj.__file__).parent
SHARED = ["_loop.py", "_model_call.py", "_checks.py", "_values.py"]
LOOPS = ["sample", "invert", "parallel_sample", "edict_sample", "edict_invert", "bdia_sample", "bdia_invert"]


def _code_strings(path: pathlib.Path) -> list[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


@pytest.mark.parametrize("module", SHARED)
def test_the_shared_machinery_names_no_loop(module):
    # "sample" alone is also a prediction type and diffusers' output attribute: not a loop there
    named = [
        s
        for s in _code_strings(PACKAGE / module)
        for loop in LOOPS
        if (s == loop and loop != "sample") or f"{loop}(" in s or f"{loop} " in s
    ]
    assert named == []


def _toy_method(name: str, reverse: bool) -> Method:
    """x <- x - c_k * model(x), with c_k = 1 / (k + 2) for schedule entry k."""

    def prepare(state, latents, plan: Plan) -> Prepared:
        c = 1.0 / (jnp.arange(state.max_steps, dtype=plan.dtype) + 2.0)

        def step(model, x, c_k):
            out = model(x)
            return StepOutput(x - c_k * out, out)

        return Prepared(jnp.asarray(latents, plan.dtype), state.timesteps, step, c)

    return Method(Supports(name), "latents", reverse, prepare)


def _by_hand(state, x, start, reverse, scales):
    """The toy method as a Python loop, guided by CFG with scales[k] at entry k."""
    entries = list(range(start, int(state.num_inference_steps)))
    for k in reversed(entries) if reverse else entries:
        t = int(state.timesteps[k])
        uncond, cond = jnp.tanh(x) + 0.001 * t, 2 * jnp.tanh(x) + 0.001 * t
        x = x - (uncond + scales[k] * (cond - uncond)) / (k + 2.0)
    return x


def _model(x, t, c):
    return c * jnp.tanh(x) + 0.001 * t


@pytest.mark.parametrize("reverse", [False, True])
def test_a_new_method_runs_in_every_mode_with_the_index_passed_to_guiders(reverse):
    """A method written against the spec alone: static and runtime-length, a start step, the
    guider sees each entry's schedule index (a scale_schedule), one trace for every S <= M."""
    state = dj.set_timesteps(dj.create_state(dj.DDIMConfig()), 6)
    x = jax.random.normal(jax.random.key(0), (2, 3))
    scales = jnp.linspace(1.0, 3.0, 6)
    cond = jnp.repeat(jnp.array([1.0, 2.0]), 2)[:, None]  # [uncond, cond] halves of the doubled batch
    scheduled = dj.cfg(dj.scale_schedule(scales))
    method = _toy_method("toy", reverse)

    def run(state, x, start_step, return_trajectory=False):
        options = dict(model_args=(cond,), guider=scheduled, start_step=start_step)
        return run_loop(method, _model, state, x, dict(options, return_trajectory=return_trajectory))

    expected = _by_hand(state, x, 2, reverse, scales)
    np.testing.assert_allclose(run(state, x, 2), expected, rtol=1e-6, atol=1e-6)
    traces = []

    @jax.jit
    def runtime(num_steps, start_step, x):
        traces.append(1)
        padded = dj.set_timesteps(dj.create_state(dj.DDIMConfig()), num_steps, max_steps=9)
        return run(padded, x, start_step, return_trajectory=True)

    out, trajectory = runtime(6, 2, x)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert trajectory.prev_sample.shape == (9, 2, 3) and bool(jnp.isnan(trajectory.prev_sample[4:]).all())
    runtime(5, 0, x)
    assert bool(jnp.isnan(runtime(10, 0, x)[0]).all())  # S > M, traced: NaN
    assert len(traces) == 1


def test_the_driver_checks_guiders_against_what_a_method_supports():
    state = dj.set_timesteps(dj.create_state(dj.DDIMConfig()), 4)
    x = jnp.ones((1, 2))
    method = _toy_method("toy", False)._replace(supports=Supports("toy", no_guider_state="it says so"))
    options = dict(model_args=(jnp.ones((2, 1)),), guider=dj.apg(2.0, momentum=-0.5))
    with pytest.raises(ValueError, match="toy needs a stateless guider .*: it says so"):
        run_loop(method, _model, state, x, options)


@pytest.mark.parametrize("name", LOOPS + ["fixed_point_invert"])
def test_each_loop_declares_the_shared_options_once_in_its_signature(name):
    """The options a loop takes as ``**options`` stand in its signature with LoopOptions'
    defaults; a name it does not declare is a TypeError naming the loop, before any compute."""
    loop = getattr(dj, name)
    parameters = inspect.signature(loop).parameters
    shared = LoopOptions._fields if name != "parallel_sample" else (*MODEL_CALL_OPTIONS, "start_step")
    for option in shared:
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY
        assert parameters[option].default == LoopOptions._field_defaults[option], option
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    state = dj.set_timesteps(dj.create_state(dj.DDIMConfig(clip_sample=False)), 4)
    with pytest.raises(TypeError, match=f"^{name}\\(\\) got an unexpected keyword argument 'guidance'"):
        loop(lambda x, t: x, state, jnp.zeros((1, 2)), guidance=2.0)
    if name == "parallel_sample":  # the loop options it does not take are not silently ignored
        with pytest.raises(TypeError, match="unexpected keyword argument 'return_trajectory'"):
            loop(lambda x, t: x, state, jnp.zeros((1, 2)), return_trajectory=True)
