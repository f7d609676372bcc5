"""The demo's class-conditional model, training targets, brightness and over-exposure metrics."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ddim_jax  # noqa: E402
from ddim_jax.demo import experiments  # noqa: E402
from ddim_jax.demo.data import load_digits_split, mean_brightness, vary_brightness  # noqa: E402
from ddim_jax.demo.experiments import Sampler  # noqa: E402
from ddim_jax.demo.metrics import out_of_range_fraction, std_ratio, wasserstein_1d  # noqa: E402
from ddim_jax.demo.train import NULL_LABEL, TrainSettings, _loss_tables, fixed_settings  # noqa: E402
from ddim_jax.demo.unet import UNet  # noqa: E402

X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)


@pytest.fixture(scope="module")
def random_conditional():
    """A class-conditional UNet with random (not zero-initialised) weights: output depends on all inputs."""
    model = UNet(channels=(4,), num_groups=1, num_classes=10, zero_init=False)
    params = model.init(jax.random.key(0), X[:1], 0, None, jnp.array([NULL_LABEL]))
    return model, params


def test_labels_condition_the_output(random_conditional):
    model, params = random_conditional
    out = {y: model.apply(params, X, 500, labels=jnp.full(4, y)) for y in (0, 1, NULL_LABEL)}
    assert float(jnp.abs(out[0] - out[1]).max()) > 1e-3
    assert float(jnp.abs(out[0] - out[NULL_LABEL]).max()) > 1e-3
    mixed = model.apply(params, X, 500, labels=jnp.array([0, 1, NULL_LABEL, 0]))
    np.testing.assert_allclose(mixed[1], out[1][1], atol=1e-6)  # per example
    np.testing.assert_allclose(mixed[2], out[NULL_LABEL][2], atol=1e-6)


@pytest.mark.parametrize(
    "labels, message",
    [
        (None, "labels must be given"),
        (jnp.zeros(3, jnp.int32), "labels must be ints"),
        (jnp.zeros(4), "ints"),
    ],
)
def test_bad_labels(random_conditional, labels, message):
    model, params = random_conditional
    with pytest.raises(ValueError, match=message):
        model.apply(params, X, 500, labels=labels)


def test_unconditional_model_refuses_labels():
    model = UNet(channels=(4,), num_groups=1)
    params = model.init(jax.random.key(0), X[:1], 0)
    with pytest.raises(ValueError, match="labels must be given iff num_classes > 0"):
        model.apply(params, X, 500, labels=jnp.zeros(4, jnp.int32))


@pytest.mark.parametrize("settings", [TrainSettings(), fixed_settings(TrainSettings())])
def test_training_targets_match_add_noise_and_get_velocity(settings):
    state = ddim_jax.create_state(settings.scheduler_config())
    a, b, c, d = _loss_tables(settings)
    t = jnp.array([0, 10, 500, 999])
    noise = jnp.asarray(np.random.default_rng(1).normal(size=X.shape), jnp.float32)
    col = (slice(None), None, None, None)
    xt = a[t][col] * X + b[t][col] * noise
    np.testing.assert_allclose(xt, ddim_jax.add_noise(state, X, noise, t), atol=1e-5)
    target = c[t][col] * noise + d[t][col] * X
    if settings.prediction_type == "v_prediction":
        expected = ddim_jax.get_velocity(state, X, noise, t)
        assert float(a[-1]) == 0.0  # zero terminal SNR: x_T is pure noise, the target at T-1 is -x0
    else:
        expected = noise
        assert float(a[-1]) > 0.05  # Stable Diffusion's schedule leaks signal at T-1
    np.testing.assert_allclose(target, expected, atol=1e-5)


def test_vary_brightness_spreads_brightness_in_range():
    x = load_digits_split().x_test
    y = np.asarray(vary_brightness(x, jax.random.key(0)))
    assert y.shape == x.shape and y.min() >= -1.0 and y.max() <= 1.0 + 1e-6
    assert mean_brightness(y).std() > 4 * mean_brightness(x).std()
    np.testing.assert_array_equal(y, np.asarray(vary_brightness(x, jax.random.key(0))))  # seeded
    # the digit stays visible: ink above background in every image
    assert (y.reshape(len(y), -1).max(1) - y.reshape(len(y), -1).min(1) > 0.7).all()


def test_brightness_metrics_on_known_inputs():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=200)
    assert wasserstein_1d(a, a + 0.25) == pytest.approx(0.25)
    assert wasserstein_1d(a, a[::-1]) == pytest.approx(0.0, abs=1e-12)
    assert wasserstein_1d(np.zeros(3), np.ones(5)) == pytest.approx(1.0)
    # two point masses 0 and 1 against all mass at 0.5: every unit moves 0.5
    assert wasserstein_1d(np.array([0.0, 1.0]), np.array([0.5])) == pytest.approx(0.5)
    assert std_ratio(0.5 * a, a) == pytest.approx(0.5)
    gray = np.full((3, 8, 8, 1), 0.0)
    assert mean_brightness(gray).tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein_1d(np.zeros(0), a)
    with pytest.raises(ValueError, match="constant"):
        std_ratio(a, np.ones(4))


def test_out_of_range_fraction_on_known_inputs():
    x = np.array([-1.2, -1.04, -1.0, 0.0, 0.5, 1.0, 1.04, 1.06, 2.0, 3.0])
    assert out_of_range_fraction(x) == pytest.approx(0.4)  # -1.2, 1.06, 2, 3
    assert out_of_range_fraction(x, tol=0.0) == pytest.approx(0.6)
    assert out_of_range_fraction(np.zeros((2, 8, 8, 1))) == 0.0


def test_sampler_guidance_wiring_and_no_recompile(random_conditional):
    model, params = random_conditional
    config = fixed_settings(TrainSettings()).scheduler_config(timestep_spacing="trailing")
    sampler = Sampler(model, params, config)
    x_T = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))
    key, labels = jax.random.key(4), [0, 3, 7, 9]
    conditional = sampler.sample(x_T, 4, 0.0, key, labels)
    np.testing.assert_allclose(sampler.sample(x_T, 4, 0.0, key, labels, 1.0, 0.0), conditional, atol=1e-5)
    before = len(experiments._PROGRAMS)
    strong = sampler.sample(x_T, 4, 0.0, key, labels, 7.5, 0.0)
    rescaled = sampler.sample(x_T, 4, 0.0, key, labels, 7.5, 0.7)
    assert len(experiments._PROGRAMS) == before  # new scale and rescale: same program
    assert np.abs(strong - conditional).max() > 1e-3 and np.abs(rescaled - strong).max() > 1e-4
    unconditional = sampler.sample(x_T, 4, 0.0, key)
    np.testing.assert_allclose(unconditional, sampler.sample(x_T, 4, 0.0, key, [NULL_LABEL] * 4), atol=1e-6)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        sampler.sample(x_T, 4, 0.0, key, [0, 1, 2, 11])
    with pytest.raises(ValueError, match=r"labels must be ints of shape \(4,\)"):
        sampler.sample(x_T, 4, 0.0, key, [0, 1])


def test_sampler_edit_wiring_and_no_recompile(random_conditional):
    """Invert under the source digit, sample under it (round trip) and under the target (edit)."""
    model, params = random_conditional
    config = fixed_settings(TrainSettings()).scheduler_config(timestep_spacing="trailing")
    sampler = Sampler(model, params, config)
    x0 = np.asarray(vary_brightness(load_digits_split().x_test[:4], jax.random.key(5)))
    source, target = [0, 3, 7, 9], [5, 8, 2, 4]
    errors = {}
    for method in ("ddim", "edict", "bdia"):
        recon, edited = sampler.edit(x0, 4, source, target, 3.0, method)
        errors[method] = float(np.abs(recon - x0).max())
        assert float(np.abs(edited - recon).max()) > 1e-2, method  # the target label changes the sample
        again, unchanged = sampler.edit(x0, 4, source, source, 3.0, method)
        # Same labels both ways: the reconstruction. The two halves of one batched call sit at
        # different batch positions, where XLA's CPU convolutions may round differently (seen:
        # 1.5e-6 with jax 0.10), so equal to float32 round-off, far below the 1e-2 an edit moves.
        np.testing.assert_allclose(unchanged, again, rtol=0, atol=1e-5)
    assert errors["edict"] < 1e-4 and errors["bdia"] < 1e-4, errors  # exact, to float32 round-off
    assert errors["ddim"] > 1e3 * max(errors["edict"], errors["bdia"]), errors  # DDIM inversion drifts
    before = len(experiments._PROGRAMS)
    other = Sampler(model, jax.tree.map(lambda p: 1.01 * p, params), config)
    recon, edited = other.edit(x0[::-1], 4, target, source, 1.5, "bdia")  # new params, images, labels, w
    assert len(experiments._PROGRAMS) == before
    assert float(np.abs(recon - x0[::-1]).max()) < 1e-4
    with pytest.raises(ValueError, match=r"method must be one of \['ddim', 'edict', 'bdia'\], got 'sdedit'"):
        sampler.edit(x0, 4, source, target, 3.0, "sdedit")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        sampler.edit(x0, 4, source, [0, 1, 2, 11], 3.0, "bdia")
