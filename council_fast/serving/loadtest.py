"""`council-fast bench serve`: a bounded load test of `council-fast serve` on this machine.

The server runs as a child process (`python -m council_fast serve`, 127.0.0.1, a free port), once with
dynamic batching (--batch, default 32) and once with --max-batch 1, each for the same number of
requests (--requests) or until --duration seconds pass, whichever comes first, from --clients
concurrent clients (threads with keep-alive connections). Before the load, every distinct good
request is sent once alone; during the load every good answer must equal that answer byte for byte
("wrong" counts those that do not), and with --bad-fraction F that share of the requests are bad
inputs (not an image, truncated, a decompression bomb, an oversize upload, an unknown field, an
out-of-range value), each of which must get a 4xx. The server's resident memory is read from
/metrics about once a second. Only loopback traffic; every loop is bounded by count and time.

Result rows (JSON ``results``): name, max_batch, batch_limit (the server's cap after its warm-up: on the CPU
``--cpu-batch auto`` may set it below max_batch), max_wait_ms, clients, engine, requests (sent), ok (good
answered 200 and correct: equal to the answer alone, or at most one 8-bit level away in some pixels,
which is fp32 rounding at another batch size), exact (of those, byte for byte equal), wrong, bad_4xx,
bad_not_4xx, other_errors, status_counts, seconds,
throughput_rps (good answers per second), p50_ms / p95_ms / p99_ms / mean_ms (good requests),
mean_batch_size (from the server's batch-size histogram), rss_mib (samples, about one a second),
rss_growth_mib (the last sample minus the one a quarter into the run: the first quarter also warms up
the larger batch shapes). Top level: ``speedup`` (dynamic over max-batch 1 throughput)
and ``p99_ratio`` (dynamic p99 over max-batch 1 p99).
"""
from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from ..reference.networks import AdaINGen

__all__ = ["LoadResult", "Payload", "run_load", "LocalServer", "bench_serve", "make_payloads", "random_checkpoint"]

BOUNDARY = "council-fast-load-boundary"
SERVER_LIMITS = ["--max-upload-mb", "1", "--max-pixels", "4000000", "--max-styles", "4"]
BAD_KINDS = ("not an image", "truncated", "bomb", "oversize", "unknown field", "out of range")


@dataclass(frozen=True)
class Payload:
    body: bytes
    bad: str | None  # None for a good request, else what is wrong with it
    key: int = 0  # good requests: which distinct request (for the expected answer)


@dataclass
class LoadResult:
    name: str
    max_batch: int
    max_wait_ms: float
    clients: int
    engine: str | None = None  # as the server's /v1/info says (fused (cpu), reference, ...)
    batch_limit: int | None = None  # likewise
    requests: int = 0
    ok: int = 0
    exact: int = 0
    wrong: int = 0
    bad_4xx: int = 0
    bad_not_4xx: int = 0
    other_errors: int = 0
    status_counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    mean_batch_size: float | None = None
    rss_mib: list = field(default_factory=list)
    rss_growth_mib: float | None = None
    failures: list = field(default_factory=list)  # the first few problems, for the report


# --------------------------------------------------------------------------- requests

def multipart(fields: dict[str, str], image: bytes | None, filename: str = "photo.png") -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _photo(seed: int, w: int, h: int) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))


def make_payloads(size: int, distinct: int = 8) -> tuple[list[Payload], list[Payload]]:
    """(good, bad): ``distinct`` good requests (one member, one style, fixed seeds) and one of each bad kind."""
    good = [Payload(multipart({"member": "0", "seed": str(i), "format": "png", "size": str(size)},
                              _photo(i, size + 8 * (i % 3), size + 4 * (i % 2)), f"load{i}.png"), None, i)
            for i in range(distinct)]
    sample = _photo(0, size, size)
    bad_bodies = {
        "not an image": multipart({"member": "0"}, b"definitely not an image " * 20),
        "truncated": multipart({"member": "0"}, sample[: len(sample) // 2]),
        "bomb": multipart({"member": "0"}, _png(Image.new("RGB", (3000, 3000)))),
        "oversize": multipart({"member": "0"}, sample + bytes(1_200_000)),
        "unknown field": multipart({"member": "0", "colour": "red"}, sample),
        "out of range": multipart({"member": "0", "styles": "99"}, sample),
    }
    return good, [Payload(bad_bodies[kind], kind) for kind in BAD_KINDS]


class _Client:
    def __init__(self, host: str, port: int, timeout: float):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):  # one reconnect: the server may close a connection after an error answer
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", "/v1/translate", body,
                                  {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                response = self.conn.getresponse()
                data = response.read()
                if response.getheader("connection", "").lower() == "close":
                    self.close()
                return response.status, data
            except (ConnectionError, http.client.HTTPException, socket.timeout):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --------------------------------------------------------------------------- the server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class LocalServer:
    """`python -m council_fast serve ...` on 127.0.0.1 as a child process; stopped with SIGTERM (graceful)."""

    def __init__(self, serve_args: list[str], ready_timeout: float = 300.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "council_fast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                     "--log-level", "warning", *serve_args]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.TemporaryFile()

    def __enter__(self) -> "LocalServer":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.output()}")
            try:
                if _get(self.url + "/readyz", 2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server was not ready after {self.ready_timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics (name -> value)."""
        text = _get(self.url + "/metrics")[1].decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+) ([0-9.e+-]+)$", text, re.M)}

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# --------------------------------------------------------------------------- the load

def _expected_answers(server: LocalServer, good: list[Payload]) -> dict[int, bytes]:
    client = _Client("127.0.0.1", server.port, 120)
    try:
        answers = {}
        for p in good:
            status, body = client.post(p.body)
            if status != 200:
                raise RuntimeError(f"a good request failed alone with {status}: {body[:300]!r}")
            answers[p.key] = body
        return answers
    finally:
        client.close()


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_load(server: LocalServer, name: str, max_batch: int, max_wait_ms: float, clients: int, requests: int,
             duration: float, bad_fraction: float, good: list[Payload], bad: list[Payload]) -> LoadResult:
    """``requests`` requests from ``clients`` threads (or fewer, when ``duration`` runs out)."""
    expected = _expected_answers(server, good)
    before = server.metrics()
    result = LoadResult(name, max_batch, max_wait_ms, clients)
    info = json.loads(_get(server.url + "/v1/info")[1])
    result.engine, result.batch_limit = info.get("engine"), info.get("batch_limit")
    every = max(1, round(1 / bad_fraction)) if bad_fraction > 0 else 0
    counter, lock, latencies = itertools.count(), threading.Lock(), []
    status_counts: dict[int, int] = {}
    stop = threading.Event()
    deadline = time.monotonic() + duration

    def payload(i: int) -> Payload:
        if every and i % every == every - 1:
            return bad[(i // every) % len(bad)]
        return good[i % len(good)]

    def note_failure(text: str) -> None:
        if len(result.failures) < 10:
            result.failures.append(text)

    def client_loop() -> None:
        client = _Client("127.0.0.1", server.port, max(30.0, duration))
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter)
                if i >= requests:
                    return
                p = payload(i)
                start = time.monotonic()
                try:
                    status, body = client.post(p.body)
                except OSError as e:
                    with lock:
                        result.other_errors += 1
                        note_failure(f"request {i}: {type(e).__name__}: {e}")
                    continue
                elapsed = time.monotonic() - start
                with lock:
                    status_counts[status] = status_counts.get(status, 0) + 1
                    _score(result, p, status, body, expected, elapsed, latencies, note_failure)
        finally:
            client.close()

    rss = []
    sampler = threading.Thread(target=_sample_rss, args=(server, rss, stop), daemon=True)
    start = time.monotonic()
    sampler.start()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    result.seconds = time.monotonic() - start
    stop.set()
    sampler.join(10)
    after = server.metrics()
    result.requests = min(next(counter), requests)
    result.status_counts = {str(k): v for k, v in sorted(status_counts.items())}
    result.throughput_rps = result.ok / result.seconds if result.seconds > 0 else 0.0
    result.p50_ms, result.p95_ms, result.p99_ms = (_percentile(latencies, q) for q in (50, 95, 99))
    result.mean_ms = statistics.fmean(latencies) if latencies else None
    batches = after.get("council_fast_batch_size_count", 0) - before.get("council_fast_batch_size_count", 0)
    summed = after.get("council_fast_batch_size_sum", 0) - before.get("council_fast_batch_size_sum", 0)
    result.mean_batch_size = summed / batches if batches else None
    result.rss_mib = [round(v / 2 ** 20, 1) for v in rss]
    # growth over the last three quarters of the run (the first quarter warms up the larger batch shapes)
    result.rss_growth_mib = round((rss[-1] - rss[len(rss) // 4]) / 2 ** 20, 1) if len(rss) >= 2 else None
    return result


def _score(result: LoadResult, p: Payload, status: int, body: bytes, expected: dict, elapsed: float,
           latencies: list, note_failure) -> None:
    if p.bad is not None:
        if 400 <= status < 500:
            result.bad_4xx += 1
        else:
            result.bad_not_4xx += 1
            note_failure(f"bad input '{p.bad}' got {status}: {body[:200]!r}")
        return
    if status == 200 and body == expected[p.key]:
        result.ok += 1
        result.exact += 1
        latencies.append(elapsed * 1e3)
    elif status == 200 and _max_level_difference(body, expected[p.key]) <= 1:
        result.ok += 1  # fp32 rounding of a different batch size: a pixel rounds the other way
        latencies.append(elapsed * 1e3)
    elif status == 200:
        result.wrong += 1
        note_failure(f"good request {p.key}: answer differs from its answer alone by more than one level")
    else:
        result.other_errors += 1
        note_failure(f"good request {p.key} got {status}: {body[:200]!r}")


def _max_level_difference(png_a: bytes, png_b: bytes) -> int:
    """The largest difference of two PNGs' 8-bit values (255 when they cannot be compared)."""
    try:
        a, b = (np.asarray(Image.open(io.BytesIO(x)).convert("RGB"), dtype=np.int16) for x in (png_a, png_b))
    except OSError:
        return 255
    return int(np.abs(a - b).max()) if a.shape == b.shape else 255


def _sample_rss(server: LocalServer, out: list, stop: threading.Event) -> None:
    while True:
        try:
            value = server.metrics().get("process_resident_memory_bytes")
            if value is not None:
                out.append(value)
        except OSError:
            pass
        if stop.wait(1.0):
            return


# --------------------------------------------------------------------------- the benchmark

def random_checkpoint(config: dict, folder: str, seed: int = 0) -> str:
    """Official member files with random weights for ``config`` in ``folder``; returns their prefix."""

    n = config["council"]["council_size"]
    direction = "b2a" if config.get("do_b2a", True) else "a2b"
    dim = config["input_dim_b" if direction == "b2a" else "input_dim_a"]
    for i in range(n):
        torch.manual_seed(seed + i)
        gen = AdaINGen(dim, config["gen"])
        torch.save({direction: gen.state_dict()}, os.path.join(folder, f"{direction}_gen_{i}_00000001.pt"))
    return os.path.join(folder, "00000001")


def bench_serve(checkpoint: str, config: str | None, *, max_batch: int, max_wait_ms: float, clients: int,
                requests: int, duration: float, bad_fraction: float, size: int, server_args: list[str],
                progress=print) -> dict:
    """Both runs (dynamic batching, then --max-batch 1) against fresh servers; the JSON report's core."""
    good, bad = make_payloads(size)
    base = ["--checkpoint", checkpoint, *(["--config", config] if config else []), *SERVER_LIMITS, *server_args,
            "--max-wait-ms", str(max_wait_ms), "--max-queue", str(max(256, 2 * clients))]
    rows = []
    for name, batch in ((f"dynamic (max batch {max_batch})", max_batch), ("max batch 1", 1)):
        progress(f"bench serve: {name}: starting the server")
        with LocalServer([*base, "--max-batch", str(batch)]) as server:
            progress(f"bench serve: {name}: {requests} requests from {clients} clients (at most {duration:g} s)")
            rows.append(run_load(server, name, batch, max_wait_ms, clients, requests, duration, bad_fraction,
                                 good, bad))
    dyn, one = rows
    return {"results": [asdict(r) for r in rows],
            "speedup": dyn.throughput_rps / one.throughput_rps if one.throughput_rps else None,
            "p99_ratio": dyn.p99_ms / one.p99_ms if dyn.p99_ms and one.p99_ms else None}


def format_table(report: dict) -> str:
    header = ("run", "batch limit", "requests", "ok", "exact", "wrong", "bad 4xx", "bad !4xx", "errors", "req/s", "p50 ms", "p95 ms",
              "p99 ms", "mean batch", "rss growth MiB")
    lines = [header]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    for r in report["results"]:
        lines.append((r["name"], num(r["batch_limit"], "d"), r["requests"], r["ok"], r["exact"], r["wrong"], r["bad_4xx"], r["bad_not_4xx"], r["other_errors"],
                      num(r["throughput_rps"], ".3g"), num(r["p50_ms"], ".4g"), num(r["p95_ms"], ".4g"),
                      num(r["p99_ms"], ".4g"), num(r["mean_batch_size"], ".3g"), num(r["rss_growth_mib"], ".1f")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"dynamic / max-batch-1: throughput {num(report['speedup'], '.2f')}x, "
                f"p99 {num(report['p99_ratio'], '.2f')}x")
    for r in report["results"]:
        text += [f"{r['name']}: {f}" for f in r["failures"]]
    return "\n".join(text)


def passed(report: dict) -> bool:
    """Every good request answered correctly and every bad one refused with a 4xx, in both runs."""
    return all(r["wrong"] == 0 and r["bad_not_4xx"] == 0 and r["other_errors"] == 0 and r["ok"] > 0
               for r in report["results"])


def json_text(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"
