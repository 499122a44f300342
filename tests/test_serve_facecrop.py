"""Face crop (OpenCV's bundled Haar cascade) for serve and convert.

tests/data/grace_hopper.jpg: the public-domain U.S. Navy portrait of Grace Hopper (as shipped in
matplotlib's sample data), 512x600; her face spans about x 150-380, y 100-330.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2", reason="the face extra is not installed: pip install -e '.[face]'")

from _serving import photo  # noqa: E402
from council_fast.cli import convert  # noqa: E402
from council_fast import images as cf_images  # noqa: E402
from council_fast.facecrop import crop_face, detect_faces  # noqa: E402

HOPPER = os.path.join(os.path.dirname(__file__), "data", "grace_hopper.jpg")


@pytest.fixture(scope="module")
def hopper():
    return Image.open(HOPPER).convert("RGB")


def test_finds_the_face_and_frames_it_square_inside_the_photo(hopper):
    faces = detect_faces(hopper)
    assert faces, "no face found in the Grace Hopper portrait"
    x, y, w, h = faces[0]
    assert 120 <= x <= 190 and 70 <= y <= 140 and 180 <= w <= 280, faces[0]
    crop = crop_face(hopper)
    assert crop.found and crop.box == faces[0]
    cx, cy, side, side2 = crop.crop
    assert side == side2 == crop.image.width == crop.image.height
    assert side == min(round(2.0 * w), *hopper.size)
    assert 0 <= cx and cx + side <= hopper.width and 0 <= cy and cy + side <= hopper.height
    assert cx <= x and x + w <= cx + side and cy <= y and y + h <= cy + side  # the face lies inside
    np.testing.assert_array_equal(np.asarray(crop.image), np.asarray(hopper.crop((cx, cy, cx + side, cy + side))))


def test_detection_is_found_at_any_photo_scale(hopper):
    big = hopper.resize((hopper.width * 3, hopper.height * 3))  # searched downscaled, boxes scaled back
    x, y, w, h = detect_faces(big)[0]
    x0, y0, w0, h0 = detect_faces(hopper)[0]
    assert abs(x - 3 * x0) < 30 and abs(y - 3 * y0) < 30 and abs(w - 3 * w0) < 45


def test_no_face_gives_the_centre_square_and_says_so():
    im = photo(1, 90, 50)
    crop = crop_face(im)
    assert not crop.found and crop.box is None
    assert crop.crop == (20, 0, 50, 50)
    assert crop.as_dict() == {"found": False, "box": None, "crop": [20, 0, 50, 50]}


def test_margin_below_one_is_refused(hopper):
    with pytest.raises(ValueError, match="margin"):
        crop_face(hopper, 0.5)


def test_convert_face_crop_translates_the_cropped_face(tmp_path, hopper):
    """convert --face-crop equals convert of the face crop saved as a file of the same name."""
    from _serving import make_checkpoint

    ckpt = make_checkpoint(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hopper.save(tmp_path / "a" / "hopper.png")
    crop_face(hopper).image.save(tmp_path / "b" / "hopper.png")

    def run(src, out, *extra):
        parser = argparse.ArgumentParser()
        convert.add_arguments(parser)
        return convert.run(parser.parse_args(["--quiet", "--workers", "0", "--device", "cpu", "--backend", "reference",
                                              "--config", "tiny", "--checkpoint", ckpt, "--member", "0",
                                              "--seed", "1", "--input", str(src), "--output", str(out), *extra]))
    assert run(tmp_path / "a" / "hopper.png", tmp_path / "oa", "--face-crop") == 0
    assert run(tmp_path / "b" / "hopper.png", tmp_path / "ob") == 0
    assert run(tmp_path / "a" / "hopper.png", tmp_path / "oc") == 0
    a, b, c = (np.asarray(Image.open(tmp_path / o / "hopper_m0_s0.png")) for o in ("oa", "ob", "oc"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # the crop changed what was translated
    assert cf_images.test_transform(crop_face(hopper).image, 32).shape == (3, 32, 32)


def test_serve_face_crop_reports_the_box(tmp_path, hopper):
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    import io

    from starlette.testclient import TestClient

    from _serving import make_checkpoint
    from council_fast.serving.app import ServeSettings, create_app
    from council_fast.serving.engine import ServingEngine

    engine = ServingEngine(make_checkpoint(tmp_path), "tiny", device="cpu", backend="reference", max_batch=2)
    buf = io.BytesIO()
    hopper.save(buf, format="JPEG")
    with TestClient(create_app(engine, ServeSettings(face_crop=True, max_batch=2))) as client:
        r = client.post("/v1/translate", files={"image": ("h.jpg", buf.getvalue(), "image/jpeg")}, data={"member": "0"})
        assert r.status_code == 200, r.text
        face = r.json()["face"]
        sent = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        assert face["found"] and face["box"] == list(crop_face(sent).box) and face["photo_size"] == [512, 600]
        off = client.post("/v1/translate", files={"image": ("h.jpg", buf.getvalue(), "image/jpeg")},
                          data={"member": "0", "face_crop": "0"})
        assert off.status_code == 200 and off.json()["face"] is None
        flat = client.post("/v1/translate", files={"image": ("f.png", buf.getvalue(), "image/jpeg")},
                           data={"member": "0", "face_crop": "maybe"})
        assert flat.status_code == 422 and "face_crop" in flat.json()["error"]
