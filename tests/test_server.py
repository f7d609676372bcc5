"""The HTTP server (examples/server.py): request validation, and a short load and fault run.

The load run is ``benchmarks/serve_load.py --quick``: the server in a subprocess on 127.0.0.1
(untrained weights, 4 slots, queue limit 8), open-loop Poisson arrivals at 0.5x, 1x and 2x its
measured saturation rate with faults mixed in (malformed JSON, wrong types, huge values,
oversized bodies, clients hanging up mid-request), a SIGTERM restart onto a second process in
the middle, and a burst of 10x the queue limit: about 1,000 requests, 14 s on 2 cores at load 3.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys

import pytest

pytest.importorskip("aiohttp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str, path: str):
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


server = _load("ddim_jax_server", os.path.join(ROOT, "examples", "server.py"))
SERVED = server.Served("digits", None, None, {}, image_shape=(8, 8), num_classes=10)


@pytest.mark.parametrize(
    "body, field",
    [
        ([1, 2], "body"),
        ({"stepz": 10}, "stepz"),
        ({"class": 10}, "class"),
        ({"class": 1.5}, "class"),
        ({"class": True}, "class"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"steps": "ten"}, "steps"),
        ({"steps": 10**30}, "steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": 1e308}, "guidance_scale"),
        ({"eta": -0.1}, "eta"),
        ({"eta": None}, "eta"),
        ({"seed": 2**32}, "seed"),
        ({"seed": -1}, "seed"),
        ({"init_image": [[0.5] * 8] * 7}, "init_image"),
        ({"init_image": [[2.0] * 8] * 8}, "init_image"),
        ({"init_image": "abc"}, "init_image"),
        ({"strength": 0.5}, "strength"),
        ({"init_image": [[0.5] * 8] * 8, "strength": 0}, "strength"),
        ({"init_image": [[0.5] * 8] * 8, "strength": 0.01, "steps": 10}, "strength"),
        ({"format": "gif"}, "format"),
    ],
)
def test_validate_names_the_bad_field(body, field):
    with pytest.raises(server.FieldError) as e:
        server.validate(body, max_steps=50, served=SERVED)
    assert e.value.field == field and str(e.value).startswith(f"{field}:")


def test_validate_fills_defaults():
    job = server.validate({"class": 3}, max_steps=50, served=SERVED)
    assert (job.label, job.steps, job.eta, job.format, job.init_image) == (3, 25, 0.0, "png", None)
    assert 0 <= job.seed < 2**32
    job = server.validate({"init_image": [[0.5] * 8] * 8, "class": None}, max_steps=10, served=SERVED)
    assert job.label is None and job.steps == 10 and job.strength == 0.8 and job.init_image.shape == (8, 8)


def test_load_and_faults(tmp_path):
    load = _load("serve_load", os.path.join(ROOT, "benchmarks", "serve_load.py"))
    args = load.parse(["--quick", "--compile-cache", str(tmp_path / "cache")])
    results = asyncio.run(load.run_load(args))
    total = results["total"]["counts"]
    assert results["problems"] == []  # no lost request, no refusal without its reason, ...
    assert total.get("lost", 0) == 0 and total.get("connect_failed", 0) == 0
    assert set(total) - {"lost", "connect_failed"} <= {
        "2xx",
        "4xx",
        "5xx",
        "200",
        "400",
        "413",
        "422",
        "429",
        "503",
        "disconnected",
    }
    assert total.get("5xx", 0) == total.get("503", 0)  # 503: the documented shutting-down answer
    assert total["200"] >= 150 and total.get("429", 0) >= 1  # the burst was refused in part
    for code in ("400", "413", "422"):
        assert total.get(code, 0) >= 1, code  # each kind of fault was sent and refused
    # the restart: the old process drained and exited 0, the new one served the rest
    assert results["exit_codes"] == [0, 0]
    stopped = results["restart"]["old_stopped"]
    assert stopped["event"] == "stopped" and stopped["answered_503"] <= stopped["admitted_at_sigterm"]
    after = [o for o in results["outcomes"] if o["phase"] == "burst"]
    assert any(o["status"] == 200 for o in after)
    # clients that hung up were cancelled and freed their slots
    metrics = results["metrics"]
    assert (
        metrics["engine"]["busy_slots"] == 0 and metrics["engine"]["queued"] == 0 and metrics["admitted"] == 0
    )
    assert metrics["requests"].get("cancelled", 0) <= results["disconnects"]["sent"]
    assert results["rss"]["growth"] < 0.10


def test_http_refusals_name_their_reason():
    """Bad bodies are answered 400 / 413 / 422 with the field before anything reaches the engine
    (the worker here is None: touching it would fail the test)."""
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    args = server.build_parser().parse_args(["--max-body", "8192", "--max-steps", "50"])
    app = server.Server(None, SERVED, args).app
    cases = [
        (b'{"class": 3,', 400, "body"),
        (b"[" * 3000, 400, "body"),  # nested too deeply for json's decoder
        (b'{"seed": ' + b"9" * 4400 + b"}", 400, "body"),  # over Python's int-string limit
        (b'{"pad": "' + b"x" * 9000 + b'"}', 413, "body"),
        (b'{"steps": "ten"}', 422, "steps"),
        (b'{"guidance_scale": 1e308}', 422, "guidance_scale"),
        (b'{"init_image": [[0.5, 0.5], [0.5]]}', 422, "init_image"),
    ]

    async def run():
        async with TestServer(app, host="127.0.0.1") as http, ClientSession() as session:
            answers = []
            for body, _, _ in cases:
                async with session.post(http.make_url("/generate"), data=body) as r:
                    answers.append((r.status, (await r.json())["field"]))
            async with session.get(http.make_url("/healthz")) as r:
                answers.append((r.status, (await r.json())["status"]))
            return answers

    answers = asyncio.run(run())
    assert answers == [(status, field) for _, status, field in cases] + [(200, "ok")]
