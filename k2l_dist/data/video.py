"""Readers for video datasets: a folder of videos, Penn Action, BBCPose and Human3.6M.

Like :mod:`k2l_dist.data.readers`, a reader only lists frames and parses annotations,
returning ``(items, skips)``. Every frame gets a stable id: its position among all the
frames of all the videos of the listing (annotation order, or natural file order), counted
before any frame is thinned out or a video is left out by the protocol, so that the same
frame keeps its id whatever ``every`` or category selection is asked. Each item names its
video (``SourceItem.video``) and its index in that video (``SourceItem.frame``, from 0),
so that splits can keep a video whole and nearby frames can be found.

``every`` keeps frame ``i`` of a video when ``i % every == 0``. It thins the frames that
train; a protocol's test frames are always the protocol's own.

Coordinates are used as the annotation files give them, as :func:`read_lsp` does for
LSP's MATLAB files: neither Penn Action, BBCPose nor the Human3.6M release documents a
1-based origin (only 300-W's ``.pts`` files do, see :func:`read_pts`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from k2l_dist.data.readers import (
    IMAGE_EXTENSIONS,
    LSP_JOINTS,
    DatasetError,
    Skip,
    SourceItem,
    _require_dir,
    _require_file,
)
from k2l_dist.utils.io import atomic_write_text

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DECODE_DIR = ".k2l_frames"  # default folder (inside the root) for frames decoded from video files
DECODE_MARKER = ".complete"  # written last in a video's decode folder: the decode is whole
JPEG_QUALITY = 95

# Penn Action's README, "List of Annotated Joints" (columns of x, y and visibility)
PENN_ACTION_JOINTS = ("head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist",
                      "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# The categories of Lorenz et al. 2019 that the paper evaluates on (Sec. 4.1)
PENN_ACTION_PAPER_CATEGORIES = ("tennis_serve", "tennis_forehand", "baseball_pitch", "baseball_swing",
                                "jumping_jacks", "golf_swing")

# BBCPose (Charles et al.), person-centric: the order of the VGG upper-body sets (BBCPose, YouTube Pose)
BBCPOSE_JOINTS = ("head", "right_wrist", "left_wrist", "right_elbow", "left_elbow", "right_shoulder",
                  "left_shoulder")
BBCPOSE_VIDEOS = 20  # bbcpose.mat's first 20 entries; the others are Extended BBC Pose

# Human3.6M's 32-joint skeleton (the order of its D2_Positions files); "*_site" are end sites
H36M_ALL_JOINTS = (
    "hip", "right_hip", "right_knee", "right_ankle", "right_toe", "right_toe_site",
    "left_hip", "left_knee", "left_ankle", "left_toe", "left_toe_site",
    "lower_spine", "spine", "thorax", "neck", "head",
    "left_shoulder_anchor", "left_shoulder", "left_elbow", "left_wrist", "left_thumb", "left_thumb_site",
    "left_wrist_end", "left_wrist_end_site",
    "right_shoulder_anchor", "right_shoulder", "right_elbow", "right_wrist", "right_thumb", "right_thumb_site",
    "right_wrist_end", "right_wrist_end_site",
)
# The 17 joints that move independently (the rest duplicate a neighbour or sit at an end
# site): the ones listed and evaluated, in this order
H36M_EVALUATED = (0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 15, 17, 18, 19, 25, 26, 27)
H36M_JOINTS = tuple(H36M_ALL_JOINTS[i] for i in H36M_EVALUATED)
H36M_TRAIN_SUBJECTS = ("S1", "S5", "S6", "S7", "S8", "S9")
H36M_TEST_SUBJECTS = ("S11",)
H36M_ACTIVITIES = ("Directions", "Discussion", "Posing", "Waiting", "Greeting", "Walking")

JOINT_NAMES = {"penn_action": PENN_ACTION_JOINTS, "bbcpose": BBCPOSE_JOINTS, "human36m": H36M_JOINTS,
               "lsp": LSP_JOINTS, "lspet": LSP_JOINTS}


def shoulder_indices(fmt: str) -> tuple[int, int]:
    """The (left, right) shoulder landmarks of a body format: the shoulder distance that
    normalises errors on BBCPose and Human3.6M (paper Sec. 4.1)."""
    if fmt not in JOINT_NAMES:
        raise ValueError(f"format {fmt!r} has no named shoulders (body formats: {', '.join(JOINT_NAMES)})")
    names = JOINT_NAMES[fmt]
    return names.index("left_shoulder"), names.index("right_shoulder")


def _natural_key(name: str) -> list:
    """Sort key that orders digit runs by value: ``2.jpg`` before ``10.jpg``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _check_every(every: int) -> None:
    if every < 1:
        raise DatasetError(f"data.frame_every: keep one frame in N needs N >= 1, got {every}")


def _listed_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (as readers list paths), else absolute."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path.resolve())


# ----------------------------------------------------------------------------- folders of videos


def read_video_folder(root: str | Path, every: int = 1,
                      decode_dir: str | Path | None = None) -> tuple[list[SourceItem], list[Skip]]:
    """Unlabelled videos: each entry of ``root`` is a folder of frame images (one video,
    frames in natural order: ``2.jpg`` before ``10.jpg``) or a video file (.mp4 .avi .mov
    .mkv .webm).

    Video files are decoded once, with OpenCV, into ``decode_dir/<video>/<frame:06d>.jpg``
    (default ``root/.k2l_frames``; entries of ``root`` whose names start with ``.`` are not
    videos). A video's folder is complete when its marker file is there; a later call reuses
    it. Frame paths outside ``root`` are absolute. ``video`` is the folder name or the file
    stem; ``frame`` is the frame's position in the video.
    """
    root = _require_dir(root)
    _check_every(every)
    decode_root = Path(decode_dir) if decode_dir else root / DECODE_DIR
    entries = sorted((e for e in root.iterdir() if not e.name.startswith(".")), key=lambda e: _natural_key(e.name))
    items: list[SourceItem] = []
    skips: list[Skip] = []
    names: set[str] = set()
    next_id = 0
    for entry in entries:
        name = entry.name if entry.is_dir() else entry.stem
        if not entry.is_dir() and entry.suffix.lower() not in VIDEO_EXTENSIONS:
            skips.append(Skip(entry.name, "not a video", f"{entry}: neither a folder of frames nor a video file"))
            continue
        if name in names:
            skips.append(Skip(entry.name, "duplicate video name", f"{entry}: another entry is also video {name!r}"))
            continue
        names.add(name)
        try:
            paths = _folder_frames(entry) if entry.is_dir() else _decoded_frames(entry, decode_root / name, every)
        except ValueError as err:
            skips.append(Skip(entry.name, "unreadable video", f"{entry}: {err}"))
            continue
        for frame, path in enumerate(paths):
            if path is not None and frame % every == 0:
                items.append(SourceItem(next_id + frame, _listed_path(path, root), video=name, frame=frame))
        next_id += len(paths)
    return items, skips


def _folder_frames(folder: Path) -> list[Path | None]:
    """The image files of one video folder, in natural order."""
    frames = sorted((p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)),
                    key=lambda p: _natural_key(p.name))
    if not frames:
        raise ValueError("the folder holds no image file")
    return list(frames)


def _decoded_frames(video: Path, out: Path, every: int) -> list[Path | None]:
    """Frame ``i`` of ``video`` as ``out/<i:06d>.jpg`` for each ``i % every == 0`` (None for
    the frames in between, which are counted but not written), decoding only when no complete
    earlier decode of the same file kept a frame rate that ``every`` is a multiple of."""
    marker = out / DECODE_MARKER
    done = _read_marker(marker)
    size = video.stat().st_size
    if done is None or done["size"] != size or every % done["every"]:
        marker.unlink(missing_ok=True)
        count = _decode(video, out, every)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"frames": count, "every": every, "size": size}))
    else:
        count = done["frames"]
    return [out / f"{i:06d}.jpg" if i % every == 0 else None for i in range(count)]


def _read_marker(marker: Path) -> dict | None:
    try:
        done = json.loads(marker.read_text())
        usable = all(isinstance(done.get(k), int) for k in ("frames", "every", "size")) and done["every"] >= 1
        return done if usable else None
    except (OSError, ValueError):  # absent, or written by something else: decode again
        return None


def _decode(video: Path, out: Path, every: int) -> int:
    """Write the kept frames of ``video`` into ``out``; the number of frames decoded."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise ValueError("OpenCV cannot open it as a video")
    count = 0
    try:
        while True:
            ok, image = capture.read()
            if not ok:
                break
            if count % every == 0:
                _write_jpeg(out / f"{count:06d}.jpg", image)
            count += 1
    finally:
        capture.release()
    if count == 0:
        raise ValueError("OpenCV decodes no frame from it")
    return count


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    """JPEG-encode ``image`` to ``path`` under a temporary name first: a reader never sees a
    half-written frame (no fsync per frame: the marker, written last, is synced)."""
    import cv2

    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ValueError(f"OpenCV cannot encode frame {path.stem} as JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.tobytes())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- Penn Action


def read_penn_action(root: str | Path, every: int = 1,
                     categories: Sequence[str] | None = PENN_ACTION_PAPER_CATEGORIES,
                     test_videos: int = 5) -> tuple[list[SourceItem], list[Skip]]:
    """Penn Action (Zhang et al. 2013): ``root/frames/0001/000001.jpg``… and one MATLAB file
    per video, ``root/labels/0001.mat``, with ``action``, ``x``, ``y`` and ``visibility``
    (nframes × 13, the joints of :data:`PENN_ACTION_JOINTS`), besides ``pose``, ``train``,
    ``bbox``, ``dimensions`` and ``nframes``, which are not used.

    The paper's protocol (Sec. 4.1): only the videos of ``categories`` (default: its six;
    ``None`` keeps all 15); the first ``test_videos`` videos of each category, in video-number
    order, are the test set (every frame), the others train. The dataset's own train/test
    flag is not used. ``video`` is the video number (``"0001"``); ids count every frame of
    every label file, whatever its category.
    """
    root = _require_dir(root)
    _check_every(every)
    labels = root / "labels"
    if not labels.is_dir():
        raise DatasetError(f"Penn Action labels folder not found: {labels}")
    files = sorted(labels.glob("*.mat"), key=lambda p: _natural_key(p.name))
    if not files:
        raise DatasetError(f"{labels}: no .mat label file (expected 0001.mat, 0002.mat, ...)")
    wanted = None if categories is None else set(categories)
    items: list[SourceItem] = []
    skips: list[Skip] = []
    seen: dict[str, int] = {}
    next_id = 0
    for file in files:
        try:
            action, landmarks, visible = _penn_annotation(file)
        except ValueError as err:
            skips.append(Skip(f"labels/{file.name}", "malformed annotation", f"{file.name}: {err}"))
            continue
        first, next_id = next_id, next_id + len(landmarks)
        if wanted is not None and action not in wanted:
            continue
        seen[action] = seen.get(action, 0) + 1
        split = "test" if seen[action] <= test_videos else "train"
        for frame in range(len(landmarks)):
            path = f"frames/{file.stem}/{frame + 1:06d}.jpg"
            if split == "train" and frame % every:
                continue
            if not np.isfinite(landmarks[frame]).all(1).any():
                skips.append(Skip(path, "malformed annotation", f"{file.name} frame {frame + 1}: no finite joint"))
                continue
            items.append(SourceItem(first + frame, path, landmarks[frame], visible[frame], split=split,
                                    video=file.stem, frame=frame))
    return items, skips


def _penn_annotation(file: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(action, landmarks (n, 13, 2) float32, visible (n, 13) bool) of one Penn Action label file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(file)
    except (ValueError, OSError, NotImplementedError) as err:  # NotImplementedError: a v7.3 (HDF5) file
        raise ValueError(f"not a MATLAB v5 file ({err})") from None
    missing = [k for k in ("action", "x", "y", "visibility") if k not in mat]
    if missing:
        raise ValueError(f"no {', '.join(missing)} field")
    action = np.asarray(mat["action"]).ravel()
    x, y, vis = (np.atleast_2d(np.asarray(mat[k], np.float64)) for k in ("x", "y", "visibility"))
    joints = len(PENN_ACTION_JOINTS)
    if not action.size or not x.shape == y.shape == vis.shape or x.ndim != 2 or x.shape[1] != joints:
        raise ValueError(f"expected an action name and x, y, visibility of shape (nframes, {joints}), "
                         f"got x {x.shape}, y {y.shape}, visibility {vis.shape}")
    return str(action[0]), np.stack([x, y], axis=-1).astype(np.float32), vis != 0


# ----------------------------------------------------------------------------- BBCPose


def read_bbcpose(root: str | Path, annotations: str | Path,
                 every: int = 10) -> tuple[list[SourceItem], list[Skip]]:
    """BBCPose (Charles et al. 2013): 20 sign-language videos, frames in
    ``root/<video>/<frame>.jpg`` (video ``1``…``20``, frame numbers from 1), and
    ``bbcpose.mat`` (``annotations``), whose variable ``bbcpose`` is a struct array with,
    per video in video order, ``videoName``, ``type`` (``train``, ``val`` or ``test``),
    ``source``, ``train_frames`` (1 × n frame numbers) with ``train_joints`` (2 × 7 × n: x
    then y of :data:`BBCPOSE_JOINTS`), and ``test_frames`` with ``test_joints``, the manual
    ground truth of the test and validation videos. Entries past the 20th (Extended BBC
    Pose) are not read.

    The paper's protocol (Sec. 4.1): the 10 training videos' ``train_frames`` train, one
    frame index in ``every`` (10), with their (semi-automatic) ``train_joints`` as the
    regressors' targets; the 5 test videos' manually annotated ``test_frames`` are the test
    set (1000 frames); the 5 validation videos are not listed. Assumed (the field list is
    documented, their extent is not): ``train_frames`` lists the training videos' frames,
    ``type`` tells the videos apart, and frame ``n`` is the file ``<n>.jpg``. Ids count, per
    video, its train then its test frames.
    """
    root = _require_dir(root)
    _check_every(every)
    ann = _require_file(annotations, "data.annotations (bbcpose.mat)")
    entries = _bbcpose_entries(ann)
    items: list[SourceItem] = []
    skips: list[Skip] = []
    next_id = 0
    for index, entry in enumerate(entries[:BBCPOSE_VIDEOS]):
        video = str(index + 1)
        try:
            kind, train, test = _bbcpose_video(entry)
        except ValueError as err:
            skips.append(Skip(video, "malformed annotation", f"{ann.name} video {video}: {err}"))
            continue
        first, next_id = next_id, next_id + len(train[0]) + len(test[0])
        if kind == "train":
            items += _bbcpose_items(video, *train, first, "train", every)
        elif kind == "test":
            items += _bbcpose_items(video, *test, first + len(train[0]), "test", 1)
    return items, skips


def _bbcpose_entries(ann: Path) -> np.ndarray:
    import scipy.io

    try:
        mat = scipy.io.loadmat(ann)
    except (ValueError, OSError, NotImplementedError) as err:
        raise DatasetError(f"{ann}: not a MATLAB v5 file ({err})") from None
    entries = mat.get("bbcpose")
    if entries is None or entries.dtype.names is None:
        raise DatasetError(f"{ann}: no struct array 'bbcpose' (videoName, type, train_frames, train_joints, ...)")
    return entries.ravel()


def _field(entry: np.void, *names: str) -> np.ndarray:
    """The first of ``names`` that the struct ``entry`` has (field names vary: ``train_frame(s)``)."""
    for name in names:
        if name in entry.dtype.names:
            return np.asarray(entry[name])
    raise ValueError(f"no field {' or '.join(names)}")


def _bbcpose_video(entry: np.void) -> tuple[str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(type, (train frame numbers, train landmarks), (test frame numbers, test landmarks)) of one video."""
    kind = _field(entry, "type").ravel()
    parts = []
    for side in ("train", "test"):
        frames = _field(entry, f"{side}_frames", f"{side}_frame").astype(np.float64).ravel()
        joints = _field(entry, f"{side}_joints").astype(np.float64)
        joints = joints[..., None] if joints.ndim == 2 else joints  # MATLAB drops a trailing 1: one frame
        if not frames.size:
            parts.append((np.zeros(0, np.int64), np.zeros((0, len(BBCPOSE_JOINTS), 2), np.float32)))
            continue
        if joints.shape != (2, len(BBCPOSE_JOINTS), frames.size):
            raise ValueError(f"{side}_joints has shape {joints.shape}, expected (2, {len(BBCPOSE_JOINTS)}, "
                             f"{frames.size}) for its {frames.size} {side} frames")
        if not (np.isfinite(frames).all() and (frames >= 1).all() and (frames == np.round(frames)).all()):
            raise ValueError(f"{side}_frames holds a value that is not a frame number (1, 2, ...)")
        parts.append((frames.astype(np.int64), joints.transpose(2, 1, 0).astype(np.float32)))
    return (str(kind[0]) if kind.size else ""), parts[0], parts[1]


def _bbcpose_items(video: str, numbers: np.ndarray, landmarks: np.ndarray, first_id: int, split: str,
                   every: int) -> list[SourceItem]:
    """Items for one list of annotated frames (numbers from 1), one frame index in ``every``."""
    return [SourceItem(first_id + k, f"{video}/{number}.jpg", landmarks[k], np.isfinite(landmarks[k]).all(1),
                       split=split, video=video, frame=number - 1)
            for k, number in enumerate(numbers.tolist()) if (number - 1) % every == 0]


# ----------------------------------------------------------------------------- Human3.6M


def read_human36m(root: str | Path, every: int = 50, test_every: int = 100,
                  activities: Sequence[str] = H36M_ACTIVITIES) -> tuple[list[SourceItem], list[Skip]]:
    """Human3.6M in the protocol of Zhang et al. 2018 that the paper follows (Sec. 4.1):
    subjects S1, S5, S6, S7, S8 and S9 train (one frame in ``every``, 50), S11 is the test
    set (one frame in ``test_every``, 100), six activities (``activities``).

    On-disk layout, one folder per subject, one sequence per activity take and camera, named
    as in the official release (``Directions 1.54138969``)::

        root/S1/Directions 1.54138969/000000.jpg   frame i of the take's video as <i:06d>.jpg
        root/S1/Directions 1.54138969.npy          (nframes, 32, 2) float: its 2-D poses

    The ``.npy`` is the release's ``<subject>/MyPoseFeatures/D2_Positions/<sequence>.cdf``
    ``Pose`` array (1 × nframes × 64) reshaped to (nframes, 32, 2) (pixels, joint order of
    :data:`H36M_ALL_JOINTS`; a (nframes, 17, 2) array already in :data:`H36M_JOINTS` order
    is taken as is); row i is frame i of ``<subject>/Videos/<sequence>.mp4``, counted from
    0 (the numbering :func:`read_video_folder` decodes to). The activity is the sequence
    name less its take number and camera. Landmarks are the 17 joints of
    :data:`H36M_JOINTS`. ``video`` is ``<subject>/<sequence>``; ids count every row of every
    pose file of the seven subjects.
    """
    root = _require_dir(root)
    _check_every(every)
    _check_every(test_every)
    subjects = [s for s in H36M_TRAIN_SUBJECTS + H36M_TEST_SUBJECTS if (root / s).is_dir()]
    if not subjects:
        raise DatasetError(f"{root}: no subject folder ({', '.join(H36M_TRAIN_SUBJECTS + H36M_TEST_SUBJECTS)})")
    skips = [Skip(s, "missing subject folder", str(root / s))
             for s in H36M_TRAIN_SUBJECTS + H36M_TEST_SUBJECTS if s not in subjects]
    items: list[SourceItem] = []
    next_id = 0
    for subject in subjects:
        test = subject in H36M_TEST_SUBJECTS
        for file in sorted((root / subject).glob("*.npy"), key=lambda p: _natural_key(p.name)):
            video = f"{subject}/{file.stem}"
            try:
                poses = _h36m_poses(file)
            except ValueError as err:
                skips.append(Skip(f"{video}.npy", "malformed annotation", f"{file}: {err}"))
                continue
            first, next_id = next_id, next_id + len(poses)
            if _h36m_activity(file.stem) not in activities:
                continue
            for frame in range(0, len(poses), test_every if test else every):
                visible = np.isfinite(poses[frame]).all(1)
                if visible.any():
                    items.append(SourceItem(first + frame, f"{video}/{frame:06d}.jpg", poses[frame], visible,
                                            split="test" if test else "train", video=video, frame=frame))
    return items, skips


def _h36m_activity(sequence: str) -> str:
    """``Directions 1.54138969`` → ``Directions``: the name before the camera, less its take number."""
    return re.sub(r"[ _]+\d+$", "", sequence.split(".", 1)[0])


def _h36m_poses(file: Path) -> np.ndarray:
    """(nframes, 17, 2) float32 poses of one ``.npy`` file holding 32 (or already the 17) joints."""
    try:
        poses = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"not a NumPy array file ({err})") from None
    if poses.ndim != 3 or poses.shape[2] != 2 or poses.shape[1] not in (len(H36M_ALL_JOINTS), len(H36M_JOINTS)):
        raise ValueError(f"shape {poses.shape}, expected (nframes, {len(H36M_ALL_JOINTS)}, 2)")
    if poses.shape[1] == len(H36M_ALL_JOINTS):
        poses = poses[:, list(H36M_EVALUATED)]
    return np.asarray(poses, np.float32)
