"""Folder conversion: input discovery, output planning, prefetch, batched translation with
out-of-memory backoff, background PNG writing and the report.

Inputs are files, folders (searched recursively) or glob patterns of jpg/jpeg/png/webp/bmp images.
Each input is resized and centre-cropped as the official test transform does, encoded once per
member and decoded once per style code. Outputs are ``<name>_m<member>_s<style>.png`` under the
output folder, keeping the sub-folders of folder inputs. Decoding and resizing run in worker threads
ahead of the model and PNG encoding behind it. An input's style codes (and, with member mode
'random', its member) depend only on the seed and its output name
(:func:`council_fast.inference.draw_plan`), so a run repeats exactly. A bad input never stops a run:
it is reported by name in the :class:`ConversionReport`.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from .fileio import file_kind, is_regular_file
from .images import IMAGE_EXTENSIONS, ImageReadError, open_rgb, save_grid, save_image
from .inference import ConvertError, Converter, draw_plan, image_tensor

__all__ = ["InputItem", "ConversionReport", "find_inputs", "plan_outputs", "output_name", "convert_paths",
           "default_batch", "check_size", "GRID_NAME", "MAX_AUTO_BATCH"]

GRID_NAME = "contact_sheet.png"


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
        if os.path.exists(path) and not is_regular_file(path):  # a FIFO or device would block or never end
            problems.append(f"{path}: skipped: not a regular file ({file_kind(path)})")
            return
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


def check_size(size: int, config: dict) -> None:
    """The decoder restores the input size only for multiples of 2**gen.n_downsample."""
    factor = 2 ** config["gen"]["n_downsample"]
    if size % factor:
        raise ConvertError(f"--size {size} must be a multiple of {factor} (2**gen.n_downsample) so the "
                           f"decoder restores the input size")


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
    return image_tensor(open_rgb(item.path), size, input_dim)


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
    return [draw_plan(seed, item.rel, members, member_mode, styles, style_dim) for item, _ in batch_items]


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
        for pos, s, out, mask in self.converter.decode_styles(member, x, styles, self.batch, self.save_masks):
            self._emit(items[pos], member, s, out, mask)

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
    return tqdm(total=total, unit="img", desc="converting", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)
