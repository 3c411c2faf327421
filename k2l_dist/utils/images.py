"""Image files read and written by their bytes, whatever their names.

OpenCV's ``imread``/``imwrite`` take the file name as a C string: a name that is not
valid UTF-8 (Latin-1 bytes from an old camera or archive) reaches them as a Python
string with surrogate escapes and can crash the process. Reading the bytes in Python
(which passes the name to the OS as it came) and decoding them in memory cannot.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from k2l_dist.utils.io import atomic_write_bytes


def read_image(path: str | Path) -> np.ndarray | None:
    """An image file as HWC BGR uint8, or None when it cannot be read or decoded."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    if data.size == 0:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if image is None or image.size == 0 else image


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode ``image`` (HWC BGR) in the format of ``path``'s suffix and write it atomically."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode an image as {path.suffix or '.png'}")
    atomic_write_bytes(path, encoded.tobytes())
