"""A real `council-fast serve` process on 127.0.0.1: `bench serve` end to end, bad inputs under load,
and graceful shutdown (SIGTERM finishes the queued requests)."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from _serving import make_checkpoint  # noqa: E402
from council_fast.cli import main  # noqa: E402
from council_fast.serving import loadtest  # noqa: E402

SERVER = ["--config", "tiny", "--backend", "reference", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("load-ckpt"))


def test_bad_inputs_under_load_get_4xx_and_good_ones_the_right_answer(ckpt):
    good, bad = loadtest.make_payloads(32, distinct=4)
    with loadtest.LocalServer(["--checkpoint", ckpt, *SERVER, *loadtest.SERVER_LIMITS, "--max-batch", "4"]) as server:
        r = loadtest.run_load(server, "t", 4, 5.0, clients=4, requests=48, duration=120, bad_fraction=0.25,
                              good=good, bad=bad)
        assert server.metrics()["council_fast_ready"] == 1  # still up
    assert r.failures == [] and r.wrong == 0 and r.other_errors == 0 and r.bad_not_4xx == 0
    assert r.requests == 48 and r.bad_4xx == 12 and r.ok == 36 and r.exact == 36  # batched == alone, to the byte
    assert set(r.status_counts) <= {"200", "400", "413", "422"} and r.status_counts["413"] >= 2  # bomb + oversize
    assert r.mean_batch_size is not None and r.mean_batch_size >= 1 and r.rss_mib


def test_sigterm_finishes_queued_requests(ckpt):
    body = loadtest.multipart({"member": "all", "styles": "4", "size": "64"}, loadtest._photo(1, 64, 64))
    with loadtest.LocalServer(["--checkpoint", ckpt, *SERVER, "--max-batch", "1"]) as server:
        def post():
            return loadtest._Client("127.0.0.1", server.port, 120).post(body)[0]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(post) for _ in range(6)]
            deadline = time.monotonic() + 60
            while server.metrics().get("council_fast_queue_depth", 0) < 2:  # requests are waiting in the queue
                assert time.monotonic() < deadline, "the requests never queued up"
                time.sleep(0.02)
            server.proc.send_signal(signal.SIGTERM)
            statuses = [a.result(120) for a in answers]
        # uvicorn re-raises the signal once it has shut down gracefully: the process ends "killed by SIGTERM"
        assert server.proc.wait(60) in (0, -signal.SIGTERM)
    assert statuses == [200] * 6


def test_bench_serve_command_writes_json(ckpt, tmp_path, capsys):
    out = tmp_path / "serve.json"
    status = main(["bench", "serve", "--config", "tiny", "--checkpoint", ckpt, "--backend", "reference",
                   "--device", "cpu", "--threads", "1", "--clients", "4", "--requests", "16", "--batch", "4",
                   "--bad-fraction", "0.25", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serve" and report["settings"]["clients"] == 4
    assert [r["max_batch"] for r in report["results"]] == [4, 1]
    for row in report["results"]:
        assert row["requests"] == 16 and row["ok"] == 12 and row["bad_4xx"] == 4 and row["p99_ms"] > 0
    assert report["speedup"] > 0 and "dynamic / max-batch-1" in printed
