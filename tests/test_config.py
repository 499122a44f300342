"""Config loading: the published file as written officially, defaults, and clear errors."""
from __future__ import annotations

import pytest

from council_fast.config import ConfigError, default_config, load_config, parse_fraction

# Every key of the published anime2face_council_folder.yaml, written the way the official file writes
# it: 1_000-style numbers, True/False, '4. / 3.' ratios, trailing comments.
OFFICIAL_STYLE_YAML = """\
# logger options
image_save_iter: 1_000                  # how often test images are written
image_display_iter: 100
display_size: 15
snapshot_save_iter: 10_000              # how often models are saved
log_iter: 1
random_seed: 1
max_iter: 1_500_000                     # maximum number of training iterations
batch_size: 3
weight_decay: 0.0001
beta1: 0.5
beta2: 0.999
init: kaiming
lr: 0.0001                              # initial learning rate
lr_policy: step
step_size: 100_000                      # how often the learning rate decays
gamma: 0.5
gan_w: 26                               # weight of the adversarial loss
recon_x_w: 0
recon_s_w: 0
recon_c_w: 0
recon_x_cyc_w: 0
vgg_w: 0
council_w: 6                            # weight of the council loss
council_abs_w: 0
council_abs_gray_scale: False
mask_zero_or_one_w: 0
mask_total_w: 0
mask_tv_w: 0
focus_loss:                             # section
  mask_zero_or_one_center: 0.5
  mask_zero_or_one_epsilon: 0.01
  mask_small_use_abs: False
  mask_small_use_square: True
  focus_loss_start_at_iter: 2_000
  do_w_loss_matching_focus: False
abs_beginning_end: 0
abs_beginning_end_less_by: 1
abs_beginning_end_minimume: 0
do_w_loss_matching: True
loss_matching_hist_size: 100
gen:                                    # section
  dim: 64
  mlp_dim: 256
  style_dim: 64
  do_my_style: False
  activ: relu
  n_downsample: 2
  n_res: 5
  pad_type: zero
  useRandomDis: False
  num_of_mask_dim_to_add: 3
dis:                                    # section
  dim: 64
  norm: none
  activ: lrelu
  n_layer: 4
  gan_type: lsgan
  num_scales: 2
  pad_type: zero
  useRandomGen: False
  do_Dis_only_gray: False
  numberOf_dis_relative_iteration: 1
council:                                # section
  council_size: 4
  numberOfCouncil_dis_relative_iteration: 4
  flipOnOff: False
  flipOnOff_start_with: True
  flipOnOff_On_iteration: 45
  flipOnOff_Off_iteration: 5
  discriminetro_less_style_by: 0.7
  council_start_at_iter: 1_000          # council loss starts here
do_a2b: False
do_b2a: True
input_dim_a: 3
input_dim_b: 3
num_workers: 8
new_size: 128                           # shorter side after resizing
crop_image_height: 128
crop_image_width: 128
do_HorizontalFlip: True
do_VerticalFlip: False
do_ColorJitter_A: False
do_ColorJitter_B: False
ColorJitter_hue: 0.1
ColorJitter_brightness: 0.25
ColorJitter_saturation: 0.25
ColorJitter_contrast: 0.25
do_RandomGrayscale: True
RandomGrayscale_P: 0.05
do_RandomRotation: False
RandomRotation_degree: 35
do_RandomAffine: False
RandomAffine_translate_h: 0.2
RandomAffine_translate_w: 0.2
do_RandomPerspective: False
do_RandomResizedCrop: False
RandomResizedCrop_scale_max: 2
RandomResizedCrop_scale_min: 0.5
RandomResizedCrop_ratio_max: 4. / 3.    # a ratio written as an expression
RandomResizedCrop_ratio_min: 3. / 4.
data_root: ./datasets/selfie2anime
inbalenceDataSets:                      # section
  imbalance_sub_dataset: False
  ratio_A_1_to_2: 0.5
  ratio_B_1_to_2: 0.5
misc:                                   # section
  start_tensor_board: True
  start_tensor_board port: 6006
  do_test_Fid: True
  test_Fid_iter: 1_000
  test_Fid_num_of_im: 100
  do_telegram_report: True
  do_telegram_send_config_file: True
  telegram_report_add_prefix: selfie2anime_
"""


def _write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_official_style_file_loads_with_published_values(tmp_path):
    config = load_config(_write(tmp_path, OFFICIAL_STYLE_YAML))
    assert config == default_config()
    assert config["max_iter"] == 1_500_000 and isinstance(config["max_iter"], int)
    assert config["snapshot_save_iter"] == 10000
    assert config["council"]["council_start_at_iter"] == 1000
    assert config["lr"] == pytest.approx(1e-4)
    assert config["council"]["discriminetro_less_style_by"] == pytest.approx(0.7)
    assert parse_fraction(config["RandomResizedCrop_ratio_max"]) == pytest.approx(4 / 3)
    assert parse_fraction(config["RandomResizedCrop_ratio_min"]) == pytest.approx(3 / 4)
    assert config["do_b2a"] is True and config["do_a2b"] is False


def test_fixture_covers_every_published_key():
    import yaml
    loaded = yaml.safe_load(OFFICIAL_STYLE_YAML)

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict)
                                          for x in keys(v, f"{prefix}{k}.")}
    assert keys(loaded) == keys(default_config())


def test_missing_keys_take_defaults(tmp_path):
    config = load_config(_write(tmp_path, "batch_size: 5\ngen:\n  dim: 16\n"))
    defaults = default_config()
    assert config["batch_size"] == 5 and config["gen"]["dim"] == 16
    assert config["gen"]["mlp_dim"] == defaults["gen"]["mlp_dim"]
    assert config["council"] == defaults["council"]


def test_lr_written_as_1e_minus_4_string_is_a_float(tmp_path):
    config = load_config(_write(tmp_path, "lr: 1e-4\n"))
    assert isinstance(config["lr"], float) and config["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("text, key", [
    ("gan_weight: 3\n", "gan_weight"),
    ("gen:\n  dimm: 3\n", "gen.dimm"),
    ("batch_size: three\n", "batch_size"),
    ("council:\n  council_size: 2.5\n", "council.council_size"),
    ("do_b2a: 1\n", "do_b2a"),
    ("init: uniform\n", "init"),
    ("dis:\n  gan_type: wgan\n", "dis.gan_type"),
    ("gen: 5\n", "gen"),
])
def test_bad_keys_and_values_name_the_key_and_file(tmp_path, text, key):
    path = _write(tmp_path, text, "bad_config.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert repr(key) in message or key in message
    assert "bad_config.yaml" in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("tinyy")
    assert "packaged: selfie2anime, tiny, demo" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("configs/mine.yaml")
    assert "packaged" not in str(err.value)
