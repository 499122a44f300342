"""The dynamic batcher on its own: batch forming, waiting, keys, failures, a full queue, draining."""
from __future__ import annotations

import threading
import time

import pytest

from council_fast.serving.batcher import Batcher, QueueFull, ShuttingDown


class Recorder:
    """run_batch that records each batch, optionally blocks until released, and fails on 'boom'."""

    def __init__(self, block: bool = False):
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not block:
            self.gate.set()

    def __call__(self, items):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        self.batches.append(list(items))
        if "boom" in items:
            raise RuntimeError("this batch failed")
        return [f"out:{item}" for item in items]


def test_each_item_gets_its_own_result_and_batches_respect_max_batch():
    run = Recorder(block=True)
    b = Batcher(run, max_batch=4, max_wait_s=0.05, max_queue=100).start()
    first = b.submit("warm")  # occupies the worker until the gate opens: the rest pile up
    assert run.entered.wait(10)
    futures = {i: b.submit(i) for i in range(10)}
    run.gate.set()
    assert first.result(10) == "out:warm"
    assert {i: f.result(10) for i, f in futures.items()} == {i: f"out:{i}" for i in range(10)}
    assert [len(batch) for batch in run.batches[1:]] == [4, 4, 2]
    assert [x for batch in run.batches[1:] for x in batch] == list(range(10))  # arrival order
    b.close()


def test_a_lone_item_waits_at_most_max_wait():
    run = Recorder()
    b = Batcher(run, max_batch=8, max_wait_s=0.2, max_queue=10).start()
    start = time.monotonic()
    assert b.submit("a").result(10) == "out:a"
    elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 5, elapsed  # it waited for company, then ran alone
    b.close()


def test_items_of_another_key_wait_for_their_own_batch():
    run = Recorder(block=True)
    b = Batcher(run, max_batch=8, max_wait_s=0.01, max_queue=100).start()
    b.submit("warm", key=0)
    assert run.entered.wait(10)
    futures = [b.submit(f"{k}-{i}", key=k) for i in range(3) for k in (32, 64)]
    run.gate.set()
    for f in futures:
        f.result(10)
    assert sorted(run.batches[1:]) == [["32-0", "32-1", "32-2"], ["64-0", "64-1", "64-2"]]
    b.close()


def test_a_failing_batch_fails_only_its_own_items():
    run = Recorder(block=True)
    sizes = []
    b = Batcher(run, max_batch=2, max_wait_s=0.01, max_queue=100, on_batch=lambda n, s, ok: sizes.append((n, ok)))
    b.start()
    b.submit("warm")
    assert run.entered.wait(10)
    doomed = [b.submit("boom"), b.submit("x")]  # one batch of two
    fine = [b.submit("y"), b.submit("z")]  # the next batch
    run.gate.set()
    for f in doomed:
        with pytest.raises(RuntimeError, match="this batch failed"):
            f.result(10)
    assert [f.result(10) for f in fine] == ["out:y", "out:z"]
    assert sizes == [(1, True), (2, False), (2, True)]
    b.close()


def test_full_queue_refuses_and_closing_drains_what_is_queued():
    run = Recorder(block=True)
    b = Batcher(run, max_batch=2, max_wait_s=0.0, max_queue=3).start()
    b.submit("warm")
    assert run.entered.wait(10)
    queued = [b.submit(i) for i in range(3)]
    with pytest.raises(QueueFull, match="3 requests waiting"):
        b.submit("one too many")
    closer = threading.Thread(target=b.close)  # graceful: waits for the queued items
    closer.start()
    time.sleep(0.05)
    with pytest.raises(ShuttingDown):
        b.submit("late")
    run.gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert [f.result(0) for f in queued] == ["out:0", "out:1", "out:2"]


def test_close_without_drain_fails_the_queued_items():
    run = Recorder(block=True)
    b = Batcher(run, max_batch=1, max_wait_s=0.0, max_queue=10).start()
    running = b.submit("warm")
    assert run.entered.wait(10)
    queued = b.submit("never")
    closer = threading.Thread(target=b.close, kwargs={"drain": False})
    closer.start()
    time.sleep(0.05)
    run.gate.set()
    closer.join(10)
    assert running.result(0) == "out:warm"
    with pytest.raises(ShuttingDown):
        queued.result(0)


def test_a_failed_warm_up_fails_requests_with_its_reason():
    def warm_up():
        raise RuntimeError("no kernels")
    b = Batcher(Recorder(), max_batch=2, max_wait_s=0.0, before_start=warm_up).start()
    assert b.started.wait(10)
    with pytest.raises(RuntimeError, match="warm up: no kernels"):
        b.submit("a").result(10)
    b.close()
