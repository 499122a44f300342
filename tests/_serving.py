"""Helpers for the serve tests: a tiny random checkpoint, photos as bytes, a real uvicorn on loopback."""
from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
import urllib.request

import numpy as np
import torch
from PIL import Image

from council_fast.config import packaged_config
from _tiny import tiny_generator

MEMBERS = (0, 1, 2)


def make_checkpoint(folder) -> str:
    """Official member files b2a_gen_{0,1,2}_00000010.pt of the tiny config with random weights;
    returns the prefix naming all three (pass --config tiny)."""
    cfg = packaged_config("tiny")
    for i in MEMBERS:
        torch.save({"b2a": tiny_generator(cfg, 200 + i).state_dict()}, f"{folder}/b2a_gen_{i}_00000010.pt")
    return f"{folder}/00000010"


def photo(seed: int = 0, w: int = 48, h: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 3] = (250, 20, 20)
    return Image.fromarray(arr)


def encoded(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def uvicorn_server(app, ready_timeout: float = 120.0):
    """Run ``app`` under a real uvicorn on 127.0.0.1 (ephemeral port) in a thread; yields its base URL
    once /readyz answers 200; shuts it down gracefully at exit."""
    import uvicorn

    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not _ready(url):
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"server at {url} not ready after {ready_timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
