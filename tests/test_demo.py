"""Smoke tests of the main job (``ddim-jax demo``) and the examples, at tiny size (seconds)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")
Image = pytest.importorskip("PIL.Image")

from ddim_jax.demo import cli  # noqa: E402
from ddim_jax.demo.train import TrainSettings, cache_path, fixed_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the training settings of the doctests' tiny models: one compiled training step serves all
TINY = ["--channels", "4", "--train-steps", "2", "--batch-size", "4", "--num-samples", "8"]
TINY += ["--steps", "2,3", "--etas", "0,1", "--recon-steps", "2,4", "--num-recon", "4", "--quiet"]
TINY += ["--schedule-steps", "2,3", "--schedule-samples", "8"]
TINY += [
    "--guidance-scales",
    "1,5",
    "--guidance-rescales",
    "0,0.7",
    "--guidance-steps",
    "2",
    "--per-digit",
    "2",
    "--guidance-methods",
    "cfg,cfg_pp,window",
]
TINY_SETTINGS = TrainSettings(channels=(4,), train_steps=2, batch_size=4)


def read_png(path: Path) -> np.ndarray:
    """Reads an 8-bit grayscale PNG (Pillow), checking the mode."""
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "L"
        return np.asarray(image)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Runs the tiny demo twice with one cache dir: the second run must reuse the parameters."""
    base = tmp_path_factory.mktemp("demo")
    args = [*TINY, "--cache-dir", str(base / "cache")]
    runs = []
    for i in range(2):
        out = base / f"out{i}"
        assert cli.main(["demo", *args, "--out", str(out)]) == 0
        runs.append((out, json.loads((out / "results.json").read_text())))
    return base, runs


def test_demo_writes_files_and_tables(demo_runs):
    _, [(out, results), _] = demo_runs
    for name in results["files"].values():
        image = read_png(out / name)
        assert image.ndim == 2 and image.min() < image.max()
    assert read_png(out / results["files"]["steps"]).shape == (2 * 33 + 1, 10 * 33 + 1)  # 2 rows of S
    quality, recon = results["quality"], results["reconstruction"]
    assert set(quality["eta"]) == {"0", "1"}
    for row in quality["eta"].values():
        assert set(row) == {"2", "3"} and all(np.isfinite(v) and v >= 0 for v in row.values())
    assert quality["real_data_floor"] > 0 and quality["num_samples"] == 8
    assert set(recon["mse"]) == {"2", "4"} and all(0 <= v < 1 for v in recon["mse"].values())
    brightness, guidance = results["brightness"], results["guidance"]
    assert set(brightness["configs"]) == {"a", "b", "c"}
    for row in brightness["configs"].values():
        assert set(row) == {"2", "3"}
        for cell in row.values():
            assert cell["w1"] >= 0 and cell["std_ratio"] >= 0 and 0 <= cell["mean"] <= 1
    assert set(guidance["cells"]) == {"1", "5"} and guidance["num_samples"] == 20
    for row in guidance["cells"].values():
        assert set(row) == {"0", "0.7"}
        assert all(0 <= c["accuracy"] <= 1 and 0 <= c["out_of_range"] <= 1 for c in row.values())
    assert read_png(out / results["files"]["guidance"]).shape == (2 * 33 + 1, 21 * 33 + 1)
    methods = results["guidance_methods"]
    assert set(methods["cells"]) == {"cfg", "cfg_pp", "window"} and methods["scales"] == [5.0]
    cfg_cell, table_cell = methods["cells"]["cfg"]["5"], guidance["cells"]["5"]["0"]  # the same samples
    assert cfg_cell == pytest.approx(table_cell, rel=1e-4, abs=1e-6)
    assert (out / methods["figure"]).stat().st_size > 0 and "Guidance methods" in (
        out / "results.md"
    ).read_text()
    assert read_png(out / results["files"]["brightness"]).shape == (4 * 33 + 1, 8 * 33 + 1)
    markdown = (out / "results.md").read_text()
    assert "Table 1" in markdown and "Table 2" in markdown and "| 1 |" in markdown
    assert "Zero terminal SNR" in markdown and "Guidance" in markdown
    assert set(results["cpu_seconds"]) >= {"table1", "table2", "schedule", "guidance", "total"}
    assert sorted(results["figures"]) == ["fcd", "guidance", "schedule"]  # labelled figures, RGBA
    for name in results["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode == "RGBA" and image.size[0] > 300


def test_demo_cache_reused_and_reproducible(demo_runs):
    base, [(_, first), (_, second)] = demo_runs
    assert first["params_from_cache"] == {"epsilon": False, "v_prediction": False}
    assert second["params_from_cache"] == {"epsilon": True, "v_prediction": True}
    assert cache_path(TINY_SETTINGS, base / "cache").is_file()
    assert cache_path(fixed_settings(TINY_SETTINGS), base / "cache").is_file()
    assert cache_path(TINY_SETTINGS, base / "cache") != cache_path(
        fixed_settings(TINY_SETTINGS), base / "cache"
    )
    for part in ("quality", "reconstruction", "brightness", "guidance"):  # seeded: same numbers again
        assert second[part] == first[part]
    assert cache_path(
        TrainSettings(channels=(4,), train_steps=4, batch_size=8), base / "cache"
    ) != cache_path(TINY_SETTINGS, base / "cache")


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--num-samples", "1"], "--num-samples"),
        (["--steps", "0"], "--steps"),
        (["--recon-steps", "1001"], "--recon-steps"),
        (["--etas", "1.5"], "--etas"),
        (["--train-steps", "0"], "--train-steps"),
        (["--channels", "4,4,4,4"], "--channels"),
        (["--steps", "ten"], "--steps"),
        (["--seed", "x"], "--seed"),
        (["--seed", str(2**64)], "--seed: expected an integer in [0, 2**32 - 1"),  # was an OverflowError
        (["--seed", "-1"], "--seed"),
        (["--parts", "ddim,colour"], "--parts"),
        (["--brightness-samples", "1"], "--brightness-samples"),
        (["--brightness-sizes", "8,32", "--brightness-headline", "64"], "--brightness-headline"),
        (["--brightness-steps", "0"], "--brightness-steps"),
        (["--brightness-etas", "2"], "--brightness-etas"),
        (["--guidance-rescales", "1.5"], "--guidance-rescales"),
        (["--guidance-methods", "cfg,nope"], "--guidance-methods"),
        (["--schedule-steps", "0"], "--schedule-steps"),
        (["--per-digit", "0"], "--per-digit"),
    ],
)
def test_demo_bad_arguments(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", *bad, "--out", str(tmp_path / "o"), "--no-cache"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    """Makes any training or parameter loading fail the test: errors must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("trained before refusing a bad argument")

    monkeypatch.setattr("ddim_jax.demo.train.load_or_train", fail)


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
@pytest.mark.parametrize("where", ["file", "below_file"])
def test_demo_bad_directories_refused_before_training(flag, where, tmp_path, capsys, no_training):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad = a_file if where == "file" else a_file / "sub"
    args = {"--out": str(tmp_path / "out"), "--cache-dir": str(tmp_path / "cache"), flag: str(bad)}
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", *[x for pair in args.items() for x in pair], "--quiet"])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"ddim-jax demo: error: {flag}" in message and "Traceback" not in message
    assert message.count("\n") == 1


def test_demo_missing_extra_says_which(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    assert cli.main(["demo", "--help"]) == 2
    message = capsys.readouterr().err
    assert "pip install 'ddim_jax[demo]'" in message and "Pillow" in message


def test_demo_one_part_alone(demo_runs, tmp_path):
    base, _ = demo_runs
    out = tmp_path / "guidance_only"
    argv = ["demo", *TINY, "--cache-dir", str(base / "cache"), "--out", str(out), "--parts", "guidance"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["parts"] == ["guidance"] and "quality" not in results and "brightness" not in results
    assert results["params_from_cache"] == {"v_prediction": True}  # only the model this part needs
    assert sorted(results["files"]) == ["guidance"]


def test_demo_inversion_part(demo_runs, tmp_path):
    """``--parts inversion``: not in the default run; alone it writes its grids and its table."""
    base, runs = demo_runs
    assert "inversion" not in runs[0][1]["parts"] and "inversion" not in runs[0][1]
    out = tmp_path / "inversion_only"
    argv = ["demo", *TINY, "--cache-dir", str(base / "cache"), "--out", str(out), "--parts", "inversion"]
    argv += ["--inversion-steps", "2,3", "--inversion-guidance", "1,3", "--inversion-digits", "4"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["parts"] == ["inversion"] and results["params_from_cache"] == {"v_prediction": True}
    assert results["files"] == {"inversion_w1": "inversion_w1_S2.png", "inversion_w3": "inversion_w3_S2.png"}
    assert results["figures"] == {
        "inversion_w1": "inversion_w1_S2_labelled.png",
        "inversion_w3": "inversion_w3_S2_labelled.png",
    }
    assert all((out / name).is_file() for name in results["figures"].values())
    for name in results["files"].values():  # 7 rows (originals; reconstructions, edits per method) of 4
        assert read_png(out / name).shape == (7 * 33 + 1, 4 * 33 + 1)  # 8x8 at 4x, 1-pixel frames
    table = results["inversion"]
    assert table["num_digits"] == 4 and table["config"]["timestep_spacing"] == "trailing"
    for method in ("ddim", "edict", "bdia"):
        for w in ("1", "3"):
            for s in ("2", "3"):
                cell = table["cells"][method][w][s]
                assert 0.0 <= cell["edit_accuracy"] <= 1.0 and cell["edit_distance"] > 0.0
                if method != "ddim":  # exact, even on an all-but-untrained model
                    assert cell["max_rel_err"] < 1e-4, (method, w, s, cell)
    text = (out / "results.md").read_text()
    assert "| bdia | 3 |" in text and "d -> (d + 5) % 10" in text


def test_demo_brightness_part(tmp_path, no_training):
    """``--parts brightness``: no training, no digits; its tables and four labelled figures, small."""
    out = tmp_path / "brightness_only"
    argv = ["demo", "--out", str(out), "--no-cache", "--quiet", "--parts", "brightness"]
    argv += ["--brightness-sizes", "8", "--brightness-headline", "8", "--brightness-steps", "3,5"]
    argv += ["--brightness-etas", "0", "--brightness-samples", "12"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["parts"] == ["brightness"] and results["params_from_cache"] == {}
    assert results["files"] == {}
    table = results["exact_brightness"]
    assert set(table["cells"]["8"]["a"]) == {"3", "5"} and set(table["cells"]["8"]["a"]["5"]) == {"0"}
    assert sorted(results["figures"]) == [
        "brightness_by_resolution",
        "brightness_by_steps",
        "brightness_extremes",
        "brightness_histograms",
    ]
    for name in results["figures"].values():
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    text = (out / "results.md").read_text()
    assert "Growth with resolution" in text
    assert "| d: zero-SNR, v-prediction, trailing (the fix) | 0 |" in text
    assert "brightness" in results["seconds"]


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--help"])
    assert err.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-samples", "--parts", "--schedule-steps", "--guidance-scales", "--guidance-rescales"):
        assert flag in text
    for flag in ("--inversion-steps", "--inversion-guidance", "--inversion-digits"):
        assert flag in text


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_sd_latent_guidance_example(capsys):
    example = _load_example("sd_latent_guidance")
    config = example.load_scheduler()
    assert (config.rescale_betas_zero_snr, config.timestep_spacing, config.prediction_type) == (
        True,
        "trailing",
        "v_prediction",
    )
    latents = example.main(num_steps=3, latent_size=8, channels=(8,), text_shape=(3, 16))
    assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()
    assert "compiled programs: 1" in capsys.readouterr().out


def test_interpolation_example(demo_runs, tmp_path):
    base, _ = demo_runs
    example = _load_example("interpolation_grid")
    out = tmp_path / "examples_out" / "interp.png"  # the folder is created
    images = example.main(
        str(out), cache_dir=str(base / "cache"), settings=TINY_SETTINGS, rows=2, cols=3, num_steps=2
    )
    assert images.shape == (6, 8, 8, 1)
    assert read_png(out).shape == (2 * 33 + 1, 3 * 33 + 1)


@pytest.mark.parametrize("keys", ["one", "per-example"])
def test_sharded_sampling_example_agrees_across_device_counts(keys):
    script = Path(__file__).resolve().parents[1] / "examples" / "sharded_sampling.py"
    args = ["--batch", "8", "--size", "8", "--steps", "3", "--features", "8", "--repeats", "1"]
    run = subprocess.run(
        [sys.executable, str(script), *args, "--devices", "1", "2", "8", "--keys", keys],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert run.returncode == 0, run.stderr
    assert f"keys: {keys}" in run.stdout and "results agree across [1, 2, 8] devices" in run.stdout
