"""Official Council-GAN YAML configs: load unchanged, fill defaults, reject what is wrong.

Every key of the published ``anime2face_council_folder.yaml`` is known (``configs/defaults.yaml``);
a missing key takes its published value, an unknown key or a value of the wrong type is an error
that names the file and the key.
"""
from __future__ import annotations

import copy
import difflib
import fractions
import math
import os
import stat
from importlib import resources
from typing import Any

import yaml

__all__ = ["ConfigError", "load_config", "packaged_config", "default_config", "validate_config",
           "parse_fraction", "finish_config", "PACKAGED_CONFIGS", "MAX_CONFIG_BYTES", "ignored_official_keys",
           "official_keys_notice"]

PACKAGED_CONFIGS = ("selfie2anime", "tiny", "demo")

# Integer-valued keys (sizes, counts, iterations). Every other numeric key accepts int or float.
_INT_KEYS = {
    "image_save_iter", "image_display_iter", "display_size", "snapshot_save_iter", "log_iter",
    "random_seed", "max_iter", "batch_size", "step_size", "loss_matching_hist_size",
    "focus_loss.focus_loss_start_at_iter",
    "gen.dim", "gen.mlp_dim", "gen.style_dim", "gen.n_downsample", "gen.n_res",
    "gen.num_of_mask_dim_to_add",
    "dis.dim", "dis.n_layer", "dis.num_scales", "dis.numberOf_dis_relative_iteration",
    "council.council_size", "council.numberOfCouncil_dis_relative_iteration",
    "council.flipOnOff_On_iteration", "council.flipOnOff_Off_iteration", "council.council_start_at_iter",
    "input_dim_a", "input_dim_b", "num_workers", "new_size", "crop_image_height", "crop_image_width",
    "RandomRotation_degree", "misc.start_tensor_board port", "misc.test_Fid_iter", "misc.test_Fid_num_of_im",
}
_POSITIVE_KEYS = {
    "batch_size", "gen.dim", "gen.mlp_dim", "gen.style_dim", "gen.num_of_mask_dim_to_add", "dis.dim",
    "dis.n_layer", "dis.num_scales", "council.council_size", "input_dim_a", "input_dim_b", "new_size",
    "crop_image_height", "crop_image_width", "image_save_iter", "snapshot_save_iter", "log_iter",
    "loss_matching_hist_size", "lr",
}
_CHOICES = {
    "init": ("gaussian", "kaiming", "xavier", "orthogonal", "default"),
    "lr_policy": ("step", "constant"),
    "gen.activ": ("relu", "lrelu", "prelu", "selu", "tanh", "none"),
    "gen.pad_type": ("zero", "reflect", "replicate"),
    "dis.activ": ("relu", "lrelu", "prelu", "selu", "tanh", "none"),
    "dis.pad_type": ("zero", "reflect", "replicate"),
    "dis.norm": ("none", "bn", "in", "ln"),
    "dis.gan_type": ("lsgan", "nsgan"),
}
# Value ranges beyond "positive": key -> (low, high, low inclusive, high inclusive); None = unbounded.
# Upper bounds on sizes are generous sanity limits (far beyond any published setting) that stop a typo
# such as `dim: 64000` from allocating terabytes before anything is said.
_RANGES = {
    "beta1": (0.0, 1.0, True, False), "beta2": (0.0, 1.0, True, False),
    "gamma": (0.0, 1.0, False, True), "weight_decay": (0.0, None, True, True),
    "step_size": (1, None, True, True), "max_iter": (0, None, True, True),
    "random_seed": (0, 2 ** 32 - 1, True, True), "image_display_iter": (1, None, True, True),
    "display_size": (1, 256, True, True), "batch_size": (1, 4096, True, True),
    "num_workers": (0, 256, True, True), "loss_matching_hist_size": (1, 1_000_000, True, True),
    "new_size": (1, 8192, True, True), "crop_image_height": (1, 8192, True, True),
    "crop_image_width": (1, 8192, True, True), "input_dim_a": (1, 4, True, True), "input_dim_b": (1, 4, True, True),
    "gen.dim": (1, 1024, True, True), "gen.mlp_dim": (1, 8192, True, True), "gen.style_dim": (1, 1024, True, True),
    "gen.n_downsample": (0, 8, True, True), "gen.n_res": (0, 64, True, True),
    "gen.num_of_mask_dim_to_add": (1, 16, True, True),
    "dis.dim": (1, 1024, True, True), "dis.n_layer": (1, 10, True, True), "dis.num_scales": (1, 8, True, True),
    "dis.numberOf_dis_relative_iteration": (0, 100, True, True),
    "council.council_size": (1, 64, True, True), "council.numberOfCouncil_dis_relative_iteration": (0, 100, True, True),
    "council.council_start_at_iter": (0, None, True, True),
    "council.discriminetro_less_style_by": (0.0, None, True, True),
    "focus_loss.focus_loss_start_at_iter": (0, None, True, True),
    "focus_loss.mask_zero_or_one_center": (0.0, 1.0, True, True),
    "focus_loss.mask_zero_or_one_epsilon": (0.0, None, True, True),
    "abs_beginning_end": (0.0, None, True, True), "abs_beginning_end_less_by": (0.0, None, True, True),
    "abs_beginning_end_minimume": (0.0, None, True, True),
    "RandomGrayscale_P": (0.0, 1.0, True, True), "ColorJitter_hue": (0.0, 0.5, True, True),
    "ColorJitter_brightness": (0.0, None, True, True), "ColorJitter_saturation": (0.0, None, True, True),
    "ColorJitter_contrast": (0.0, None, True, True), "RandomRotation_degree": (0, 360, True, True),
    "RandomAffine_translate_h": (0.0, 1.0, True, True), "RandomAffine_translate_w": (0.0, 1.0, True, True),
    "RandomResizedCrop_scale_min": (0.0, None, False, True), "RandomResizedCrop_scale_max": (0.0, None, False, True),
    "inbalenceDataSets.ratio_A_1_to_2": (0.0, 1.0, True, True),
    "inbalenceDataSets.ratio_B_1_to_2": (0.0, 1.0, True, True),
}
# A config is a small text file; anything bigger (or not text) is the wrong file.
MAX_CONFIG_BYTES = 1 << 20

# Keys the official train.py adds or reads beyond the published file.
_OPTIONAL_KEYS = {"vgg_model_path": str, "cuda_device": str, "iteration": int}


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file and the key."""


def _read_packaged(name: str) -> str:
    return resources.files("council_fast.configs").joinpath(f"{name}.yaml").read_text()


def default_config() -> dict:
    """The published anime2face config, every key with its value."""
    return yaml.safe_load(_read_packaged("defaults"))


_DEFAULTS = default_config()


def packaged_config(name: str) -> dict:
    """A config shipped with council-fast ('selfie2anime', 'tiny' or 'demo'), validated and filled."""
    if name not in PACKAGED_CONFIGS:
        raise ConfigError(f"no packaged config {name!r}; packaged: {', '.join(PACKAGED_CONFIGS)}")
    return _finish(yaml.safe_load(_read_packaged(name)), f"<packaged {name}>")


def load_config(path: str | os.PathLike) -> dict:
    """Read an official-format YAML config (or the name of a packaged one)."""
    path = os.fspath(path)
    if path in PACKAGED_CONFIGS and not os.path.exists(path):
        return packaged_config(path)
    try:
        raw = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _finish(raw, path)


def _packaged_hint(path: str) -> str:
    """For a bare name (no folder, no .yaml): the packaged configs it could have meant."""
    if os.path.dirname(path) or path.lower().endswith((".yaml", ".yml")):
        return ""
    return f" and no packaged config of that name (packaged: {', '.join(PACKAGED_CONFIGS)})"


def _read_text(path: str) -> str:
    """The file's text: a regular file of at most MAX_CONFIG_BYTES of UTF-8, else a ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block us
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found" + _packaged_hint(path)) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot open config file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file (a config is a YAML text file)")
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: over {MAX_CONFIG_BYTES // 1024} KB: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8): not a YAML config") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: holds NUL bytes: a binary file, not a YAML config")
    return text


def finish_config(raw: Any, source: str) -> dict:
    """A parsed config (e.g. the one a checkpoint carries) with defaults filled in, checked."""
    return _finish(raw, source)


def _finish(raw: Any, source: str) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    config = _merge(copy.deepcopy(_DEFAULTS), raw, _DEFAULTS, source, prefix="")
    validate_config(config, source)
    return config


def _merge(out: dict, raw: dict, defaults: dict, source: str, prefix: str) -> dict:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            if not prefix and key in _OPTIONAL_KEYS:
                out[key] = _coerce(dotted, value, _OPTIONAL_KEYS[key](), source)
                continue
            raise ConfigError(f"{source}: unknown key {dotted!r}" + _suggest(key, defaults))
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key {dotted!r} must be a mapping, got {value!r}")
            _merge(out[key], value, default, source, prefix=f"{dotted}.")
        else:
            out[key] = _coerce(dotted, value, default, source)
    return out


def _suggest(key: str, known: dict) -> str:
    close = difflib.get_close_matches(key, [k for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(dotted: str, value: Any, default: Any, source: str) -> Any:
    def fail(expected: str):
        raise ConfigError(f"{source}: key {dotted!r} must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool):
            fail("a number")
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' as a string
            try:
                value = float(value) if dotted not in _INT_KEYS else int(value.replace("_", ""))
            except ValueError:
                fail("an integer" if dotted in _INT_KEYS else "a number")
        if dotted in _INT_KEYS:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                fail("an integer")
            return value
        if not isinstance(value, (int, float)):
            fail("a number")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            fail("a string")
        return value
    return value


def parse_fraction(text: str | float) -> float:
    """Official configs write ratios like '4. / 3.'; read them without eval()."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = [p.strip() for p in str(text).split("/")]
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"not a number or a ratio: {text!r}")
    try:
        values = [fractions.Fraction(p.rstrip(".") if p.endswith(".") else p) for p in parts]
    except ValueError:
        raise ValueError(f"not a number or a ratio: {text!r}") from None
    return float(values[0] / values[1]) if len(values) == 2 else float(values[0])


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_config(config: dict, source: str = "<config>") -> None:
    """Check choices, ranges and combinations; raise ConfigError naming the key."""
    for dotted, choices in _CHOICES.items():
        value = _get(config, dotted)
        if value not in choices:
            raise ConfigError(f"{source}: key {dotted!r} must be one of {', '.join(choices)}; got {value!r}")
    _check_finite(config, source, "")
    for dotted in _POSITIVE_KEYS:
        if _get(config, dotted) <= 0:
            raise ConfigError(f"{source}: key {dotted!r} must be positive, got {_get(config, dotted)!r}")
    _check_ranges(config, source)
    _check_loss_weights(config, source)
    _check_schedules(config, source)
    for dotted in ("RandomResizedCrop_ratio_max", "RandomResizedCrop_ratio_min"):
        try:
            parse_fraction(config[dotted])
        except ValueError as e:
            raise ConfigError(f"{source}: key {dotted!r}: {e}") from None
    if config["gen"]["do_my_style"]:
        raise ConfigError(f"{source}: key 'gen.do_my_style': true is not supported (in the official code "
                          "that mode leaves the upsampling AdaIN layers without parameters)")
    if not (config["do_a2b"] or config["do_b2a"]):
        raise ConfigError(f"{source}: keys 'do_a2b' and 'do_b2a' are both false: nothing to train")
    if config["gen"]["n_downsample"] < 0 or config["gen"]["n_res"] < 0:
        raise ConfigError(f"{source}: keys 'gen.n_downsample' and 'gen.n_res' must not be negative")
    factor = 2 ** config["gen"]["n_downsample"]
    for dotted in ("crop_image_height", "crop_image_width"):
        if config[dotted] % factor:
            raise ConfigError(f"{source}: key {dotted!r} ({config[dotted]}) must be a multiple of "
                              f"2**gen.n_downsample = {factor} so the decoder restores the input size")
    if config["gen"]["dim"] * factor // factor != config["gen"]["dim"]:
        raise ConfigError(f"{source}: key 'gen.dim' is invalid")


# Switches the official trainer acts on that council-fast loads but does not act on: key -> what it does there
# and what to use here instead. FID needs the Inception weights file, so it is never switched on from the config.
_IGNORED_OFFICIAL_SWITCHES = {
    "misc.do_test_Fid": "FID on the test set every misc.test_Fid_iter iterations: here `train --eval-every N "
                        "--inception-weights F` (FID and KID per member)",
    "misc.start_tensor_board": "TensorBoard logging: here always RUN/log.jsonl, and RUN/tensorboard/ whenever the "
                               "tensorboard package is installed",
    "misc.do_telegram_report": "Telegram progress reports: not sent",
    "misc.do_telegram_send_config_file": "the config file sent by Telegram: not sent",
}


def ignored_official_keys(config: dict) -> list[str]:
    """The official switches that are on in ``config`` but have no effect in council-fast, each with what
    the official trainer does with it (``"key: explanation"``)."""
    return [f"{key} ({what})" for key, what in _IGNORED_OFFICIAL_SWITCHES.items() if _get(config, key) is True]


def official_keys_notice(config: dict, source: str = "<config>") -> str | None:
    """One line naming the official switches that are on but ignored here; None when there are none."""
    ignored = ignored_official_keys(config)
    if not ignored:
        return None
    return (f"note: {source}: these official config switches are on but council-fast ignores them: "
            + "; ".join(ignored))


def _check_finite(node: dict, source: str, prefix: str) -> None:
    """No NaN or infinite number anywhere (YAML reads .nan, .inf and 1e999 as floats)."""
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _check_finite(value, source, f"{dotted}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source}: key {dotted!r} must be a finite number, got {value!r}")


def _interval(low, high, low_in: bool, high_in: bool) -> str:
    if high is None:
        return f"{'at least' if low_in else 'greater than'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def _check_ranges(config: dict, source: str) -> None:
    for dotted, (low, high, low_in, high_in) in _RANGES.items():
        value = _get(config, dotted)
        if isinstance(value, str):  # the ratio keys hold strings; they are checked by parse_fraction
            continue
        below = value < low if low_in else value <= low
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            raise ConfigError(f"{source}: key {dotted!r} must be {_interval(low, high, low_in, high_in)}, "
                              f"got {value!r}")
    if config["RandomResizedCrop_scale_min"] > config["RandomResizedCrop_scale_max"]:
        raise ConfigError(f"{source}: key 'RandomResizedCrop_scale_min' ({config['RandomResizedCrop_scale_min']}) "
                          f"must not exceed 'RandomResizedCrop_scale_max' ({config['RandomResizedCrop_scale_max']})")


def _check_loss_weights(config: dict, source: str) -> None:
    """Every loss weight (a top-level key ending in _w) is a finite number >= 0."""
    for key, value in config.items():
        if key.endswith("_w") and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{source}: key {key!r} (a loss weight) must not be negative, got {value!r}")


def _check_schedules(config: dict, source: str) -> None:
    council = config["council"]
    if council["flipOnOff"]:
        for key in ("flipOnOff_On_iteration", "flipOnOff_Off_iteration"):
            if council[key] < 1:
                raise ConfigError(f"{source}: key 'council.{key}' must be at least 1 when council.flipOnOff is "
                                  f"true, got {council[key]!r}")
