"""Say what a JIT build of the C++ kernels does while it runs (it takes minutes the first time).

torch's extension tooling compiles silently. :func:`announced_build` wraps the call that builds or
loads an extension: when it has not returned after ``announce_after_s`` (a cached build loads in well
under that), it prints on stderr what is being built, why, and where the result is cached; then a line
per object file as ninja finishes it (the build folder is polled for files newer than the start), a
line every ``heartbeat_s`` seconds while files are still compiling, and at the end how long it took.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator, Sequence

__all__ = ["announced_build", "object_name"]


def object_name(source: str) -> str:
    """The object file torch's ninja build writes for a source file."""
    stem = os.path.splitext(os.path.basename(source))[0]
    return f"{stem}.cuda.o" if source.endswith(".cu") else f"{stem}.o"


class _Watcher(threading.Thread):
    def __init__(self, header: str, build_dir: str, sources: Sequence[str], announce_after_s: float,
                 heartbeat_s: float, poll_s: float, stream):
        super().__init__(daemon=True)
        self.header, self.build_dir, self.sources, self.stream = header, build_dir, list(sources), stream
        self.announce_after_s, self.heartbeat_s, self.poll_s = announce_after_s, heartbeat_s, poll_s
        self.stop = threading.Event()
        self.announced = False
        self.start_wall, self.start_time = time.time(), time.monotonic()

    def say(self, text: str) -> None:
        print(f"council-fast: {text}", file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def _fresh(self, obj: str) -> bool:
        try:
            return os.path.getmtime(os.path.join(self.build_dir, obj)) >= self.start_wall - 1.0
        except OSError:
            return False

    def run(self) -> None:
        if self.stop.wait(self.announce_after_s):
            return
        self.announced = True
        self.say(self.header)
        pending = {object_name(s): os.path.basename(s) for s in self.sources}
        last = time.monotonic()
        while not self.stop.wait(self.poll_s):
            for obj in sorted(o for o in pending if self._fresh(o)):
                self.say(f"  compiled {pending.pop(obj)} ({len(self.sources) - len(pending)}/{len(self.sources)}, "
                         f"{self.elapsed():.0f} s)")
                last = time.monotonic()
            if time.monotonic() - last >= self.heartbeat_s:
                self.say(f"  still building ({self.elapsed():.0f} s): {', '.join(sorted(pending.values())) or 'linking'}")
                last = time.monotonic()


@contextlib.contextmanager
def announced_build(name: str, sources: Sequence[str], build_dir: str, why: str, announce_after_s: float = 2.0,
                    heartbeat_s: float = 30.0, poll_s: float = 1.0, stream=None) -> Iterator[None]:
    """Wrap the call that builds (or loads the cached) extension ``name`` from ``sources`` in ``build_dir``."""
    header = (f"building the C++ kernels {name} {why}: {len(sources)} files "
              f"({', '.join(os.path.basename(s) for s in sources)}). This happens once for these sources "
              f"and takes 1-5 minutes; the result is cached in {build_dir} (TORCH_EXTENSIONS_DIR moves the cache)")
    watcher = _Watcher(header, build_dir, sources, announce_after_s, heartbeat_s, poll_s, stream or sys.stderr)
    watcher.start()
    try:
        yield
    finally:
        watcher.stop.set()
        watcher.join()
    if watcher.announced:
        watcher.say(f"built {name} in {watcher.elapsed():.0f} s")
