"""Translate image files and folders with trained Council-GAN generators.

Inputs are files, folders (searched recursively) or glob patterns of jpg/jpeg/png/webp/bmp images.
Each input is resized (shorter side to --size, default the config's new_size) and centre-cropped
as the official test transform does, encoded once per council member, and decoded once per style
code z ~ N(0, I). Outputs go to --output as ``<name>_m<member>_s<style>.png``, keeping the
sub-folders of folder inputs. Decoding and resizing run in worker threads ahead of the model and
PNG encoding behind it. An input's style codes (and, with --member random, its member) depend only
on --seed and its output name, so a run repeats exactly. An unreadable input is reported by name
and skipped; the others still convert and the exit status is 1 (2 when nothing could start: bad
arguments, config or checkpoint, as for every council-fast command).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import sys
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .cuda_graphs import GraphedCall
from .images import IMAGE_EXTENSIONS, ImageReadError, open_rgb, save_grid, save_image, test_transform

__all__ = ["ConvertError", "InputItem", "ConversionReport", "Converter", "LoadedModel", "find_inputs",
           "plan_outputs", "load_model", "build_generator", "fast_generator_class", "convert_paths",
           "resolve_device", "autocast_context", "check_precision", "output_name", "PRECISIONS", "ENGINE_BACKENDS", "GRID_NAME"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENGINE_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
GRID_NAME = "contact_sheet.png"
EXIT_FATAL = 2  # nothing could start (bad arguments, config, checkpoint, inputs): as argparse, train, parity
EXIT_SOME_FAILED = 1  # it ran, but some inputs failed


class ConvertError(ValueError):
    """The conversion cannot start (bad option, no inputs, unusable model); the message says why."""


# --------------------------------------------------------------------------- devices and precision

def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConvertError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConvertError(f"--device {name}: only cpu and cuda are supported")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ConvertError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp16" and device.type == "cpu":
        raise ConvertError("fp16 runs on CUDA only; on the CPU use --precision bf16 or fp32")


def autocast_context(device: torch.device, precision: str):
    """Autocast to bf16/fp16 (fp32 runs as is)."""
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


# --------------------------------------------------------------------------- finding inputs

@dataclass(frozen=True)
class InputItem:
    """One input file and where its outputs go: ``rel`` is the output stem relative to --output."""
    path: str
    rel: str


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str, skip: set[str]) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) not in skip)
        for name in sorted(files):
            if _is_image_name(name):
                yield os.path.join(root, name)


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def find_inputs(specs: Sequence[str], exclude_dirs: Iterable[str] = ()) -> tuple[list[InputItem], list[str]]:
    """Expand files, folders and globs into input items (sorted, each file once).

    Returns (items, problems): a path that does not exist is still an item (it fails by name when
    read, so it counts as a failed input); a glob or folder that matches no image is a problem.
    ``exclude_dirs`` (the output folder) are not searched, so outputs never become inputs.
    """
    skip = {os.path.realpath(d) for d in exclude_dirs}
    items: list[InputItem] = []
    problems: list[str] = []
    seen: set[str] = set()

    def add(path: str, rel: str) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            items.append(InputItem(path, rel))

    for spec in specs:
        if os.path.isdir(spec):
            found = list(_walk_images(spec, skip))
            for path in found:
                add(path, os.path.splitext(os.path.relpath(path, spec))[0])
            if not found:
                problems.append(f"{spec}: folder holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images")
        elif os.path.isfile(spec) or not glob.has_magic(spec):
            add(spec, _stem(spec))  # a missing or non-image file fails later, by name
        else:
            matches = sorted(glob.glob(spec, recursive=True))
            files = [m for m in matches if os.path.isfile(m) and _is_image_name(m)]
            for folder in (m for m in matches if os.path.isdir(m)):
                files += list(_walk_images(folder, skip))
            for path in files:
                add(path, _stem(path))
            if not files:
                problems.append(f"{spec}: pattern matches no images")
    return items, problems


def output_name(rel: str, member: int, style: int, mask: bool = False) -> str:
    return f"{rel}_m{member}_s{style}{'_mask' if mask else ''}.png"


def plan_outputs(items: Sequence[InputItem], output_dir: str, members: Sequence[int],
                 styles: int) -> list[InputItem]:
    """Give every item a unique output stem whose outputs can never overwrite an input file.

    Two inputs with one stem (``a.jpg`` and ``a.png``, or the same name in two folders) become
    ``a`` and ``a_2``.
    """
    natural = {item.rel.casefold() for item in items}
    root = _path_key(output_dir)
    inputs = {k for k in (_path_key(item.path) for item in items) if k.startswith(root + os.sep)}
    used: set[str] = set()
    planned = []
    for item in items:
        rel, n = item.rel, 1
        while rel.casefold() in used or (n > 1 and rel.casefold() in natural) or \
                (inputs and _names_an_input(root, rel, members, styles, inputs)):
            n += 1
            rel = f"{item.rel}_{n}"
        used.add(rel.casefold())
        planned.append(InputItem(item.path, rel))
    return planned


def _path_key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _names_an_input(root: str, rel: str, members: Sequence[int], styles: int, inputs: set[str]) -> bool:
    return any(os.path.normcase(os.path.join(root, output_name(rel, m, s, mask))) in inputs
               for m in members for s in range(styles) for mask in (False, True))


# --------------------------------------------------------------------------- building generators

def fast_generator_class():
    """The fused engine's FastGenerator class; raises ConvertError saying why it is unavailable."""
    try:
        from .lowering import FastGenerator
    except ImportError as e:
        raise ConvertError(f"the fused engine is not available in this build "
                           f"(council_fast.lowering cannot be imported: {e})") from None
    return FastGenerator


def runs_in_parameter_dtype(gen: torch.nn.Module) -> bool:
    """True for the fused engine (it computes in its parameters' dtype, so it is cast, not autocast)."""
    try:
        return isinstance(gen, fast_generator_class())
    except ConvertError:
        return False


def build_generator(input_dim: int, gen_params: dict, backend: str = "auto",
                    device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """A generator with the reference state-dict layout; returns (module, engine description)."""
    from .reference.networks import AdaINGen

    if backend not in ENGINE_BACKENDS:
        raise ConvertError(f"--backend must be one of {', '.join(ENGINE_BACKENDS)}, not {backend!r}")
    if backend == "reference":
        return AdaINGen(input_dim, gen_params), "reference"
    try:
        fast = fast_generator_class()
    except ConvertError:
        if backend == "auto":
            return AdaINGen(input_dim, gen_params), "reference (fused engine not available)"
        raise
    try:
        module = fast(input_dim, gen_params, backend=None if backend == "auto" else backend)
        if backend != "auto":  # a back-end asked for by name must run here: find out before any work
            from .ops import resolve_backend
            resolve_backend(backend, torch.device(device))
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, build failures: all mean "cannot run"
        if backend == "auto":
            return AdaINGen(input_dim, gen_params), f"reference (the fused engine cannot run here: {e})"
        raise ConvertError(f"--backend {backend}: the fused engine cannot run here: {e}") from None
    return module, f"fused ({_kernel_backend(module, device)})"


def _kernel_backend(module: torch.nn.Module, device) -> str:
    """The kernel back-end the fused engine will use on ``device`` (for messages)."""
    from .ops import resolve_backend

    try:
        return resolve_backend(getattr(module, "backend", None), torch.device(device),
                               getattr(module, "strict", None))
    except Exception as e:  # noqa: BLE001 - the engine itself reports this when it runs
        return f"back-end unresolved: {e}"


@dataclass
class LoadedModel:
    config: dict
    direction: str
    generators: dict[int, torch.nn.Module]  # member index -> generator, weights loaded, eval mode
    engine: str
    source: str


def _resolve_config(config_arg: str | None, carried: dict | None, source: str) -> dict:
    from .config import load_config, validate_config

    if config_arg is not None:
        return load_config(config_arg)
    if carried is None:
        raise ConvertError(f"{source}: an official checkpoint carries no config; pass --config "
                           f"(a YAML file, or 'selfie2anime' for the released weights)")
    validate_config(carried, f"{source} (embedded config)")
    return carried


def _config_beside(checkpoint: str) -> dict | None:
    """The config of a council-fast full state in the checkpoint's folder (a training run's
    checkpoints/ holds both official files and full states), or None."""
    from .checkpoint import CheckpointError, latest_full_state_path, load_full_state

    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    try:
        path = latest_full_state_path(folder)
        return load_full_state(path)["config"] if path else None
    except (CheckpointError, KeyError):
        return None


def _select_members(available: Sequence[int], member: str) -> list[int]:
    if member in ("all", "random"):
        return list(available)
    try:
        k = int(member)
    except ValueError:
        raise ConvertError(f"--member must be a member index, 'all' or 'random', not {member!r}") from None
    if k not in available:
        raise ConvertError(f"--member {k}: the checkpoint holds members {', '.join(map(str, available))}")
    return [k]


def load_model(checkpoint: str, config: str | None = None, direction: str | None = None,
               member: str = "all", backend: str = "auto", device: torch.device | str = "cpu") -> LoadedModel:
    """Read the checkpoint, build one generator per selected member, check and load the weights.

    Every mismatch between config and checkpoint is reported (CheckpointError naming the keys)
    before anything is converted or written.
    """
    from .checkpoint import load_generator_states

    states = load_generator_states(checkpoint, direction)
    carried = states.config if states.config is not None or config is not None else _config_beside(checkpoint)
    cfg = _resolve_config(config, carried, states.source)
    input_dim = cfg["input_dim_a"] if states.direction == "a2b" else cfg["input_dim_b"]
    generators, engine = {}, "reference"
    for k in _select_members(states.members, member):
        gen, engine = build_generator(input_dim, cfg["gen"], backend, device)
        _load_weights(gen, states.states[states.members.index(k)], f"{states.source} (member {k})")
        generators[k] = gen.to(device).eval()
    return LoadedModel(cfg, states.direction, generators, engine, states.source)


def _load_weights(gen: torch.nn.Module, state_dict, source: str) -> None:
    from .checkpoint import check_state_dict

    check_state_dict(gen, state_dict, source)


# --------------------------------------------------------------------------- the converter

class Converter:
    """Runs generators under inference mode at a chosen precision.

    ``generators`` maps member index -> generator (reference AdaINGen or FastGenerator, on
    ``device``). The content code is computed once per image and reused for every style. At bf16 /
    fp16 the reference runs under autocast; FastGenerator computes in its parameters' dtype, so
    it is cast to that precision (in place) instead.

    ``cuda_graphs`` (default: on for CUDA devices) replays encode and decode as CUDA graphs, one per
    input shape (:mod:`council_fast.cuda_graphs`), wherever no autocast is involved (fp32, or the
    fused engine at any precision); ``graph_batch`` is the batch size they are captured at (smaller
    batches replay the same graph).
    """

    def __init__(self, generators: Mapping[int, torch.nn.Module] | Sequence[torch.nn.Module],
                 device: torch.device | str = "cpu", precision: str = "fp32", style_dim: int | None = None,
                 cuda_graphs: bool | None = None, graph_batch: int | None = None):
        if not isinstance(generators, Mapping):
            generators = dict(enumerate(generators))
        if not generators:
            raise ConvertError("Converter needs at least one generator")
        self.generators = dict(generators)
        self.device = torch.device(device)
        self.precision = precision
        check_precision(precision, self.device)
        first = next(iter(self.generators.values()))
        style_dim = style_dim if style_dim is not None else getattr(first, "style_dim", None)
        if style_dim is None:
            raise ConvertError("Converter: pass style_dim (the generator does not say)")
        self.style_dim = int(style_dim)
        # The fused engine runs in its parameters' dtype: cast it once instead of autocasting.
        self.native = {m: precision != "fp32" and runs_in_parameter_dtype(g) for m, g in self.generators.items()}
        for m, gen in self.generators.items():
            if self.native[m]:
                gen.to(PRECISIONS[precision])
        if cuda_graphs and self.device.type != "cuda":
            raise ConvertError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self.graph_batch = graph_batch
        self._graphed: dict[tuple, GraphedCall] = {}

    def _gen(self, member: int) -> torch.nn.Module:
        try:
            return self.generators[member]
        except KeyError:
            raise ConvertError(f"no generator for member {member}; have {sorted(self.generators)}") from None

    @contextlib.contextmanager
    def _context(self, member: int):
        precision = "fp32" if self.native[member] else self.precision
        with torch.inference_mode(), autocast_context(self.device, precision):
            yield

    def _split(self, member: int) -> bool:
        gen = self._gen(member)
        return hasattr(gen, "encode_content") and hasattr(gen, "decode")

    def _call(self, member: int, kind: str, fn, *tensors):
        """fn(*tensors), replayed as a CUDA graph where that is on and no autocast is involved."""
        if not self.cuda_graphs or not (self.native[member] or self.precision == "fp32"):
            return fn(*tensors)
        key = (member, kind)
        if key not in self._graphed:
            self._graphed[key] = GraphedCall(fn, name=f"member {member} {kind}", capacity=self.graph_batch)
        out = self._graphed[key](*tensors)  # views of the graph's buffers, overwritten by the next replay
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    def encode(self, member: int, x: torch.Tensor):
        """The content code of ``x`` (None when the generator only offers translate())."""
        if not self._split(member):
            return None
        gen = self._gen(member)
        with self._context(member):
            return self._call(member, "encode", gen.encode_content, x.to(self.device))

    def decode(self, member: int, content, z: torch.Tensor, x: torch.Tensor, return_mask: bool = False):
        """Images (and masks in [0, 1] if asked) for content codes, style codes z and source images x."""
        gen = self._gen(member)
        x, z = x.to(self.device), z.to(self.device).view(z.shape[0], self.style_dim, 1, 1)
        with self._context(member):
            if content is None:
                result = self._call(member, f"translate mask={return_mask}",
                                    lambda x_, z_: gen.translate(x_, z_, return_mask=return_mask), x, z)
            else:
                result = self._call(member, f"decode mask={return_mask}",
                                    lambda c_, z_, x_: gen.decode(c_, z_, x_, return_mask=return_mask),
                                    content, z, x)
        if return_mask:
            return result[0].float(), result[1].float()
        return result.float()

    def translate_batch(self, member: int, x: torch.Tensor, z: torch.Tensor, return_mask: bool = False):
        """Translate a batch x (B, C, H, W) in [-1, 1] with style codes z (B, style_dim[, 1, 1])."""
        return self.decode(member, self.encode(member, x), z, x, return_mask=return_mask)


# --------------------------------------------------------------------------- the pipeline

@dataclass
class ConversionReport:
    total: int = 0
    converted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)
    outputs: list[str] = field(default_factory=list)
    grid: str | None = None
    seconds: float = 0.0

    def summary(self, max_listed: int = 10) -> str:
        line = f"converted {self.converted} of {self.total} inputs"
        if self.failed:
            reasons = [reason for _, reason in self.failed]
            line += f"; {len(reasons)} failed: " + "; ".join(reasons[:max_listed])
            if len(reasons) > max_listed:
                line += f"; and {len(reasons) - max_listed} more"
        return line


def _load_tensor(item: InputItem, size: int, input_dim: int) -> torch.Tensor:
    x = test_transform(open_rgb(item.path), size)
    if input_dim == 1:
        x = (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])  # ITU-R 601 luma, as Pillow's "L"
    return x


def _guarded(load: Callable, item: InputItem):
    """(tensor, None) or (None, error naming the file): one bad input never stops the run."""
    try:
        return load(item), None
    except ImageReadError as e:
        return None, e
    except Exception as e:  # noqa: BLE001 - e.g. a decoder bug on a hostile file: report it, go on
        return None, ImageReadError(f"{item.path}: cannot convert ({type(e).__name__}: {e})")


def _prefetch(items: Sequence[InputItem], load: Callable, workers: int, lookahead: int):
    """Yield (item, tensor, error) in input order, loading up to ``lookahead`` items ahead."""
    if workers <= 0:
        for item in items:
            yield (item, *_guarded(load, item))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="council-fast-load") as pool:
        pending: deque[tuple[InputItem, Future]] = deque()
        upcoming = iter(items)
        for item in upcoming:
            pending.append((item, pool.submit(_guarded, load, item)))
            if len(pending) >= lookahead:
                break
        while pending:
            item, future = pending.popleft()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_guarded, load, nxt)))
            yield (item, *future.result())


def _batches(stream, batch: int, report: ConversionReport, bar):
    """Group loaded images into lists of at most ``batch``; failures go straight to the report."""
    current = []
    for item, tensor, error in stream:
        if error is not None:
            report.failed.append((item.path, str(error)))
            bar.write(f"skipped: {error}", file=sys.stderr)
            bar.update(1)
            continue
        current.append((item, tensor))
        if len(current) == batch:
            yield current
            current = []
    if current:
        yield current


def _item_rng(seed: int, item: InputItem) -> torch.Generator:
    # Each input's style codes depend only on the seed and its output name, not on batching,
    # worker timing or which other inputs failed.
    g = torch.Generator()
    name = item.rel.replace(os.sep, "/").encode("utf-8")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name)) % (2 ** 63))
    return g


class _Writer:
    """Encodes and writes outputs in background threads with a bounded backlog."""

    def __init__(self, workers: int, max_pending: int):
        self.pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="council-fast-save")
        self.pending: deque[tuple[str, str, Future]] = deque()
        self.max_pending = max_pending
        self.written: list[str] = []
        self.errors: dict[str, str] = {}  # input path -> its first write error

    def submit(self, input_path: str, image: torch.Tensor, path: str) -> None:
        self.pending.append((input_path, path, self.pool.submit(save_image, image, path)))
        while len(self.pending) > self.max_pending:
            self._finish_one()

    def _finish_one(self) -> None:
        input_path, path, future = self.pending.popleft()
        try:
            future.result()
            self.written.append(path)
        except OSError as e:
            self.errors.setdefault(input_path, f"{input_path}: cannot write {path} ({e})")

    def close(self) -> None:
        while self.pending:
            self._finish_one()
        self.pool.shutdown()


def _assign(batch_items, members: Sequence[int], member_mode: str, styles: int, style_dim: int, seed: int):
    """Per input: the members that translate it and its style codes (styles, style_dim)."""
    plans = []
    for item, _ in batch_items:
        g = _item_rng(seed, item)
        z = torch.randn(styles, style_dim, generator=g)
        if member_mode == "random":
            chosen = [members[int(torch.randint(len(members), (1,), generator=g))]]
        else:
            chosen = list(members)
        plans.append((chosen, z))
    return plans


def _to_grid_cell(t: torch.Tensor) -> torch.Tensor:
    return ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


MAX_AUTO_BATCH = 32
_FULL_RES_ACTIVATIONS = 8  # conservative: live full-resolution 64-channel tensors per image, workspace included


def default_batch(device: torch.device, size: int, precision: str = "fp32") -> int:
    """--batch's default: 8 on the CPU; on a GPU as many images (1 to 32) as half its free memory holds,
    estimated as a few full-resolution 64-channel activations per image."""
    if device.type != "cuda":
        return 8
    free, _ = torch.cuda.mem_get_info(device)
    per_image = size * size * 64 * (4 if precision == "fp32" else 2) * _FULL_RES_ACTIVATIONS
    return max(1, min(MAX_AUTO_BATCH, int(free // 2 // per_image)))


def _is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(e).lower()


def _step_with_backoff(step: "_BatchStep", batch_items, plans, bar) -> None:
    """step(batch_items, plans); when the device runs out of memory, the batch is halved (for the rest of
    the run too) and retried, down to single images. Style codes do not depend on batching."""
    try:
        step(batch_items, plans)
        return
    except RuntimeError as e:
        if not _is_out_of_memory(e) or (len(batch_items) == 1 and step.batch == 1):
            raise
    if step.converter.device.type == "cuda":
        torch.cuda.empty_cache()
    smaller = max(1, step.batch // 2)
    bar.write(f"out of device memory at batch {step.batch}: continuing with batch {smaller}", file=sys.stderr)
    step.batch = smaller
    for start in range(0, len(batch_items), smaller):
        _step_with_backoff(step, batch_items[start:start + smaller], plans[start:start + smaller], bar)


def convert_paths(items: Sequence[InputItem], converter: Converter, output_dir: str, *, size: int,
                  member_mode: str = "all", styles: int = 1, seed: int = 0, batch: int = 8, workers: int = 2,
                  save_masks: bool = False, grid: bool = False, input_dim: int = 3,
                  progress: bool = True) -> ConversionReport:
    """Convert ``items`` (from find_inputs) into ``output_dir``; never raises for a bad input file.

    ``member_mode``: 'all' (every generator of the converter translates every input) or 'random'
    (one member per input, drawn from the seed). With ``grid`` the contact sheet keeps every
    image in memory (as bytes) until the end.
    """
    if styles < 1 or batch < 1:
        raise ConvertError("--styles and --batch must be at least 1")
    members = sorted(converter.generators)
    items = plan_outputs(items, output_dir, members, styles)
    os.makedirs(output_dir, exist_ok=True)
    report = ConversionReport(total=len(items))
    writer = _Writer(workers, max_pending=4 * batch * styles * len(members) + 8)
    step = _BatchStep(converter, output_dir, batch, save_masks, writer, grid)
    bar = _progress_bar(len(items), progress)
    start = time.perf_counter()
    stream = _prefetch(items, lambda it: _load_tensor(it, size, input_dim), workers, lookahead=2 * batch + workers)
    try:
        for batch_items in _batches(stream, batch, report, bar):
            plans = _assign(batch_items, members, member_mode, styles, converter.style_dim, seed)
            _step_with_backoff(step, batch_items, plans, bar)
            bar.update(len(batch_items))
    finally:
        bar.close()
        writer.close()
    order = {item.path: i for i, item in enumerate(items)}
    report.failed = sorted(report.failed + list(writer.errors.items()), key=lambda f: order.get(f[0], 0))
    report.converted = report.total - len({path for path, _ in report.failed})
    report.outputs = list(dict.fromkeys(writer.written))  # a batch retried after running out of memory
    if grid and step.grid_rows:
        report.grid = _write_grid([step.grid_rows[item.rel] for item in items if item.rel in step.grid_rows],
                                  output_dir, items)
    report.seconds = time.perf_counter() - start
    return report


class _BatchStep:
    """Translates one batch of loaded inputs and hands the images to the writer."""

    def __init__(self, converter: Converter, output_dir: str, batch: int, save_masks: bool, writer: _Writer,
                 grid: bool):
        self.converter, self.output_dir, self.batch = converter, output_dir, batch
        self.save_masks, self.writer = save_masks, writer
        self.grid_rows: dict[str, list[torch.Tensor]] | None = {} if grid else None  # rel -> cells

    def __call__(self, batch_items, plans) -> None:
        x = torch.stack([t for _, t in batch_items])
        if self.converter.device.type == "cuda":
            x = x.pin_memory().to(self.converter.device, non_blocking=True)
        if self.grid_rows is not None:
            for item, t in batch_items:
                self.grid_rows[item.rel] = [_to_grid_cell(t)]
        for member in sorted({m for chosen, _ in plans for m in chosen}):
            idx = [i for i, (chosen, _) in enumerate(plans) if member in chosen]
            self._member(member, [batch_items[i][0] for i in idx], [plans[i][1] for i in idx], x[idx])

    def _member(self, member: int, items: list[InputItem], styles: list[torch.Tensor], x: torch.Tensor) -> None:
        """Encode the inputs once, then decode every (input, style) pair in chunks of ``batch``."""
        content = self.converter.encode(member, x)
        pairs = [(pos, s) for pos in range(len(items)) for s in range(styles[pos].shape[0])]
        for start in range(0, len(pairs), self.batch):
            chunk = pairs[start:start + self.batch]
            sel = torch.tensor([pos for pos, _ in chunk], device=x.device)
            z = torch.stack([styles[pos][s] for pos, s in chunk])
            result = self.converter.decode(member, None if content is None else content[sel], z, x[sel],
                                           return_mask=self.save_masks)
            out, masks = (result[0].cpu(), result[1].cpu()) if self.save_masks else (result.cpu(), None)
            for row, (pos, s) in enumerate(chunk):
                self._emit(items[pos], member, s, out[row], None if masks is None else masks[row])

    def _emit(self, item: InputItem, member: int, style: int, out: torch.Tensor, mask) -> None:
        self.writer.submit(item.path, out, os.path.join(self.output_dir, output_name(item.rel, member, style)))
        if mask is not None:  # masks are in [0, 1]; images are written from [-1, 1]
            self.writer.submit(item.path, mask * 2 - 1,
                               os.path.join(self.output_dir, output_name(item.rel, member, style, mask=True)))
        if self.grid_rows is not None:
            self.grid_rows[item.rel].append(_to_grid_cell(out))


def _write_grid(rows: list[list[torch.Tensor]], output_dir: str, items: Sequence[InputItem]) -> str:
    inputs = {os.path.normcase(os.path.abspath(item.path)) for item in items}
    stem, path, n = os.path.splitext(GRID_NAME)[0], os.path.join(output_dir, GRID_NAME), 1
    while os.path.normcase(os.path.abspath(path)) in inputs:
        n += 1
        path = os.path.join(output_dir, f"{stem}_{n}.png")
    save_grid([[cell.float() / 127.5 - 1 for cell in row] for row in rows], path)
    return path


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="converting", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


# --------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML config, or a packaged name (selfie2anime, tiny); required unless the "
                             "checkpoint is a council-fast full state, which carries its config")
    parser.add_argument("--checkpoint", required=True,
                        help="official member file (b2a_gen_3_01000000.pt), official prefix naming all "
                             "members (checkpoints/01000000), checkpoint folder, or council-fast full state")
    parser.add_argument("--direction", choices=("a2b", "b2a"), default=None,
                        help="which generators, when the checkpoint holds both")
    parser.add_argument("--input", nargs="+", required=True, metavar="IN",
                        help="image files, folders (recursive) or glob patterns")
    parser.add_argument("--output", required=True, metavar="OUT", help="output folder (created if needed)")
    parser.add_argument("--member", default="all", help="member index, 'all', or 'random' (one per input; "
                        "the official test script's choice) (default: %(default)s)")
    parser.add_argument("--styles", type=int, default=1, help="outputs per input and member, each with a "
                        "fresh style code z ~ N(0, I) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="makes the style codes and member choices repeatable (default: random, printed)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per model call (default: 8 on cpu; on cuda as many as half the free GPU "
                             "memory holds, at most 32; halved automatically if the GPU runs out of memory)")
    parser.add_argument("--size", type=int, default=None,
                        help="shorter side is resized to this, then centre-cropped square (default: new_size)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="autocast precision: bf16 on cpu or cuda, fp16 on cuda only (default: %(default)s)")
    parser.add_argument("--backend", choices=ENGINE_BACKENDS, default="auto",
                        help="auto = the fused engine when available, else the reference (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run every batch eagerly instead of replaying CUDA graphs (cuda only; graphs are "
                             "used where no autocast is involved: fp32, or the fused engine at any precision)")
    parser.add_argument("--save-masks", action="store_true", help="also write each output's attention masks")
    parser.add_argument("--grid", action="store_true",
                        help=f"also write {GRID_NAME}: one row per input, the input then its outputs "
                             "(kept in memory until the end: for small sets)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="threads decoding/resizing inputs and encoding outputs (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _validate_args(args) -> torch.device:
    for name in ("styles", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConvertError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ConvertError(f"--workers must not be negative, got {args.workers}")
    if args.size is not None and args.size < 1:
        raise ConvertError(f"--size must be positive, got {args.size}")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConvertError(f"--output {args.output}: exists and is not a folder")
    output = os.path.realpath(args.output)
    if any(os.path.isdir(spec) and os.path.realpath(spec) == output for spec in args.input):
        raise ConvertError(f"--output {args.output} is also an input folder: its outputs would be taken as "
                           "inputs next time; choose another --output")
    return device


def _check_size(size: int, config: dict) -> None:
    factor = 2 ** config["gen"]["n_downsample"]
    if size % factor:
        raise ConvertError(f"--size {size} must be a multiple of {factor} (2**gen.n_downsample) so the "
                           f"decoder restores the input size")


def run(args) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        device = _validate_args(args)
        items, problems = find_inputs(args.input, exclude_dirs=[args.output])
        for problem in problems:
            print(f"warning: {problem}", file=sys.stderr)
        if not items:
            raise ConvertError("no input images found in: " + ", ".join(args.input))
        model = load_model(args.checkpoint, args.config, args.direction, args.member, args.backend, device)
        size = args.size or model.config["new_size"]
        _check_size(size, model.config)
    except (ConvertError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    input_dim = model.config["input_dim_a"] if model.direction == "a2b" else model.config["input_dim_b"]
    if args.batch is None:
        args.batch = default_batch(device, size, args.precision)
    if not args.quiet:
        print(f"council-fast convert: {len(items)} inputs, {model.direction} members "
              f"{','.join(map(str, model.generators))}, engine {model.engine}, {device}, {args.precision}, "
              f"{size}x{size}, batch {args.batch}, seed {seed}", file=sys.stderr)
    converter = Converter(model.generators, device, args.precision, style_dim=model.config["gen"]["style_dim"],
                          cuda_graphs=args.cuda_graphs and device.type == "cuda", graph_batch=args.batch)
    try:
        report = convert_paths(items, converter, args.output, size=size, member_mode=args.member,
                               styles=args.styles, seed=seed, batch=args.batch, workers=args.workers,
                               save_masks=args.save_masks, grid=args.grid, input_dim=input_dim,
                               progress=not args.quiet)
    except OSError as e:  # the output folder or the contact sheet cannot be written
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FATAL
    rate = report.converted / report.seconds if report.seconds > 0 else 0.0
    print(f"{report.summary()} ({rate:.1f} inputs/s) -> {args.output}"
          + (f"; contact sheet {report.grid}" if report.grid else "")
          + (f" (random seed {seed}: pass --seed {seed} to repeat)" if args.seed is None else ""))
    return EXIT_SOME_FAILED if report.failed else 0
