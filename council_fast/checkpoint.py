"""Checkpoints: the official per-member files, and council-fast's full training state.

Official format (what the published Council-GAN trainer writes and reads), per member ``i`` and
``n`` = iterations + 1::

    {dir}_gen_{i}_{n:08d}.pt          {dir: generator state dict}      dir = "a2b" or "b2a"
    {dir}_dis_{i}_{n:08d}.pt          {dir: discriminator state dict}
    {dir}_dis_council_{i}_{n:08d}.pt  {dir: council discriminator state dict}
    optimizer_{i}.pt                  {"gen", "dis", "dis_council"} optimizer state dicts

Full state (exact resume): one file ``state_{n:08d}.pt`` holding a dict with
``format = "council-fast-full"`` and ``version = 1`` (see ``FULL_STATE_KEYS``), plus ``latest.txt``
naming the newest one. Everything loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import glob
import json
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from .config import ConfigError, finish_config
from .fileio import atomic_files, atomic_torch_save, atomic_write_bytes

__all__ = [
    "CheckpointError", "GeneratorStates", "DIRECTIONS", "FULL_STATE_FORMAT", "FULL_STATE_VERSION",
    "FULL_STATE_KEYS", "load_file", "check_state_dict", "official_member_paths", "save_official",
    "load_generator_states", "save_full_state", "load_full_state", "full_state_path",
    "write_latest", "latest_full_state_path", "verify_archive", "check_resumable", "load_resume_state",
    "complete_iterations",
]

DIRECTIONS = ("a2b", "b2a")
NETWORK_KINDS = ("gen", "dis", "dis_council")
FULL_STATE_FORMAT = "council-fast-full"
FULL_STATE_VERSION = 1
# Keys every full-state checkpoint holds (the trainer may add more).
FULL_STATE_KEYS = ("format", "version", "config", "iteration", "engine", "networks")
LATEST_NAME = "latest.txt"
# Written after every file of an official snapshot is in place: {"iteration_plus_1", "council_size", ...}.
SNAPSHOT_MARKER = "snapshot_{n:08d}.json"
_MARKER_FILE = re.compile(r"^snapshot_(\d+)\.json$")
_STATE_FILE = re.compile(r"^state_(\d+)\.pt$")

_MEMBER_FILE = re.compile(r"^(a2b|b2a)_gen_(\d+)_(\d+)\.pt$")
_PREFIX = re.compile(r"^(?:(a2b|b2a)_)?(?:gen_)?(\d+)(?:\.pt)?$")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the message names the file."""


@dataclass
class GeneratorStates:
    """Generator weights of one direction, one state dict per council member (member order)."""
    direction: str
    states: list
    members: list
    config: dict | None
    source: str


# --------------------------------------------------------------------------- reading files

def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` on the CPU with ``weights_only=True``; any failure names the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    verify_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and unpickler errors all mean "bad file"
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt, truncated, or not a "
                              f"weights-only torch file): {type(e).__name__}: {e}") from None


def verify_archive(path: str | os.PathLike) -> None:
    """Check every entry of a zip-format torch file against its CRC-32 (torch.load does not).

    A damaged file is a CheckpointError naming the file and the damaged entry. Files in torch's legacy
    (non-zip) format carry no checksums and pass unchecked.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        return
    entry = None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                entry = info.filename
                with archive.open(info) as f:
                    while f.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as e:
        where = f" (entry {entry!r})" if entry else ""
        raise CheckpointError(f"{path}: damaged checkpoint{where}: {e}; the file's own checksum does not match "
                              f"its contents (disk or copy error): use another copy or an earlier "
                              f"checkpoint") from None


def _shape(t) -> tuple | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _first(items: list[str], sep: str, shown: int = 8) -> str:
    """The first few of a long key list (a mismatched config can make hundreds)."""
    more = f"{sep}... and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


def check_state_dict(module: torch.nn.Module, state_dict: Mapping, source: str) -> None:
    """Load ``state_dict`` into ``module`` strictly; on mismatch list every bad key."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{source}: expected a state dict (mapping of names to tensors), "
                              f"got {type(state_dict).__name__}")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: expected {tuple(v.shape)}, found {_shape(state_dict[k])}"
                 for k, v in expected.items() if k in state_dict and _shape(state_dict[k]) != tuple(v.shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_first(missing, ', ')}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected, ', ')}")
        if misshaped:
            parts.append(f"mis-shaped keys ({len(misshaped)}): {_first(misshaped, '; ')}")
        hint = (" -- do the config's network sizes match this checkpoint?" if misshaped or (missing and unexpected)
                else "")
        raise CheckpointError(f"{source}: state dict does not fit {type(module).__name__}: "
                              + " | ".join(parts) + hint)
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------- official format

def official_member_paths(out_dir: str | os.PathLike, iteration_plus_1: int, council_size: int,
                          direction: str) -> list[dict[str, str]]:
    """Per member: {"gen", "dis", "dis_council", "optimizer"} -> path, named the official way."""
    _check_direction(direction)
    out_dir = os.fspath(out_dir)
    n = int(iteration_plus_1)
    return [{kind: os.path.join(out_dir, f"{direction}_{kind}_{i}_{n:08d}.pt") for kind in NETWORK_KINDS}
            | {"optimizer": os.path.join(out_dir, f"optimizer_{i}.pt")}
            for i in range(council_size)]


def save_official(out_dir: str | os.PathLike, iteration_plus_1: int,
                  networks: Mapping[str, Mapping[str, list]],
                  optimizers: list[Mapping[str, Any]] | None = None) -> list[str]:
    """Write official per-member files atomically; returns the paths written.

    ``networks[direction][kind]`` is a list of state dicts in member order, ``kind`` in
    gen / dis / dis_council (dis_council may be absent, as when council_w is 0).
    ``optimizers[i]`` is {"gen", "dis"[, "dis_council"]} optimizer state dicts of member i.

    All files are written under temporary names first and renamed into place only when every one is
    written (optimizers first, so a reader that sees any generator of the snapshot also sees the council
    size), then a marker ``snapshot_<n>.json`` says the snapshot is complete. A kill at any point leaves
    either the previous snapshots only or an incomplete one that readers skip (:func:`complete_iterations`).
    """
    out_dir = os.fspath(out_dir)
    n = int(iteration_plus_1)
    sizes = {len(kinds["gen"]) for kinds in networks.values()}
    written = []
    with atomic_files() as group:
        for i, opt in enumerate(optimizers or []):
            path = os.path.join(out_dir, f"optimizer_{i}.pt")
            group.torch_save(dict(opt), path)
            written.append(path)
        for direction, kinds in networks.items():
            paths = official_member_paths(out_dir, n, len(kinds["gen"]), direction)
            for kind in NETWORK_KINDS:
                for i, sd in enumerate(kinds.get(kind) or []):
                    group.torch_save({direction: sd}, paths[i][kind])
                    written.append(paths[i][kind])
    marker = {"format": FULL_STATE_FORMAT, "iteration_plus_1": n, "council_size": max(sizes, default=0),
              "directions": sorted(networks), "files": [os.path.basename(p) for p in written]}
    atomic_write_bytes(os.path.join(out_dir, SNAPSHOT_MARKER.format(n=n)), json.dumps(marker, indent=1).encode())
    return written


def _check_direction(direction: str | None) -> None:
    if direction is not None and direction not in DIRECTIONS:
        raise CheckpointError(f"direction must be 'a2b' or 'b2a', got {direction!r}")


def _pick_direction(available: Iterable[str], direction: str | None, source: str) -> str:
    available = sorted(set(available))
    if direction is not None:
        if direction not in available:
            raise CheckpointError(f"{source}: holds no {direction} generator (it has: "
                                  f"{', '.join(available) or 'none'})")
        return direction
    if len(available) == 1:
        return available[0]
    if not available:
        raise CheckpointError(f"{source}: holds no 'a2b' or 'b2a' generator")
    raise CheckpointError(f"{source}: holds generators for both a2b and b2a; pass --direction a2b or "
                          f"--direction b2a to choose")


def _load_member_file(path: str, direction: str | None) -> GeneratorStates:
    obj = load_file(path)
    if isinstance(obj, dict) and obj.get("format") == FULL_STATE_FORMAT:
        return _generators_from_full_state(_check_full_state(obj, path), path, direction)
    if not isinstance(obj, dict) or not any(k in obj for k in DIRECTIONS):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not an official generator file (expected a dict with key 'a2b' or "
                              f"'b2a', found {keys})")
    chosen = _pick_direction([k for k in DIRECTIONS if k in obj], direction, path)
    match = _MEMBER_FILE.match(os.path.basename(path))
    member = int(match.group(2)) if match else 0
    return GeneratorStates(chosen, [obj[chosen]], [member], None, path)


def _find_official_generators(folder: str, n: int | None) -> dict[str, dict[int, dict[int, str]]]:
    """{direction: {iteration: {member: path}}} for every official generator file in ``folder``."""
    found: dict[str, dict[int, dict[int, str]]] = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "*_gen_*_*.pt")):
        m = _MEMBER_FILE.match(os.path.basename(path))
        if m and (n is None or int(m.group(3)) == n):
            found.setdefault(m.group(1), {}).setdefault(int(m.group(3)), {})[int(m.group(2))] = path
    return found


def _markers(folder: str) -> dict[int, dict]:
    """{iteration + 1: marker contents} of the snapshot markers in ``folder`` (unreadable ones count empty)."""
    found = {}
    for name in os.listdir(folder):
        m = _MARKER_FILE.match(name)
        if m:
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    found[int(m.group(1))] = json.load(f)
            except (OSError, ValueError):
                found[int(m.group(1))] = {}
    return found


def _council_size(folder: str, by_iter: dict[int, dict[int, str]], markers: dict[int, dict]) -> int:
    """How many members a complete snapshot in ``folder`` has: the most any snapshot, marker or
    optimizer_<i>.pt file shows (official runs write optimizer_<i>.pt for every member)."""
    optimizers = sum(1 for name in os.listdir(folder) if re.match(r"^optimizer_\d+\.pt$", name))
    sizes = [len(members) for members in by_iter.values()] + [optimizers]
    sizes += [m.get("council_size", 0) for m in markers.values() if isinstance(m.get("council_size", 0), int)]
    return max(sizes)


def complete_iterations(folder: str | os.PathLike, direction: str) -> tuple[list[int], dict[int, list[int]], int]:
    """(complete iterations + 1, sorted; {every iteration + 1: its members}; the council size) of the
    official ``direction`` generator files in ``folder``.

    An iteration is complete when every member 0..size-1 is there and, where council-fast wrote the
    folder (snapshot markers present), its marker too (iterations older than the first marker need none).
    """
    folder = os.fspath(folder)
    by_iter = _find_official_generators(folder, None).get(direction, {})
    markers = _markers(folder)
    size = _council_size(folder, by_iter, markers)
    members = {n: sorted(m) for n, m in by_iter.items()}
    full = [n for n, m in members.items() if m == list(range(size))]
    if markers:  # snapshots from before markers were written (an older council-fast) stay readable
        full = [n for n in full if n in markers or n < min(markers)]
    return sorted(full), members, size


def _missing(members: list[int], size: int) -> str:
    return ", ".join(str(i) for i in range(size) if i not in members)


def _complete_iteration(folder: str, direction: str, n: int | None, source: str) -> int:
    """The iteration (+ 1) to read: ``n`` if complete (else an error), or the newest complete one."""
    full, members, size = complete_iterations(folder, direction)
    if n is not None:
        if n not in full:
            have = ", ".join(map(str, members.get(n, [])))
            raise CheckpointError(f"{source}: the council at {n:08d} is incomplete: it has member(s) {have} "
                                  f"of {size} (missing {_missing(members.get(n, []), size) or 'its completion marker'}"
                                  f"; a save was interrupted)" + (f"; the newest complete one is "
                                  f"{os.path.join(folder, f'{full[-1]:08d}')}" if full else ""))
        return n
    if not full:
        raise CheckpointError(f"{source}: no complete council of {size} {direction} generators in the folder "
                              f"(iterations found: {', '.join(f'{k:08d}' for k in sorted(members))}; "
                              f"a save was interrupted)")
    newest = max(members)
    if full[-1] != newest:
        warnings.warn(f"{source}: the newest snapshot {newest:08d} is incomplete ({len(members[newest])} of {size} "
                      f"members; a save was interrupted); using {full[-1]:08d}, the newest complete council",
                      stacklevel=3)
    return full[-1]


def _load_members(found: dict, direction: str | None, n: int | None, source: str, folder: str) -> GeneratorStates:
    chosen = _pick_direction(found.keys(), direction, source)
    by_iter = _find_official_generators(folder, None)[chosen]
    n = _complete_iteration(folder, chosen, n, source)
    members = sorted(by_iter[n])
    states = []
    for i in members:
        obj = load_file(by_iter[n][i])
        if not isinstance(obj, dict) or chosen not in obj:
            raise CheckpointError(f"{by_iter[n][i]}: expected a dict with key {chosen!r}")
        states.append(obj[chosen])
    return GeneratorStates(chosen, states, members, None, os.path.join(folder, f"{n:08d}"))


def load_generator_states(checkpoint: str | os.PathLike, direction: str | None = None) -> GeneratorStates:
    """Generator weights from any checkpoint council-fast knows.

    ``checkpoint`` may be an official member file (``.../b2a_gen_3_01000000.pt``), an official
    prefix naming every member of one iteration (``.../01000000`` or ``.../gen_01000000``, the
    folder + iteration the official test script takes), a folder (its newest official iteration, or
    else its newest full state), or a council-fast full-state file.
    """
    _check_direction(direction)
    path = os.fspath(checkpoint)
    if os.path.isfile(path):
        return _load_member_file(path, direction)
    if os.path.isdir(path):
        found = _find_official_generators(path, None)
        if found:
            return _load_members(found, direction, None, path, path)
        latest = latest_full_state_path(path)
        if latest is not None:
            return _load_member_file(latest, direction)
        raise CheckpointError(f"{path}: folder holds no official generator files ({{a2b,b2a}}_gen_<i>_<n>.pt) "
                              f"and no council-fast full state (state_<n>.pt / {LATEST_NAME})")
    folder, tail = os.path.split(path)
    folder = folder or "."
    m = _PREFIX.match(tail)
    if m is None or not os.path.isdir(folder):
        raise CheckpointError(f"{path}: no such checkpoint file, folder, or official prefix "
                              f"(e.g. checkpoints/01000000 or checkpoints/gen_01000000)")
    n = int(m.group(2))
    direction = direction or m.group(1)
    found = _find_official_generators(folder, n)
    if not found:
        raise CheckpointError(f"{path}: no official generator files match; looked for "
                              f"{os.path.join(folder, f'{{a2b,b2a}}_gen_<member>_{n:08d}.pt')}")
    return _load_members(found, direction, n, path, folder)


# --------------------------------------------------------------------------- full state

def full_state_path(checkpoint_dir: str | os.PathLike, iteration: int) -> str:
    return os.path.join(os.fspath(checkpoint_dir), f"state_{int(iteration):08d}.pt")


def save_full_state(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a full training state atomically (format and version are filled in)."""
    state = dict(state)
    state["format"] = FULL_STATE_FORMAT
    state["version"] = FULL_STATE_VERSION
    missing = [k for k in FULL_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{os.fspath(path)}: full state lacks {', '.join(missing)}")
    atomic_torch_save(state, path)


def _check_full_state(obj: Any, path: str) -> dict:
    if not isinstance(obj, dict) or obj.get("format") != FULL_STATE_FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a council-fast full-state checkpoint (format {found!r}, "
                              f"expected {FULL_STATE_FORMAT!r})")
    if obj.get("version") != FULL_STATE_VERSION:
        raise CheckpointError(f"{path}: full-state version {obj.get('version')!r} is not supported "
                              f"(this council-fast reads version {FULL_STATE_VERSION})")
    missing = [k for k in FULL_STATE_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: full-state checkpoint lacks {', '.join(missing)}")
    iteration = obj["iteration"]
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"{path}: field 'iteration' must be a non-negative integer, got {iteration!r}")
    if not isinstance(obj["config"], dict) or not obj["config"]:
        raise CheckpointError(f"{path}: field 'config' must be a non-empty mapping (the run's config), "
                              f"got {obj['config']!r:.80}")
    if not isinstance(obj["networks"], dict) or not obj["networks"]:
        raise CheckpointError(f"{path}: field 'networks' must be a non-empty mapping of directions, "
                              f"got {obj['networks']!r:.80}")
    return obj


# What a resume restores besides the networks: field -> what it must be.
_RNG_FIELDS = {"torch_cpu": torch.Tensor, "python": dict, "numpy": dict, "noise": torch.Tensor, "choices": dict}


def _field_error(path: str, field: str, expected: str, found: Any) -> CheckpointError:
    shown = type(found).__name__ if not isinstance(found, (int, float, str, list, dict)) else repr(found)[:80]
    return CheckpointError(f"{path}: field {field!r} must be {expected}, got {shown}; the state cannot be "
                           f"resumed (damaged or written by other code)")


def _check_optimizers(state: dict, path: str, size: int) -> None:
    optimizers = state.get("optimizers")
    if not isinstance(optimizers, list) or len(optimizers) != size:
        raise _field_error(path, "optimizers", f"a list of {size} per-member optimizer states", optimizers)
    kinds = ("gen", "dis") + (("dis_council",) if any("dis_council" in n for n in state["networks"].values()
                                                      if isinstance(n, dict)) else ())
    for i, opt in enumerate(optimizers):
        for kind in kinds:
            sd = opt.get(kind) if isinstance(opt, dict) else None
            if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict) \
                    or not isinstance(sd.get("param_groups"), list) or not sd["param_groups"]:
                raise _field_error(path, f"optimizers[{i}][{kind!r}]", "an optimizer state dict "
                                   "(state, param_groups)", sd)


def _check_rng(state: dict, path: str) -> None:
    rng = state.get("rng")
    if not isinstance(rng, dict):
        raise _field_error(path, "rng", "a mapping of random-generator states", rng)
    for key, kind in _RNG_FIELDS.items():
        if not isinstance(rng.get(key), kind):
            raise _field_error(path, f"rng[{key!r}]", f"a {kind.__name__}", rng.get(key))


def check_resumable(state: dict, path: str) -> dict:
    """Check the fields a resume restores (config, optimizers, schedulers, loss histories, RNG states)
    beyond those every full state has; CheckpointError naming the file and the field. Returns ``state``
    with its config filled in and validated."""
    try:
        state["config"] = finish_config(state["config"], f"{path} [config]")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    size = state["config"]["council"]["council_size"]
    _check_optimizers(state, path, size)
    schedulers = state.get("schedulers")
    if not isinstance(schedulers, list) or len(schedulers) != size or not all(isinstance(s, dict) for s in schedulers):
        raise _field_error(path, "schedulers", f"a list of {size} per-member scheduler states", schedulers)
    if not isinstance(state.get("loss_history"), dict):
        raise _field_error(path, "loss_history", "a mapping of loss histories", state.get("loss_history"))
    _check_rng(state, path)
    return state


def load_resume_state(path: str | os.PathLike) -> dict:
    """A full state checked for an exact resume (:func:`check_resumable`)."""
    path = os.fspath(path)
    return check_resumable(load_full_state(path), path)


def load_full_state(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    return _check_full_state(load_file(path), path)


def _generators_from_full_state(state: dict, path: str, direction: str | None) -> GeneratorStates:
    networks = state["networks"]
    chosen = _pick_direction([d for d in DIRECTIONS if d in networks], direction, path)
    gens = networks[chosen]["gen"]
    return GeneratorStates(chosen, list(gens), list(range(len(gens))), state.get("config"), path)


def write_latest(checkpoint_dir: str | os.PathLike, state_path: str | os.PathLike) -> None:
    """Point ``latest.txt`` in ``checkpoint_dir`` at ``state_path`` (atomically)."""
    atomic_write_bytes(os.path.join(os.fspath(checkpoint_dir), LATEST_NAME),
                       (os.path.basename(os.fspath(state_path)) + "\n").encode())


def latest_full_state_path(checkpoint_dir: str | os.PathLike) -> str | None:
    """The full state ``latest.txt`` names, else the highest ``state_<n>.pt``; None when none."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    pointer = os.path.join(checkpoint_dir, LATEST_NAME)
    if os.path.isfile(pointer):
        return _follow_latest(checkpoint_dir, pointer)
    states = []
    for path in glob.glob(os.path.join(glob.escape(checkpoint_dir), "state_*.pt")):
        m = _STATE_FILE.match(os.path.basename(path))
        if m:
            states.append((int(m.group(1)), path))
    return max(states)[1] if states else None


def _follow_latest(checkpoint_dir: str, pointer: str) -> str:
    """The state latest.txt names: a state_<n>.pt file in the same folder, nothing else."""
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: cannot read ({e})") from None
    if not _STATE_FILE.match(name):
        raise CheckpointError(f"{pointer}: names {name[:200]!r}, which is not a state_<n>.pt file in "
                              f"{checkpoint_dir} (latest.txt only points inside its own folder)")
    path = os.path.join(checkpoint_dir, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{pointer}: names {name!r}, which does not exist")
    return path
