"""Named landmarks: the evaluation's forward regressor kept with the run, applied by detect,
the Python API and carried by the export."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from k2l_dist.cli import main
from k2l_dist.config import load_config
from k2l_dist.data.readers import FACE5_NAMES
from k2l_dist.data.synthetic import LANDMARK_NAMES, render
from tests.tiny import TINY

pytestmark = pytest.mark.slow

# the synthetic parts an MTFL annotation would name, in MTFL's order
FACE5_PARTS = [LANDMARK_NAMES.index(n) for n in FACE5_NAMES]


@pytest.fixture(scope="module")
def mtfl_style(tmp_path_factory):
    """Synthetic heads written as an MTFL folder: images and training.txt with 5 landmarks."""
    root = tmp_path_factory.mktemp("mtfl") / "mtfl"
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(120):
        sample = render(i, seed=3, size=96)
        cv2.imwrite(str(root / "imgs" / f"{i}.jpg"), sample.image)
        xy = sample.landmarks[FACE5_PARTS]
        lines.append(" ".join([f"imgs/{i}.jpg", *(f"{v:.3f}" for v in xy[:, 0]), *(f"{v:.3f}" for v in xy[:, 1]),
                               "1", "2", "2", "3"]))
    (root / "training.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, mtfl_style):
    from k2l_dist.training.run import train

    run_dir = tmp_path_factory.mktemp("named") / "run"
    cfg = load_config(None, [*TINY, f"run_dir={run_dir}", "data.format=mtfl", f"data.root={mtfl_style}",
                             f"data.annotations={mtfl_style / 'training.txt'}", "stage1.rounds=1",
                             "stage2.iterations=4"])
    return run_dir, train(cfg), cfg


def test_detect_named_on_held_out_images_scores_the_evaluations_forward_nme(run, tmp_path, mtfl_style):
    from k2l_dist.data.shards import load_samples_meta
    from k2l_dist.eval.split import split_for_run

    run_dir, metrics, cfg = run
    saved = json.loads((run_dir / "names.json").read_text())
    assert saved["names"] == list(FACE5_NAMES) and saved["crop_size"] == cfg.data.size
    out = tmp_path / "named.jsonl"
    assert main(["detect", str(run_dir), "--data", str(run_dir / "shards"), "--named", "--out", str(out)]) == 0
    rows = {r["image"]: r["landmarks"] for r in map(json.loads, out.read_text().splitlines())}
    assert all(list(r) == list(FACE5_NAMES) for r in rows.values())
    annotated = {ln.split()[0]: np.array(ln.split()[1:11], float).reshape(2, 5).T
                 for ln in (mtfl_style / "training.txt").read_text().splitlines()}
    meta = load_samples_meta(run_dir / "shards")
    test = split_for_run(cfg.eval, meta, run_dir / "shards").test
    errors = []
    for path in meta["paths"][np.searchsorted(meta["ids"], test)]:
        pred, gt = np.array([rows[str(path)][n] for n in FACE5_NAMES]), annotated[str(path)]
        errors.append(np.linalg.norm(pred - gt, axis=1).mean() / np.linalg.norm(gt[0] - gt[1]))
    # the same number from detect's named points in original pixels (rounded to 0.01 px)
    assert np.mean(errors) == pytest.approx(metrics["forward_nme"], rel=2e-3)


def test_the_python_api_and_the_export_carry_the_names(run, mtfl_style):
    from k2l_dist import load_detector

    run_dir, _, _ = run
    detector = load_detector(run_dir, named=True)
    assert detector.landmark_names == list(FACE5_NAMES)
    image = cv2.imread(str(mtfl_style / "imgs" / "5.jpg"))[:, :, ::-1].copy()
    points, conf = detector.predict(image, with_confidence=True)
    assert points.shape == (5, 2) and conf.shape == (5,)
    plain = load_detector(run_dir)
    discovered, dconf = plain.predict(image, with_confidence=True)
    assert discovered.shape == (plain.num_landmarks, 2)
    np.testing.assert_array_equal(conf, dconf[detector.names.sources])
    assert main(["export", str(run_dir), "--format", "torchscript"]) == 0
    import torch

    extra = {"k2l.json": ""}
    torch.jit.load(str(run_dir / "detector.ts"), _extra_files=extra)
    meta = json.loads(extra["k2l.json"])
    assert meta["named_landmarks"]["names"] == list(FACE5_NAMES)
    np.testing.assert_allclose(np.array(meta["named_landmarks"]["weights"]), detector.names.map.W)


def test_fit_names_from_other_annotated_shards_and_mismatches_named(run, tmp_path, capsys):
    run_dir, _, _ = run
    before = (run_dir / "names.json").read_text()
    (run_dir / "names.json").unlink()
    assert main(["detect", str(run_dir), "--data", str(run_dir / "shards"), "--named", "--out",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "names.json not found" in capsys.readouterr().err
    assert main(["fit-names", str(run_dir), "--data", str(run_dir / "shards")]) == 0
    refit = json.loads((run_dir / "names.json").read_text())
    assert refit["names"] == list(FACE5_NAMES) and refit["fitted_on"] > json.loads(before)["fitted_on"]
    wrong = Path(tmp_path / "other")
    from k2l_dist.prepare import prepare

    prepare(load_config(None, [*TINY, "data.size=32"]), wrong)
    assert main(["fit-names", str(run_dir), "--data", str(wrong)]) == 2
    assert "32-px crops, the model's are 48 px" in capsys.readouterr().err
