"""Find the largest face in a photo and crop it the way the selfie2anime training faces are framed.

The detector is OpenCV's bundled frontal-face Haar cascade (``cv2.data.haarcascades``, shipped inside
the opencv-python-headless wheel: no model download). OpenCV is an optional extra
(``pip install "council-fast[face]"``); it is imported when a face crop is first asked for.

Framing: the selfie2anime faces show the whole head with some hair and neck around it, the face
near the centre. The cascade's box spans brows to mouth, so the crop is a square of ``margin``
times the box's side (default 2.0), centred on the box with the centre moved up by a tenth of the
box (more hair than chin), shifted (not shrunk) to stay inside the photo where it can, and clipped
where the photo is too small. Without a face the crop is the largest centred square and
``found`` is False.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["FaceCrop", "FaceCropError", "crop_face", "detect_faces", "check_available", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 2.0
_DETECT_SIDE = 640  # the photo is searched at most this large (faster; boxes are scaled back)
_CASCADE = "haarcascade_frontalface_default.xml"
_lock = threading.Lock()
_classifiers: dict[int, object] = {}  # thread id -> CascadeClassifier (not thread-safe to share)


class FaceCropError(RuntimeError):
    """Face detection cannot run here (OpenCV missing or its cascade file absent)."""


@dataclass(frozen=True)
class FaceCrop:
    image: Image.Image
    found: bool
    box: tuple[int, int, int, int] | None  # the detected face (x, y, w, h) in the photo's pixels
    crop: tuple[int, int, int, int]  # the square cut out (x, y, w, h)

    def as_dict(self) -> dict:
        return {"found": self.found, "box": list(self.box) if self.box else None, "crop": list(self.crop)}


def _cv2():
    try:
        import cv2
    except ImportError:
        raise FaceCropError('face crop needs OpenCV: pip install "council-fast[face]" '
                            "(opencv-python-headless)") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise FaceCropError(f"OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5): "
                            'pip install "opencv-python-headless<5"')
    return cv2


def check_available() -> None:
    """Raise FaceCropError now (naming the extra to install) if face crop could not run."""
    _classifier()


def _classifier():
    cv2 = _cv2()
    key = threading.get_ident()
    with _lock:
        clf = _classifiers.get(key)
        if clf is None:
            path = os.path.join(cv2.data.haarcascades, _CASCADE)
            clf = cv2.CascadeClassifier(path)
            if clf.empty():
                raise FaceCropError(f"{path}: OpenCV's bundled face cascade could not be loaded")
            _classifiers[key] = clf
    return cv2, clf


def detect_faces(im: Image.Image) -> list[tuple[int, int, int, int]]:
    """Frontal faces (x, y, w, h) in ``im``'s pixels, largest first."""
    cv2, clf = _classifier()
    grey = np.asarray(im.convert("L"))
    scale = min(1.0, _DETECT_SIDE / max(grey.shape))
    if scale < 1.0:
        grey = cv2.resize(grey, (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    side = min(grey.shape)
    found = clf.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(max(20, side // 10),) * 2)
    boxes = [tuple(int(round(v / scale)) for v in box) for box in np.asarray(found).reshape(-1, 4)]
    return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)


def _square_around(box, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    x, y, w, h = box
    side = min(int(round(max(w, h) * margin)), width, height)
    cx, cy = x + w / 2, y + h / 2 - 0.1 * h
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, side, side


def _centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def crop_face(im: Image.Image, margin: float = DEFAULT_MARGIN) -> FaceCrop:
    """The largest face framed as the training faces are, or the centred square if none is found."""
    if margin < 1.0:
        raise ValueError(f"face-crop margin must be at least 1, got {margin}")
    faces = detect_faces(im)
    box = faces[0] if faces else None
    crop = _square_around(box, *im.size, margin) if box else _centre_square(*im.size)
    x, y, w, h = crop
    return FaceCrop(im.crop((x, y, x + w, y + h)), box is not None, box, crop)
