"""Readers that list a dataset's images and annotations as :class:`SourceItem` records.

A reader only parses annotation files; images are opened later, in parallel, by
:mod:`k2l_dist.prepare`. Every item gets a stable integer id: its position in the
reader's listing (annotation order, or sorted file order for folders), so ids do not
change when some images are skipped. Problems with one line or file become
:class:`Skip` records with a named reason; a missing root or annotation file is a
:class:`DatasetError`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np

from k2l_dist.config import DataFormat

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FORMATS = get_args(DataFormat)
FACE5_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")  # MTFL and CelebA order
LSP_JOINTS = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle", "right_wrist",
              "right_elbow", "right_shoulder", "left_shoulder", "left_elbow", "left_wrist", "neck", "head_top")


class DatasetError(ValueError):
    """A dataset that cannot be read at all (missing root, annotation file, bad format name)."""


@dataclass(frozen=True)
class SourceItem:
    id: int
    path: str  # relative to the dataset root, exactly as the annotation names it
    landmarks: np.ndarray | None = None  # (K, 2) float32 original pixels, pixel-centre convention
    visible: np.ndarray | None = None  # (K,) bool
    rect: tuple[float, float, float, float] | None = None  # x, y, w, h from a box file (edge coords)
    # Role in the dataset's own protocol: "test" (held out), "train" (fits the regressors),
    # "" (not listed: trains the networks only, or a format without a protocol)
    split: str = ""
    video: str = ""  # the video the frame belongs to; "" for a still image
    frame: int = -1  # the frame's index within its video (from 0); -1 for a still image


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str  # short, countable category, e.g. "unreadable image"
    detail: str = ""  # the specifics (line number, value)


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    return root


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not str(path) or not path.is_file():
        raise DatasetError(f"{what} not found: {path}")
    return path


def read_folder(root: str | Path) -> tuple[list[SourceItem], list[Skip]]:
    """Every image file under ``root`` (recursively, sorted): unlabelled data."""
    root = _require_dir(root)
    paths, skips = [], []

    def unreadable(err: OSError) -> None:  # os.walk would leave the folder out without a word
        where = Path(err.filename or root)
        skips.append(Skip(where.relative_to(root).as_posix() if where.is_relative_to(root) else str(where),
                          "unreadable folder", f"{where}: {err.strerror or err}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(Path(dirpath, name).relative_to(root).as_posix())
    paths.sort()
    for s in skips:
        log.warning("%s: %s, its images are left out", s.detail, s.reason)
    return [SourceItem(i, p) for i, p in enumerate(paths)], skips


def _mtfl_items(ann: Path, first_id: int = 0, split: str = "") -> tuple[list[SourceItem], list[Skip]]:
    """MTFL lines ``path x1..x5 y1..y5 gender smile glasses pose``; ids count non-blank lines from ``first_id``."""
    items: list[SourceItem] = []
    skips: list[Skip] = []
    lines = [ln for ln in ann.read_text().splitlines() if ln.strip()]
    for number, line in enumerate(lines, 1):
        fields = line.split()
        where = f"{ann.name} line {number}"
        if len(fields) != 15:
            skips.append(Skip(fields[0] if fields else where, "malformed annotation line",
                              f"{where}: expected 15 fields, got {len(fields)}"))
            continue
        try:
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
                values = np.array([float(v) for v in fields[1:11]], np.float32)
        except ValueError:
            skips.append(Skip(fields[0], "malformed annotation line", f"{where}: non-numeric coordinate"))
            continue
        if not np.isfinite(values).all():  # float() accepts 'nan' and 'inf'; no crop or score can use them
            skips.append(Skip(fields[0], "malformed annotation line", f"{where}: non-finite coordinate"))
            continue
        landmarks = np.stack([values[:5], values[5:]], axis=1)
        # the original files write Windows paths (lfw_5590\x.jpg, AFLW\y.jpg)
        items.append(SourceItem(first_id + number - 1, fields[0].replace("\\", "/"), landmarks, np.ones(5, bool),
                                split=split))
    return items, skips


def read_mtfl(root: str | Path, annotations: str | Path) -> tuple[list[SourceItem], list[Skip]]:
    """MTFL ``training.txt``: ``path x1..x5 y1..y5 gender smile glasses pose`` per line."""
    _require_dir(root)
    return _mtfl_items(_require_file(annotations, "annotation file"))


def read_aflw(root: str | Path, annotations: str | Path,
              test_list: str | Path) -> tuple[list[SourceItem], list[Skip]]:
    """AFLW as MTFL packages it: MTFL's ``training.txt`` (10,000 faces from LFW and the web)
    trains, and the lines of its ``testing.txt`` whose images live in ``AFLW/`` (2,995
    faces) are the protocol's test set. Both files have the MTFL line format; test ids
    follow the training lines' ids. Other ``testing.txt`` lines are not listed.
    """
    _require_dir(root)
    train, skips = _mtfl_items(_require_file(annotations, "data.annotations (MTFL training.txt)"), split="train")
    first = sum(1 for ln in Path(annotations).read_text().splitlines() if ln.strip())
    test, test_skips = _mtfl_items(_require_file(test_list, "data.test_list (MTFL testing.txt)"), first, "test")
    test = [item for item in test if item.path.startswith("AFLW/")]
    if not test:
        raise DatasetError(f"data.test_list: {test_list} has no line whose image is under AFLW/")
    return train + test, skips + test_skips


def _read_name_list(path: Path) -> dict[str, int]:
    """Image file name → line number, from a list with one name (then anything) per line."""
    names: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if fields:
            names.setdefault(fields[0].replace("\\", "/").rsplit("/", 1)[-1], number)
    return names


def _celeba_landmarks(ann: Path) -> tuple[list[tuple[str, np.ndarray | None]], list[Skip]]:
    """``list_landmarks_align_celeba.txt``: a count line, a column-names line, then
    ``name x1 y1 ... x5 y5`` (interleaved) per image; malformed lines come back as
    ``(name, None)`` so that ids stay line positions."""
    lines = [ln for ln in ann.read_text().splitlines() if ln.strip()]
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DatasetError(f"{ann} line 1: expected the image count of a CelebA landmark file")
    if len(lines[1].split()) != 10:
        raise DatasetError(f"{ann} line 2: expected 10 column names (lefteye_x ... rightmouth_y), "
                           f"got {len(lines[1].split())}")
    declared = int(lines[0])
    if declared != len(lines) - 2:
        raise DatasetError(f"{ann} line 1: declares {declared} images but {len(lines) - 2} lines follow "
                           f"(truncated file?)")
    out: list[tuple[str, np.ndarray | None]] = []
    skips: list[Skip] = []
    for number, line in enumerate(lines[2:], 3):
        fields = line.split()
        where = f"{ann.name} line {number}"
        try:
            if len(fields) != 11:
                raise ValueError(f"expected 11 fields, got {len(fields)}")
            with np.errstate(over="ignore"):
                values = np.array([float(v) for v in fields[1:]], np.float32)
            if not np.isfinite(values).all():
                raise ValueError("non-finite coordinate")
        except ValueError as err:
            skips.append(Skip(fields[0] if fields else where, "malformed annotation line", f"{where}: {err}"))
            out.append((fields[0] if fields else "", None))
            continue
        out.append((fields[0], values.reshape(5, 2)))
    return out, skips


def read_mafl(root: str | Path, annotations: str | Path, train_list: str | Path,
              test_list: str | Path, partition: str | Path = "") -> tuple[list[SourceItem], list[Skip]]:
    """CelebA images with their 5 landmarks, in MAFL's protocol (Zhang et al. 2016).

    ``annotations``: CelebA's ``list_landmarks_align_celeba.txt`` (landmarks of the aligned
    images in ``root``, e.g. ``img_align_celeba/``; used as given, like MTFL's). Every image
    is listed, id = its position in that file; MAFL's ``testing.txt`` names the held-out
    images ("test": never trained on), its ``training.txt`` the images the regressors are
    fitted on ("train"). The other ~180k CelebA images train the networks only (paper Sec. 4.1).
    ``partition``: CelebA's ``list_eval_partition.txt``; when given, only its training
    partition (0) trains the networks, as in the paper, besides MAFL's listed images.
    """
    _require_dir(root)
    entries, skips = _celeba_landmarks(_require_file(annotations, "data.annotations (list_landmarks_align_celeba.txt)"))
    test_path = _require_file(test_list, "data.test_list (MAFL testing.txt)")
    train_path = _require_file(train_list, "data.train_list (MAFL training.txt)")
    test, train = _read_name_list(test_path), _read_name_list(train_path)
    both = sorted(set(test) & set(train))
    if both:
        raise DatasetError(f"{train_path} line {train[both[0]]} and {test_path} line {test[both[0]]} both list "
                           f"{both[0]}: an image cannot train the regressor and be held out")
    training = _celeba_partition(_require_file(partition, "data.partition_file (list_eval_partition.txt)")) \
        if partition else None
    items: list[SourceItem] = []
    listed: set[str] = set()
    for i, (name, landmarks) in enumerate(entries):
        key = name.rsplit("/", 1)[-1]
        listed.add(key)  # a malformed line is already a skip: not "without landmarks" too
        if landmarks is None:
            continue
        split = "test" if key in test else "train" if key in train else ""
        if training is not None and not split and key not in training:
            continue  # CelebA's validation and test partitions: not the paper's training set
        items.append(SourceItem(i, name, landmarks, np.ones(5, bool), split=split))
    for names, path in ((test, test_path), (train, train_path)):
        for name, number in names.items():
            if name not in listed:
                skips.append(Skip(name, "listed image without landmarks", f"{path.name} line {number}"))
    return items, skips


def _celeba_partition(path: Path) -> set[str]:
    """The image names of CelebA's training partition (lines ``name 0``) in ``list_eval_partition.txt``."""
    names = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DatasetError(f"{path} line {number}: expected 'image.jpg 0|1|2', got {line!r}")
        if fields[1] == "0":
            names.add(fields[0])
    return names


def _joints_mat(root: Path, annotations: str | Path | None, name: str) -> tuple[Path, np.ndarray]:
    """The ``joints`` array of an LSP-style ``joints.mat`` (``annotations``, else ``root/joints.mat``)."""
    import scipy.io

    ann = _require_file(annotations or root / "joints.mat", "annotation file")
    try:
        return ann, scipy.io.loadmat(ann)["joints"]
    except (KeyError, ValueError, OSError) as err:
        raise DatasetError(f"{ann}: not an {name} joints.mat with a 'joints' array ({err})") from None


def read_lsp(root: str | Path, annotations: str | Path | None = None) -> tuple[list[SourceItem], list[Skip]]:
    """Leeds Sports Pose: ``joints.mat`` (3×14×N: x, y, flag) and ``images/im0001.jpg``…

    In the original LSP release the flag is 0 for a visible joint (92.7% of entries are 0),
    so ``visible = flag == 0``; occluded joints keep their annotated positions.
    """
    root = _require_dir(root)
    ann, joints = _joints_mat(root, annotations, "LSP")
    if joints.ndim != 3 or joints.shape[0] != 3 or joints.shape[1] != len(LSP_JOINTS):
        raise DatasetError(f"{ann}: 'joints' has shape {joints.shape}, expected (3, {len(LSP_JOINTS)}, N): x, y "
                           f"and a flag for LSP's {len(LSP_JOINTS)} joints in each of N images")
    items, skips = [], []
    for i in range(joints.shape[2]):
        landmarks = joints[:2, :, i].T.astype(np.float32)
        path = f"images/im{i + 1:04d}.jpg"
        if not np.isfinite(landmarks).all(1).any():  # no joint to build a box from or to score
            skips.append(Skip(path, "malformed annotation", f"{ann.name} image {i + 1}: no joint has finite x and y"))
            continue
        items.append(SourceItem(i, path, landmarks, joints[2, :, i] == 0))
    return items, skips


def _parse_pts(path: Path) -> np.ndarray:
    text = path.read_text().split("{", 1)
    if len(text) != 2 or "}" not in text[1]:
        raise ValueError("no '{ ... }' block")
    values = [float(v) for v in text[1].split("}", 1)[0].split()]
    if not values or len(values) % 2:
        raise ValueError(f"{len(values)} numbers inside the point block")
    for line in text[0].splitlines():  # header "n_points: 68": a cut-off block must not pass
        key, _, value = line.partition(":")
        if key.strip() == "n_points" and value.strip().isdigit() and int(value) != len(values) // 2:
            raise ValueError(f"n_points: {int(value)} in the header, {len(values) // 2} points in the block")
    with np.errstate(over="ignore"):
        points = np.array(values, np.float32)
    if not np.isfinite(points).all():  # 'nan', 'inf', or beyond float32
        raise ValueError("non-finite coordinate inside the point block")
    return points.reshape(-1, 2)


def read_pts(root: str | Path, one_based: bool = True) -> tuple[list[SourceItem], list[Skip]]:
    """300-W style: every image under ``root`` with a same-named ``.pts`` beside it.

    300-W coordinates are 1-based (MATLAB convention); with ``one_based`` they are shifted
    by -1 into the project's 0-based pixel-centre convention.
    """
    folder_items, _ = read_folder(root)
    root = Path(root)
    items: list[SourceItem] = []
    skips: list[Skip] = []
    expected = None
    for item in folder_items:
        pts_path = (root / item.path).with_suffix(".pts")
        if not pts_path.is_file():
            skips.append(Skip(item.path, "missing .pts file", str(pts_path)))
            continue
        try:
            landmarks = _parse_pts(pts_path) - (1.0 if one_based else 0.0)
        except (ValueError, UnicodeDecodeError) as err:
            skips.append(Skip(item.path, "malformed .pts file", f"{pts_path.name}: {err}"))
            continue
        expected = expected or len(landmarks)
        if len(landmarks) != expected:
            skips.append(Skip(item.path, "malformed .pts file",
                              f"{pts_path.name}: {len(landmarks)} points, others have {expected}"))
            continue
        items.append(SourceItem(item.id, item.path, landmarks, np.ones(len(landmarks), bool)))
    return items, skips


def read_synthetic(count: int) -> tuple[list[SourceItem], list[Skip]]:
    """Synthetic items are rendered by the prepare workers from (id, seed)."""
    return [SourceItem(i, f"synthetic/{i:06d}.png") for i in range(count)], []


def read_synthetic_video(videos: int, frames: int) -> tuple[list[SourceItem], list[Skip]]:
    """Synthetic clips, rendered frame by frame by the prepare workers from (video, frame, seed)."""
    return [SourceItem(v * frames + t, f"synthetic_video/{v:05d}/{t:05d}.png", video=f"{v:05d}", frame=t)
            for v in range(videos) for t in range(frames)], []


def read_box_file(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """Box file lines: ``relative/path x y w h`` (original pixels, top-left edge corner)."""
    path = _require_file(path, "box file")
    boxes = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 5:
            raise DatasetError(f"{path} line {number}: expected 'path x y w h', got {len(fields)} fields")
        try:
            box = tuple(float(v) for v in fields[1:])
        except ValueError:
            raise DatasetError(f"{path} line {number}: non-numeric box value") from None
        if not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:  # a crop needs a real, non-empty box
            raise DatasetError(f"{path} line {number}: box '{' '.join(fields[1:])}' needs finite values and w, h > 0")
        boxes[fields[0]] = box
    return boxes


def read_lspet(root: str | Path, annotations: str | Path | None = None) -> tuple[list[SourceItem], list[Skip]]:
    """LSP Extended (LSPet): ``joints.mat`` (14×3×N: x, y, flag) and ``images/im00001.jpg``…

    The joints are LSP's 14 in LSP's order, but the array is 14×3×N and the flag is 1 for
    a visible joint (the opposite of LSP's). A joint with flag 0 was not annotated (its
    coordinates are placeholders, often outside the image): it is left out (NaN).
    """
    root = _require_dir(root)
    ann, joints = _joints_mat(root, annotations, "LSPet")
    if joints.ndim != 3 or joints.shape[:2] != (len(LSP_JOINTS), 3):
        raise DatasetError(f"{ann}: 'joints' has shape {joints.shape}, expected ({len(LSP_JOINTS)}, 3, N): x, y "
                           f"and a visibility flag for LSP's {len(LSP_JOINTS)} joints in each of N images"
                           + (" (this is LSP's 3×14×N layout: data.format=lsp)" if joints.shape[:2] == (3, 14) else ""))
    items, skips = [], []
    for i in range(joints.shape[2]):
        visible = joints[:, 2, i] == 1
        landmarks = np.where(visible[:, None], joints[:, :2, i], np.nan).astype(np.float32)
        path = f"images/im{i + 1:05d}.jpg"
        if visible.sum() < 2:  # no box to crop and nothing to score
            skips.append(Skip(path, "malformed annotation", f"{ann.name} image {i + 1}: fewer than 2 annotated joints"))
            continue
        items.append(SourceItem(i, path, landmarks, visible))
    return items, skips


def read_items(fmt: str, root: str, annotations: str = "", synthetic_count: int = 0,
               pts_one_based: bool = True, test_list: str = "",
               train_list: str = "", partition: str = "", frame_every: int = 0,
               decode_dir: str = "", synthetic_frames: int = 24) -> tuple[list[SourceItem], list[Skip]]:
    """Dispatch on the dataset format name. Video formats keep one training frame in
    ``frame_every`` (0: the format's protocol, see :mod:`k2l_dist.data.video`); ``decode_dir``
    receives the frames decoded from video files (format video; default inside ``root``)."""
    if fmt == "synthetic":
        return read_synthetic(synthetic_count)
    if fmt == "synthetic_video":
        return read_synthetic_video(synthetic_count, synthetic_frames)
    if fmt == "folder":
        return read_folder(root)
    if fmt == "mtfl":
        return read_mtfl(root, annotations or Path(root) / "training.txt")
    if fmt == "lsp":
        return read_lsp(root, annotations or None)
    if fmt == "lspet":
        return read_lspet(root, annotations or None)
    if fmt == "pts":
        return read_pts(root, pts_one_based)
    if fmt == "aflw":
        return read_aflw(root, annotations or Path(root) / "training.txt", test_list or Path(root) / "testing.txt")
    if fmt == "mafl":
        for key, value in (("data.annotations", annotations), ("data.train_list", train_list),
                           ("data.test_list", test_list)):
            if not value:
                raise DatasetError(f"{key}: required for format mafl (CelebA landmarks, MAFL training/testing lists)")
        return read_mafl(root, annotations, train_list, test_list, partition)
    from k2l_dist.data import video  # video imports this module: not at the top

    if fmt == "video":
        return video.read_video_folder(root, frame_every or 1, decode_dir or None)
    if fmt == "penn_action":
        return video.read_penn_action(root, frame_every or 1)
    if fmt == "bbcpose":
        return video.read_bbcpose(root, annotations or Path(root) / "bbcpose.mat", frame_every or 10)
    if fmt == "human36m":
        return video.read_human36m(root, frame_every or 50)
    raise DatasetError(f"data.format: unknown dataset format '{fmt}' (known: {', '.join(FORMATS)})")
