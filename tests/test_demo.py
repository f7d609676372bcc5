"""Smoke tests of the main job (``ddim-jax demo``) and the examples, at tiny size (seconds)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("sklearn")

from ddim_jax.demo import cli  # noqa: E402
from ddim_jax.demo.png import PNG_SIGNATURE  # noqa: E402
from ddim_jax.demo.train import TrainSettings, cache_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--channels", "4", "--train-steps", "3", "--batch-size", "8", "--num-samples", "8"]
TINY += ["--steps", "2,3", "--etas", "0,1", "--recon-steps", "2,4", "--num-recon", "4", "--quiet"]
TINY_SETTINGS = TrainSettings(channels=(4,), train_steps=3, batch_size=8)


def read_png(path: Path) -> np.ndarray:
    """Parses a grayscale 8-bit PNG written by `write_png`, checking signature, chunk CRCs and IHDR."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type 0
    return rows[:, 1:]


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
    markdown = (out / "results.md").read_text()
    assert "Table 1" in markdown and "Table 2" in markdown and "| 1 |" in markdown


def test_demo_cache_reused_and_reproducible(demo_runs):
    base, [(_, first), (_, second)] = demo_runs
    assert first["params_from_cache"] is False and second["params_from_cache"] is True
    assert cache_path(TINY_SETTINGS, base / "cache").is_file()
    assert second["quality"]["eta"] == first["quality"]["eta"]  # seeded: same numbers again
    assert second["reconstruction"]["mse"] == first["reconstruction"]["mse"]
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
    ],
)
def test_demo_bad_arguments(bad, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", *bad, "--out", str(tmp_path / "o"), "--no-cache"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["demo", "--help"])
    assert err.value.code == 0
    assert "--num-samples" in capsys.readouterr().out


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
    out = tmp_path / "interp.png"
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
