"""council-fast serve's HTTP API, in process (Starlette's TestClient), on the tiny config with random weights."""
from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="the serve extra is not installed: pip install -e '.[serve]'")
from starlette.testclient import TestClient  # noqa: E402

from _serving import MEMBERS, encoded, make_checkpoint, photo  # noqa: E402
from council_fast.cli import convert  # noqa: E402
from council_fast.cli import serve as serve_cli  # noqa: E402
from council_fast.serving.app import ServeSettings, create_app  # noqa: E402
from council_fast.serving.engine import ServingEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKEND = "reference"  # the convert tests' default too; the fused engine is checked in test_same_as_convert_fused


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def engine(ckpt):
    return ServingEngine(ckpt, "tiny", device="cpu", backend=BACKEND, max_batch=8)


@pytest.fixture(scope="module")
def client(engine):
    app = create_app(engine, ServeSettings(max_batch=8, max_wait_ms=2, max_upload_bytes=200_000, max_pixels=1_000_000,
                                           max_styles=4, max_size=64))
    with TestClient(app) as c:
        yield c


def post(client, data=None, image=None, name="p.png", files=None):
    files = files if files is not None else {"image": (name, encoded(photo()) if image is None else image, "image/png")}
    return client.post("/v1/translate", files=files, data=data or {})


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_translate_json_every_member_and_style(client):
    r = post(client, {"styles": "2", "seed": "7"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(o["member"], o["style"]) for o in body["outputs"]] == [(m, s) for m in MEMBERS for s in range(2)]
    images = [decode_png(o["png_base64"]) for o in body["outputs"]]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert body["seed"] == 7 and body["size"] == 32 and body["face"] is None
    assert set(body["timing_ms"]) == {"decode", "queue", "model", "encode", "total"}
    assert len({im.tobytes() for im in images}) == len(images)  # members and styles differ


def test_png_format_seed_and_size(client):
    r = post(client, {"member": "1", "format": "png", "seed": "3", "size": "64"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "3"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    again = post(client, {"member": "1", "format": "png", "seed": "3", "size": "64"})
    assert again.content == r.content  # same seed, same image
    other = post(client, {"member": "1", "format": "png", "seed": "4", "size": "64"})
    assert other.content != r.content


def run_convert(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    return convert.run(parser.parse_args(["--quiet", "--workers", "0", "--device", "cpu", *argv]))


@pytest.mark.parametrize("member", ["all", "2"])
def test_same_images_as_convert(client, ckpt, tmp_path, member):
    """The same photo, name, seed, member and styles give the same PNG pixels as `council-fast convert`."""
    src = tmp_path / "face.png"
    photo(5, 60, 44).save(src)
    assert run_convert("--config", "tiny", "--checkpoint", ckpt, "--input", str(src), "--output", str(tmp_path / "out"),
                       "--member", member, "--styles", "3", "--seed", "11", "--backend", BACKEND) == 0
    r = post(client, {"member": member, "styles": "3", "seed": "11"}, image=src.read_bytes(), name="face.png")
    assert r.status_code == 200, r.text
    for out in r.json()["outputs"]:
        expected = np.asarray(Image.open(tmp_path / "out" / f"face_m{out['member']}_s{out['style']}.png"))
        np.testing.assert_array_equal(decode_png(out["png_base64"]), expected)


def test_same_as_convert_fused(ckpt, tmp_path):
    """The fused engine (back-end cpu where it builds, else its reference kernels): serve == convert."""
    src = tmp_path / "x.png"
    photo(9).save(src)
    assert run_convert("--config", "tiny", "--checkpoint", ckpt, "--input", str(src), "--output", str(tmp_path / "o"),
                       "--member", "0", "--styles", "2", "--seed", "5") == 0
    engine = ServingEngine(ckpt, "tiny", device="cpu", backend="auto", max_batch=4)
    assert engine.engine.startswith("fused"), engine.engine
    with TestClient(create_app(engine, ServeSettings(max_batch=4))) as c:
        r = post(c, {"member": "0", "styles": "2", "seed": "5"}, image=src.read_bytes(), name="x.png")
    assert r.status_code == 200, r.text
    for out in r.json()["outputs"]:
        expected = np.asarray(Image.open(tmp_path / "o" / f"x_m0_s{out['style']}.png"))
        np.testing.assert_array_equal(decode_png(out["png_base64"]), expected)


def bomb_png() -> bytes:
    """A 2,000 x 2,000 PNG (4 MP, over the test server's 1 MP limit) that compresses to a few KB."""
    return encoded(Image.new("RGB", (2000, 2000)))


@pytest.mark.parametrize("case, status, words", [
    ("not an image", 400, ["cannot read image"]),
    ("truncated", 400, ["cannot read image"]),
    ("bomb", 413, ["pixels", "--max-pixels"]),
    ("oversize", 413, ["limit", "--max-upload-mb"]),
    ("unknown field", 422, ["unknown field", "colour"]),
    ("missing image", 422, ["'image'"]),
    ("styles too many", 422, ["'styles'", "out of range"]),
    ("styles not int", 422, ["'styles'", "not an integer"]),
    ("negative seed", 422, ["'seed'"]),
    ("member unknown", 422, ["'member'", "7"]),
    ("size not multiple", 422, ["'size'", "multiple of 4"]),
    ("size too big", 422, ["'size'", "out of range"]),
    ("format", 422, ["'format'"]),
    ("png of many", 422, ["format=png"]),
    ("not multipart", 400, ["multipart"]),
])
def test_bad_input_gets_4xx_naming_the_problem(client, case, status, words):
    good = encoded(photo())
    requests = {
        "not an image": lambda: post(client, image=b"this is not an image at all"),
        "truncated": lambda: post(client, image=good[: len(good) // 2]),
        "bomb": lambda: post(client, image=bomb_png()),
        "oversize": lambda: post(client, image=good + b"\0" * 300_000),
        "unknown field": lambda: post(client, {"colour": "red"}),
        "missing image": lambda: post(client, files={"styles": (None, "1")}),
        "styles too many": lambda: post(client, {"styles": "5"}),
        "styles not int": lambda: post(client, {"styles": "two"}),
        "negative seed": lambda: post(client, {"seed": "-1"}),
        "member unknown": lambda: post(client, {"member": "7"}),
        "size not multiple": lambda: post(client, {"size": "30"}),
        "size too big": lambda: post(client, {"size": "128"}),
        "format": lambda: post(client, {"format": "gif"}),
        "png of many": lambda: post(client, {"format": "png"}),
        "not multipart": lambda: client.post("/v1/translate", content=b"{}",
                                             headers={"content-type": "application/json"}),
    }
    r = requests[case]()
    assert r.status_code == status, r.text
    message = r.json()["error"]
    for word in words:
        assert word in message, message
    assert post(client).status_code == 200  # the server is still fine


def test_health_ready_metrics_page(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    info = client.get("/v1/info").json()
    assert info["members"] == list(MEMBERS) and info["size"] == 32
    post(client)
    text = client.get("/metrics").text
    assert 'council_fast_requests_total{path="/v1/translate",status="200"}' in text
    assert 'council_fast_request_seconds_bucket{path="/v1/translate",le="+Inf"}' in text
    assert "council_fast_batch_size_count" in text and "council_fast_queue_depth 0" in text
    assert "council_fast_ready 1" in text
    page = client.get("/")
    assert page.status_code == 200 and "council-fast" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client):
    names = [f"img{i}.png" for i in range(8)]

    def one(i):
        return post(client, {"member": "0", "seed": "1"}, image=encoded(photo(100 + i)), name=names[i])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert all(a.status_code == 200 for a in answers)
    alone = [post(client, {"member": "0", "seed": "1", "format": "png"}, image=encoded(photo(100 + i)), name=names[i])
             for i in range(8)]
    for a, b in zip(answers, alone):
        np.testing.assert_array_equal(decode_png(a.json()["outputs"][0]["png_base64"]),
                                      np.asarray(Image.open(io.BytesIO(b.content))))


def test_full_queue_503_and_failing_batch_500(ckpt, engine, monkeypatch):
    gate, entered = threading.Event(), threading.Event()
    real_run = engine.run

    def slow_run(works):
        entered.set()
        assert gate.wait(30)
        if any(w.z.shape[0] == 3 for w in works):  # requests asking for 3 styles make their batch fail
            raise RuntimeError("simulated kernel failure")
        return real_run(works)
    app = create_app(engine, ServeSettings(max_batch=1, max_wait_ms=0, max_queue=1))
    with TestClient(app) as c:
        assert app.state.service.batcher.started.wait(60)  # warmed up before the engine is swapped
        monkeypatch.setattr(engine, "run", slow_run)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            running = pool.submit(post, c, {"member": "0"})
            assert entered.wait(10)
            queued = pool.submit(post, c, {"member": "0", "styles": "3"})
            for _ in range(1000):
                if app.state.service.batcher.depth == 1:
                    break
                time.sleep(0.01)
            full = post(c, {"member": "0"})
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
            assert "queue is full" in full.json()["error"]
            gate.set()
            assert running.result(30).status_code == 200
            failed = queued.result(30)
        assert failed.status_code == 500 and "simulated kernel failure" in failed.json()["error"]
        assert post(c, {"member": "0"}).status_code == 200  # the next batch is fine
        assert "council_fast_batches_failed_total 1" in c.get("/metrics").text


def test_cli_refuses_bad_settings_and_checkpoints(ckpt, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    assert serve_cli.run(parser.parse_args(["--checkpoint", ckpt, "--config", "tiny", "--max-batch", "0"])) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert serve_cli.run(parser.parse_args(["--checkpoint", str(tmp_path / "nope"), "--config", "tiny"])) == 2
    assert "nope" in capsys.readouterr().err


def per_batch_seconds(costs: dict):
    """A stand-in for ServingEngine._timed: the given seconds for a batch of each size."""
    return lambda works: costs[len(works)]


@pytest.mark.parametrize("costs, limit", [
    ({1: 1.0, 2: 2.2, 4: 5.0, 8: 12.0}, 1),  # bigger batches cost more per image: one at a time
    ({1: 1.0, 2: 1.0, 4: 1.2, 8: 4.0}, 4),  # cheapest per image at 4, and 8 is past the sweet spot
    ({1: 1.0, 2: 1.96, 4: 3.84, 8: 7.7}, 1),  # gains under 5% are not worth the wait
    ({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}, 8),
])
def test_cpu_batch_auto_keeps_the_cheapest_batch_per_image(ckpt, monkeypatch, costs, limit):
    engine = ServingEngine(ckpt, "tiny", device="cpu", backend=BACKEND, max_batch=8)
    monkeypatch.setattr(engine, "_timed", per_batch_seconds(costs))
    app = create_app(engine, ServeSettings(max_batch=8))
    with TestClient(app) as c:
        assert app.state.service.batcher.started.wait(60)
        assert c.get("/v1/info").json()["batch_limit"] == limit
    assert engine.batch_limit == limit and app.state.service.batcher.max_batch == limit
    assert set(engine.tuning_ms) <= set(costs) and engine.tuning_ms[1] == pytest.approx(1e3)


def test_cpu_batch_number_caps_batches_without_tuning(ckpt, monkeypatch):
    engine = ServingEngine(ckpt, "tiny", device="cpu", backend=BACKEND, max_batch=8, cpu_batch=2)
    monkeypatch.setattr(engine, "tune_cpu_batch", lambda: pytest.fail("tuned although --cpu-batch was given"))
    sizes = []
    app = create_app(engine, ServeSettings(max_batch=8, max_wait_ms=200))
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda works: sizes.append(len(works)) or real_run(works))
    with TestClient(app) as c:
        assert app.state.service.batcher.started.wait(60)
        sizes.clear()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda i: post(c, {"member": "0", "styles": "3"}), range(6)))
    assert all(a.status_code == 200 for a in answers)
    assert sizes and max(sizes) <= 2 and sum(sizes) == 6  # 6 requests, never more than 2 per batch


def test_cli_refuses_a_bad_cpu_batch(ckpt, capsys):
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--checkpoint", ckpt, "--cpu-batch", "many"])
    assert "expected 'auto' or a number" in capsys.readouterr().err
    assert serve_cli.run(parser.parse_args(["--checkpoint", ckpt, "--config", "tiny", "--cpu-batch", "0"])) == 2
    assert "--cpu-batch" in capsys.readouterr().err
