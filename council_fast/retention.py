"""Which snapshots a training run keeps (`train --keep-last N`).

A run writes, per snapshot, the official per-member files (``{a2b,b2a}_{gen,dis,dis_council}_<i>_<n>.pt``,
n = iteration + 1) and a full state (``state_<n>.pt``, n = iteration). Left alone they pile up (a
default-size full state is 1.5 GB). :func:`prune_snapshots` keeps the files of the newest ``keep``
snapshot iterations of each kind and deletes older ones; it never deletes the newest complete official
iteration (every member's generator present), the full state ``latest.txt`` names, or the
``optimizer_<i>.pt`` files (one per member, overwritten in place). ``keep`` 0 keeps everything.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict

__all__ = ["DEFAULT_KEEP_LAST", "prune_snapshots", "snapshot_files"]

DEFAULT_KEEP_LAST = 3
_OFFICIAL = re.compile(r"^(a2b|b2a)_(gen|dis|dis_council)_(\d+)_(\d{8,})\.pt$")
_STATE = re.compile(r"^state_(\d+)\.pt$")
_LATEST = "latest.txt"


def snapshot_files(checkpoint_dir: str) -> tuple[dict[int, list[str]], dict[int, list[str]], dict[int, set]]:
    """(official files by iteration, full states by iteration, generator members by iteration)."""
    official, states, members = defaultdict(list), defaultdict(list), defaultdict(set)
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        if m := _OFFICIAL.match(name):
            official[int(m.group(4))].append(path)
            if m.group(2) == "gen":
                members[int(m.group(4))].add((m.group(1), int(m.group(3))))
        elif m := _STATE.match(name):
            states[int(m.group(1))].append(path)
    return dict(official), dict(states), dict(members)


def _latest_named(checkpoint_dir: str) -> str | None:
    try:
        with open(os.path.join(checkpoint_dir, _LATEST), encoding="utf-8") as f:
            return os.path.join(checkpoint_dir, f.read().strip())
    except OSError:
        return None


def prune_snapshots(checkpoint_dir: str, keep: int, council_size: int | None = None) -> list[str]:
    """Delete snapshot files older than the newest ``keep`` iterations (see the module doc); returns them.

    ``council_size``: members per direction of a complete official iteration (default: the most any
    iteration has)."""
    if keep < 0:
        raise ValueError(f"--keep-last must not be negative, got {keep}")
    if keep == 0 or not os.path.isdir(checkpoint_dir):
        return []
    official, states, members = snapshot_files(checkpoint_dir)
    size = council_size or max((len({i for _, i in m}) for m in members.values()), default=0)
    complete = [n for n, m in members.items() if len({i for _, i in m}) >= size]
    protected = {max(complete)} if complete else set()
    removed = []
    for n in sorted(official)[:-keep]:
        if n not in protected:
            removed += official[n]
    latest = _latest_named(checkpoint_dir)
    for n in sorted(states)[:-keep]:
        removed += [p for p in states[n] if p != latest]
    for path in removed:
        os.unlink(path)
    return removed
