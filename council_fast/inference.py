"""Ready generators from any checkpoint ``convert`` takes, and translation of batches with them.

``load_generators`` reads an official member file, an official prefix, a folder, a council-fast full
state or a training run's checkpoints folder, builds one generator per selected member (the
reference ``AdaINGen`` or the fused ``FastGenerator``), checks and loads the weights and puts them on
the device at the precision. ``Converter`` runs them (inference mode, autocast or cast, CUDA graphs);
``translate`` is the one-call form for tensors and PIL images. Every input's style codes depend only
on the seed and the input's name, the rule ``council-fast convert`` follows, so both give the same
images for the same seed.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from typing import Iterator, Mapping, Sequence

import torch
from PIL import Image

from .checkpoint import CheckpointError, check_state_dict, describe_generator, generator_sizes, \
    latest_full_state_path, load_full_state, load_generator_states
from .config import load_config, validate_config
from .cuda_graphs import GraphedCall
from .evalrecord import EVAL_STATE_KEY, EvalRecord
from .lowering import FastGenerator
from .images import as_rgb8, fit_square, pil_to_tensor, tensor_to_pil
from .ops import resolve_backend
from .reference.networks import AdaINGen
from .runtime import PRECISIONS, SetupError, autocast_context, check_precision

__all__ = ["ConvertError", "Generators", "Converter", "load_generators", "translate", "build_generator",
           "split_backend", "best_member", "kernel_backend", "runs_in_parameter_dtype", "image_tensor", "draw_plan",
           "ENGINES", "KERNEL_BACKENDS"]

ENGINES = ("auto", "fused", "reference")  # auto: fused when it can run here, else reference
KERNEL_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")  # the fused engine's kernels


def split_backend(backend: str) -> tuple[str, str]:
    """A --backend choice as (engine, kernel back-end): 'auto' and 'reference' name engines, the rest kernels."""
    return (backend, "auto") if backend in ("auto", "reference") else ("fused", backend)


class ConvertError(SetupError):
    """Generators cannot be loaded or run as asked (bad option, unusable model); the message says why."""


# --------------------------------------------------------------------------- building generators

def runs_in_parameter_dtype(gen: torch.nn.Module) -> bool:
    """True for the fused engine (it computes in its parameters' dtype, so it is cast, not autocast)."""
    return isinstance(gen, FastGenerator)


def kernel_backend(module: torch.nn.Module, device) -> str:
    """The kernel back-end the fused engine will use on ``device`` (for messages)."""
    try:
        return resolve_backend(getattr(module, "backend", None), torch.device(device),
                               getattr(module, "strict", None))
    except Exception as e:  # noqa: BLE001 - the engine itself reports this when it runs
        return f"back-end unresolved: {e}"


def build_generator(input_dim: int, gen_params: dict, engine: str = "auto", backend: str = "auto",
                    device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """A generator with the reference state-dict layout; returns (module, engine description).

    ``engine`` 'auto' is the fused engine when it can run on ``device``, else the reference one;
    ``backend`` names the fused engine's kernels ('auto': the fastest that runs here).
    """
    if engine not in ENGINES:
        raise ConvertError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if backend not in KERNEL_BACKENDS:
        raise ConvertError(f"--backend must be one of {', '.join(KERNEL_BACKENDS)}, not {backend!r}")
    if engine == "reference":
        return AdaINGen(input_dim, gen_params), "reference"
    try:
        module = FastGenerator(input_dim, gen_params, backend=None if backend == "auto" else backend)
        if backend != "auto":  # a back-end asked for by name must run here: find out before any work
            resolve_backend(backend, torch.device(device))
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, build failures: all mean "cannot run"
        if engine == "auto":
            return AdaINGen(input_dim, gen_params), f"reference (the fused engine cannot run here: {e})"
        raise ConvertError(f"--backend {backend}: the fused engine cannot run here: {e}") from None
    return module, f"fused ({kernel_backend(module, device)})"


# --------------------------------------------------------------------------- loading

class Generators(dict):
    """Member index -> generator (weights loaded, eval mode, on ``device``, at ``precision``), with
    what they came from: ``config``, ``direction`` (a2b | b2a), ``engine`` (a description), ``source``."""

    def __init__(self, generators: Mapping[int, torch.nn.Module], *, config: dict, direction: str, engine: str,
                 source: str, device: torch.device, precision: str):
        super().__init__(generators)
        self.config, self.direction, self.engine, self.source = config, direction, engine, source
        self.device, self.precision = device, precision
        self._converter: Converter | None = None

    @property
    def input_dim(self) -> int:
        return self.config["input_dim_a"] if self.direction == "a2b" else self.config["input_dim_b"]

    @property
    def style_dim(self) -> int:
        return int(self.config["gen"]["style_dim"])

    def converter(self) -> "Converter":
        """One Converter for these generators (kept: its CUDA graphs are captured once)."""
        if self._converter is None:
            self._converter = Converter(self, self.device, self.precision, style_dim=self.style_dim)
        return self._converter


def _resolve_config(config: str | dict | None, carried: dict | None, source: str) -> dict:
    if isinstance(config, dict):
        validate_config(config, "config")
        return config
    if config is not None:
        return load_config(config)
    if carried is None:
        raise ConvertError(f"{source}: an official checkpoint carries no config; pass --config "
                           f"(a YAML file, or 'selfie2anime' for the released weights)")
    validate_config(carried, f"{source} (embedded config)")
    return carried


def _config_beside(checkpoint: str) -> dict | None:
    """The config of a council-fast full state in the checkpoint's folder (a training run's
    checkpoints/ holds both official files and full states), or None."""
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    try:
        path = latest_full_state_path(folder)
        return load_full_state(path)["config"] if path else None
    except (CheckpointError, KeyError):
        return None


def best_member(checkpoint: str | os.PathLike) -> int:
    """The member with the lowest FID at the latest ``train --eval-every`` evaluation, from the full state
    (the checkpoint itself, or the newest in its folder)."""
    checkpoint = os.fspath(checkpoint)
    folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    try:
        state = load_full_state(checkpoint) if os.path.isfile(checkpoint) else None
    except CheckpointError:  # an official member file: look for the run's full state beside it
        state = None
    path = checkpoint if state is not None else latest_full_state_path(folder)
    state = state if state is not None else (load_full_state(path) if path else None)
    member = EvalRecord.from_state((state or {}).get(EVAL_STATE_KEY)).best_member()
    if member is None:
        raise ConvertError(f"--member best: {path or checkpoint} holds no evaluation (train with --eval-every N "
                           "--inception-weights F to record each member's FID)")
    return member


def _select_members(available: Sequence[int], members) -> list[int]:
    if isinstance(members, str) and members in ("all", "random"):
        return list(available)
    wanted = [members] if isinstance(members, (int, str)) else list(members)
    chosen = []
    for m in wanted:
        try:
            k = int(m)
        except (TypeError, ValueError):
            raise ConvertError(f"--member must be a member index, 'all', 'random' or 'best', not {m!r}") from None
        if k not in available:
            raise ConvertError(f"--member {k}: the checkpoint holds members {', '.join(map(str, available))}")
        chosen.append(k)
    return chosen


def run_checkpoints(checkpoint: str) -> str:
    """A training run's folder (it holds checkpoints/) stands for its checkpoints/ folder."""
    inner = os.path.join(checkpoint, "checkpoints")
    if os.path.isdir(checkpoint) and os.path.isdir(inner) and not any(
            name.endswith(".pt") or name == "latest.txt" for name in os.listdir(checkpoint)):
        return inner
    return checkpoint


_GEN_SIZE_KEYS = ("dim", "mlp_dim", "style_dim", "n_downsample", "n_res", "num_of_mask_dim_to_add")


def size_mismatch_message(states, cfg: dict, config_arg, error: Exception) -> str:
    """What the checkpoint was trained with and what the config asks for, instead of a key dump."""
    found = generator_sizes(states.states[0])
    differ = [f"{k} {found[k]} (config: {cfg['gen'][k]})" for k in _GEN_SIZE_KEYS
              if k in found and found[k] != cfg["gen"][k]]
    if not differ:  # not a size question: keep the key-by-key report
        return str(error)
    named = f" {config_arg}" if isinstance(config_arg, (str, os.PathLike)) else ""
    fix = ("drop --config (a council-fast run carries its config), or pass the run's config (RUN/config.yaml)"
           if config_arg is not None else "pass the config it was trained with (--config)")
    return (f"{states.source}: the checkpoint was trained with "
            f"{describe_generator(states.states[0], len(states.members))}; the config{named} differs in "
            f"{', '.join(differ)}: {fix}")


def load_generators(checkpoint: str | os.PathLike, config: str | dict | None = None, members="all",
                    engine: str = "fused", device: torch.device | str = "cpu", precision: str = "fp32",
                    direction: str | None = None, backend: str = "auto") -> Generators:
    """Ready generators from any checkpoint ``council-fast convert`` takes.

    ``checkpoint``: an official member file (``b2a_gen_3_01000000.pt``), an official prefix
    (``checkpoints/01000000``), a folder, or a council-fast full state. ``config``: a YAML path, a
    packaged name or a dict; needed for official files unless a full state lies beside them.
    ``members``: 'all', an index, a list of indices, or 'best' (the lowest FID at the run's latest
    ``train --eval-every`` evaluation, from the full state). ``engine``: 'fused', 'reference' or 'auto'.
    ``precision``: fp32, bf16 or fp16 (CUDA). Every mismatch between config and checkpoint is a
    CheckpointError naming the keys, raised before anything runs.
    """
    device = torch.device(device)
    check_precision(precision, device)
    path = run_checkpoints(os.fspath(checkpoint))
    states = load_generator_states(path, direction)
    carried = states.config if states.config is not None or config is not None else _config_beside(path)
    cfg = _resolve_config(config, carried, states.source)
    input_dim = cfg["input_dim_a"] if states.direction == "a2b" else cfg["input_dim_b"]
    generators, description = {}, engine
    if isinstance(members, str) and members == "best":  # the lowest FID at the run's latest evaluation
        members = best_member(path)
    for k in _select_members(states.members, members):
        gen, description = build_generator(input_dim, cfg["gen"], engine, backend, device)
        try:
            check_state_dict(gen, states.states[states.members.index(k)], f"{states.source} (member {k})")
        except CheckpointError as e:
            raise CheckpointError(size_mismatch_message(states, cfg, config, e)) from None
        gen = gen.to(device).eval()
        if precision != "fp32" and runs_in_parameter_dtype(gen):
            gen.to(PRECISIONS[precision])
        generators[k] = gen
    return Generators(generators, config=cfg, direction=states.direction, engine=description,
                      source=states.source, device=device, precision=precision)


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

    def decode_styles(self, member: int, x: torch.Tensor, styles: Sequence[torch.Tensor], chunk: int,
                      return_mask: bool = False) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """Encode ``x`` once, then decode every (input, style) pair, ``chunk`` pairs per call, inputs in
        order and each input's styles (``styles[i]``: (S_i, style_dim)) in order. Yields
        (input index, style index, image, mask or None), on the CPU."""
        x = x.to(self.device)
        content = self.encode(member, x)
        pairs = [(pos, s) for pos in range(x.shape[0]) for s in range(styles[pos].shape[0])]
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            sel = torch.tensor([pos for pos, _ in part], device=x.device)
            z = torch.stack([styles[pos][s] for pos, s in part])
            result = self.decode(member, None if content is None else content[sel], z, x[sel],
                                 return_mask=return_mask)
            out, masks = (result[0].cpu(), result[1].cpu()) if return_mask else (result.cpu(), None)
            for row, (pos, s) in enumerate(part):
                yield pos, s, out[row], None if masks is None else masks[row]

    def translate_batch(self, member: int, x: torch.Tensor, z: torch.Tensor, return_mask: bool = False):
        """Translate a batch x (B, C, H, W) in [-1, 1] with style codes z (B, style_dim[, 1, 1])."""
        return self.decode(member, self.encode(member, x), z, x, return_mask=return_mask)


# --------------------------------------------------------------------------- inputs and style codes

def image_tensor(image: Image.Image, size: int | None, input_dim: int = 3, fit: str = "crop") -> torch.Tensor:
    """An RGB image made ``size`` x ``size`` as ``fit`` says (:func:`council_fast.images.fit_square`;
    'crop' is the official test transform; None keeps its size) as (input_dim, H, W) in [-1, 1]; one
    channel is ITU-R 601 luma, as Pillow's "L"."""
    x = pil_to_tensor(fit_square(image, size, fit)) if size is not None else pil_to_tensor(image)
    if input_dim == 1:
        x = (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])
    return x


def _input_rng(seed: int, name: str) -> torch.Generator:
    # Each input's style codes depend only on the seed and its name (convert: its output stem), not on
    # batching, worker timing or which other inputs failed.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.replace(os.sep, "/").encode("utf-8"))) % (2 ** 63))
    return g


def draw_plan(seed: int, name: str, members: Sequence[int], member_mode: str, styles: int,
              style_dim: int) -> tuple[list[int], torch.Tensor]:
    """For one input: the members that translate it and its style codes (styles, style_dim).

    ``member_mode`` 'all': every member; 'random': one, drawn after the style codes."""
    g = _input_rng(seed, name)
    z = torch.randn(styles, style_dim, generator=g)
    if member_mode == "random":
        return [members[int(torch.randint(len(members), (1,), generator=g))]], z
    return list(members), z


# --------------------------------------------------------------------------- translate

def _as_generators(generators) -> Generators:
    if isinstance(generators, Generators):
        return generators
    if isinstance(generators, torch.nn.Module):
        generators = {0: generators}
    if not isinstance(generators, Mapping) or not generators:
        raise ConvertError("translate needs load_generators()'s result, a {member: generator} mapping or one "
                           "generator")
    first = next(iter(generators.values()))
    param = next(first.parameters())
    precision = next((k for k, v in PRECISIONS.items() if v == param.dtype), "fp32") \
        if runs_in_parameter_dtype(first) else "fp32"
    config = {"gen": {"style_dim": first.style_dim, "n_downsample": first.n_downsample},
              "input_dim_b": first.enc_content.model[0].conv.in_channels}
    return Generators(generators, config=config, direction="b2a", engine="given", source="given",
                      device=param.device, precision=precision)


def _input_batch(images, gens: Generators, size: int | None) -> tuple[torch.Tensor, bool, bool]:
    """(x (B, C, H, W) on the CPU or the input's device, came as PIL, was one image)."""
    if isinstance(images, Image.Image):
        images, single, pil = [images], True, True
    elif isinstance(images, torch.Tensor):
        single, pil = images.dim() == 3, False
        images = images.unsqueeze(0) if single else images
        if images.dim() != 4 or images.shape[1] != gens.input_dim:
            raise ConvertError(f"translate: expected a ({gens.input_dim}, H, W) or (B, {gens.input_dim}, H, W) "
                               f"tensor in [-1, 1], got shape {tuple(images.shape)}")
        return images.float(), single, pil
    else:
        images, single, pil = list(images), False, True
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise ConvertError("translate: pass a PIL image, a list of PIL images or a tensor")
    size = size if size is not None else gens.config.get("new_size")
    tensors = [image_tensor(as_rgb8(im), size, gens.input_dim) for im in images]
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise ConvertError("translate: the images differ in size; pass size= to resize and crop them alike")
    return torch.stack(tensors), single, pil


def translate(generators, images, member: int | None = None, styles: int = 1, seed: int | None = None,
              names: Sequence[str] | None = None, size: int | None = None):
    """Translate tensors or PIL images with one member of ``generators``.

    ``generators``: load_generators()'s result, a {member: generator} mapping or one generator.
    ``images``: a PIL image or a list of them (each resized and centre-cropped to ``size``, default
    the config's new_size, as convert does), or a (C, H, W) / (B, C, H, W) tensor in [-1, 1] taken
    as it is. ``member``: default the lowest index held. Input i's ``styles`` style codes come from
    ``seed`` (default: random) and its name (``names[i]``, default ``str(i)``): the rule convert
    follows with output stems as names. The images are computed as convert computes a batch of them
    (``--batch len(images)``), so the same seed and names give convert's images.

    Returns what came in: PIL in, PIL out; a tensor in, a tensor out (on the input's device). With
    ``styles`` > 1 each image becomes a list of ``styles`` images (PIL) or the tensor gains a style
    dimension after the batch one: (B, styles, C, H, W), or (styles, C, H, W) for one image.
    """
    gens = _as_generators(generators)
    if styles < 1:
        raise ConvertError(f"translate: styles must be at least 1, got {styles}")
    member = min(gens) if member is None else member
    x, single, pil = _input_batch(images, gens, size)
    names = [str(i) for i in range(x.shape[0])] if names is None else [str(n) for n in names]
    if len(names) != x.shape[0]:
        raise ConvertError(f"translate: {len(names)} names for {x.shape[0]} images")
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    z = [draw_plan(seed, name, [member], "all", styles, gens.style_dim)[1] for name in names]
    outs = torch.empty(x.shape[0], styles, *x.shape[1:])
    for pos, s, image, _ in gens.converter().decode_styles(member, x, z, chunk=x.shape[0]):
        outs[pos, s] = image
    if not pil:
        outs = outs.to(x.device)
        outs = outs[:, 0] if styles == 1 else outs
        return outs[0] if single else outs
    result = [[tensor_to_pil(o) for o in per_image] for per_image in outs]
    result = [r[0] if styles == 1 else r for r in result]
    return result[0] if single else result
