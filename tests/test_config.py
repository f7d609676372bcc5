"""DDIMConfig: diffusers' defaults, hashability, dict / JSON round-trips, foreign configs."""

from __future__ import annotations

import dataclasses
import inspect
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddim_jax import DDIMConfig

# diffusers DDIMScheduler.__init__ defaults (v0.42), also checked live below.
DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

# A Stable Diffusion v1 scheduler_config.json (a PNDMScheduler config).
SD_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "timestep_type": "discrete",
}


def test_defaults_are_diffusers_defaults():
    defaults = DDIMConfig().to_dict()
    assert defaults.pop("prev_timestep_rule") == "diffusers"  # our only extra field
    assert defaults == DIFFUSERS_DEFAULTS


def test_defaults_match_live_diffusers_signature():
    diffusers = pytest.importorskip("diffusers")
    params = inspect.signature(diffusers.DDIMScheduler.__init__).parameters
    live = {name: p.default for name, p in params.items() if name != "self"}
    ours = {f.name: f.default for f in dataclasses.fields(DDIMConfig) if f.name != "prev_timestep_rule"}
    assert ours == live


def test_hashable_and_usable_as_static_argument():
    a = DDIMConfig(trained_betas=np.linspace(0.001, 0.02, 1000))
    b = DDIMConfig(trained_betas=[float(x) for x in np.linspace(0.001, 0.02, 1000)])
    assert isinstance(a.trained_betas, tuple) and a == b and hash(a) == hash(b)
    assert len({DDIMConfig(), DDIMConfig(), DDIMConfig(steps_offset=1)}) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps_offset = 1  # type: ignore[misc]

    traces = []

    def scaled(x, config):
        traces.append(1)
        return x * config.num_train_timesteps

    f = jax.jit(scaled, static_argnums=1)
    f(jnp.ones(2), DDIMConfig())
    f(jnp.zeros(2), DDIMConfig())  # equal config: cache hit
    assert len(traces) == 1
    f(jnp.zeros(2), DDIMConfig(num_train_timesteps=10))
    assert len(traces) == 2


@pytest.mark.parametrize(
    "config",
    [
        DDIMConfig(),
        DDIMConfig(trained_betas=tuple(np.linspace(0.001, 0.02, 50).tolist()), num_train_timesteps=50),
        DDIMConfig(
            beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing",
            rescale_betas_zero_snr=True, thresholding=True, dynamic_thresholding_ratio=0.9,
            sample_max_value=2.5, clip_sample_range=1.5, set_alpha_to_one=False, steps_offset=1,
            prev_timestep_rule="schedule",
        ),
    ],
)  # fmt: skip
def test_dict_and_json_round_trip(config, tmp_path):
    d = config.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-ready
    assert DDIMConfig.from_dict(d) == config
    path = tmp_path / "scheduler_config.json"
    config.to_json(path)
    assert json.loads(path.read_text())["_class_name"] == "DDIMScheduler"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own output loads without warnings
        assert DDIMConfig.from_json(path) == config
        assert DDIMConfig.from_json(str(path)) == config


def test_stable_diffusion_pndm_config_loads_with_one_warning(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD_PNDM_CONFIG))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = DDIMConfig.from_json(path)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skip_prk_steps" in message and "timestep_type" in message
    assert "_class_name" not in message and "_diffusers_version" not in message
    assert "beta_end" not in message  # used keys are not named
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (config.steps_offset, config.set_alpha_to_one, config.clip_sample) == (1, False, False)


def test_diffusers_reads_our_json_and_we_read_theirs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = DDIMConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, steps_offset=1, clip_sample=False,
    )  # fmt: skip
    ours.to_json(tmp_path / "scheduler_config.json")
    sched = diffusers.DDIMScheduler.from_config(diffusers.DDIMScheduler.load_config(tmp_path))
    for name in DIFFUSERS_DEFAULTS:
        assert sched.config[name] == getattr(ours, name), name
    theirs = tmp_path / "theirs"
    sched.save_config(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DDIMConfig.from_json(theirs / "scheduler_config.json") == ours


def test_from_pretrained_model_folder_scheduler_folder_or_file(tmp_path):
    """diffusers' layout: model/scheduler/scheduler_config.json, found from any of the three."""
    scheduler_dir = tmp_path / "model" / "scheduler"
    scheduler_dir.mkdir(parents=True)
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(SD_PNDM_CONFIG))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PNDM keys, tested above
        found = [
            DDIMConfig.from_pretrained(tmp_path / "model"),
            DDIMConfig.from_pretrained(tmp_path / "model", subfolder="scheduler"),
            DDIMConfig.from_pretrained(str(scheduler_dir)),
            DDIMConfig.from_pretrained(scheduler_dir / "scheduler_config.json"),
        ]
    assert all(c == found[0] for c in found) and found[0].steps_offset == 1


def test_from_pretrained_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that the hub id is not a local folder by accident
    with pytest.raises(FileNotFoundError, match=r"'stabilityai/sd-turbo' is not a local .*downloads nothing"):
        DDIMConfig.from_pretrained("stabilityai/sd-turbo", subfolder="scheduler")
    with pytest.raises(FileNotFoundError, match=r"huggingface-cli download stabilityai/sd-turbo scheduler/"):
        DDIMConfig.from_pretrained("stabilityai/sd-turbo")
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*missing"):
        DDIMConfig.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"no scheduler_config.json in"):
        DDIMConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        DDIMConfig.from_pretrained(3)
