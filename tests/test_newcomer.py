"""What a newcomer types first: numbers as they write them, keys they misspell, the file
they point at, and images as they hold them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import tomllib
import torch
import yaml

from k2l_dist.cli import main
from k2l_dist.config import ConfigError, load_config
from k2l_dist.utils.checkpoint import save_checkpoint
from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
K = 3


@pytest.fixture
def run_dir(tmp_path):
    """A finished run's folder as `k2l train` leaves it: model.pt beside checkpoint.pt."""
    run = tmp_path / "run"
    saved = save_tiny_model(run / "model.pt", K)
    save_checkpoint(run / "checkpoint.pt", {"phi": {}, "config": saved})
    return run


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.jpg": (40, 70), "b.png": (60, 30)}.items():
        cv2.imwrite(str(root / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return root


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip()


# --------------------------------------------------------------------------- config


def test_scientific_notation_is_a_float_in_yaml_and_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  lr: 1e-3\nstage2:\n  lr: 5E-4\n")
    assert yaml.safe_load(path.read_text())["stage1"]["lr"] == "1e-3"  # what YAML 1.1 makes of it
    cfg = load_config(path, ["loss.heatmap_sigma=2e0", "augment.noise_std=.5"])
    assert (cfg.stage1.lr, cfg.stage2.lr, cfg.loss.heatmap_sigma, cfg.augment.noise_std) == (1e-3, 5e-4, 2.0, 0.5)
    assert isinstance(cfg.stage1.lr, float)
    with pytest.raises(ConfigError, match="stage1.lr: expected float, got str 'fast'"):
        load_config(None, ["stage1.lr=fast"])
    with pytest.raises(ConfigError, match="cluster.K: expected int"):  # an int key takes no float text
        load_config(None, ["cluster.K=1e1"])


@pytest.mark.parametrize("override, hint", [
    ("stage1.lrr=0.1", "did you mean 'stage1.lr'?"),
    ("stage1.warmup=5", "did you mean 'stage1.warmup_iters'?"),
    ("K=5", "did you mean 'cluster.K'?"),                     # a key at another level
    ("cluster.nope=1", "known at this level: "),             # nothing close: every name
])
def test_an_unknown_key_says_what_was_meant(override, hint):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"unknown config key '{override.split('=')[0]}'" in str(err.value) and hint in str(err.value)


def test_print_config_checks_the_values_on_every_command(run_dir, capsys):
    assert main(["train", "configs/quickstart.yaml", "cluster.K=0", "--print-config"]) == 2
    assert "cluster.K" in _error(capsys)
    assert main(["prepare", "--format", "synthetic", "--print-config", "keypoints.outlier_fraction=1"]) == 2
    assert "keypoints.outlier_fraction" in _error(capsys)
    assert main(["ablate", "configs/quickstart.yaml", "--print-config", "device=tpu"]) == 2
    assert "device" in _error(capsys)
    for command in ("evaluate", "detect", "export"):  # the run's saved config, with the overrides
        assert main([command, str(run_dir), "--print-config", "stage2.flip_test=false"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["stage2"]["flip_test"] is False and printed["model"]["width"] == 16
        assert main([command, str(run_dir), "--print-config", "cluster.M=0"]) == 2
        assert "cluster.M" in _error(capsys)


# --------------------------------------------------------------------------- the run a command points at


def test_detect_takes_the_run_positionally_or_as_checkpoint_and_any_of_its_files(run_dir, image_dir, tmp_path):
    outputs = []
    for i, how in enumerate(([str(run_dir)], ["--checkpoint", str(run_dir)], [str(run_dir / "model.pt")],
                             [str(run_dir / "checkpoint.pt")], ["--checkpoint", str(run_dir / "checkpoint.pt")])):
        out = tmp_path / f"o{i}.jsonl"
        assert main(["detect", *how, "--images", str(image_dir), "--out", str(out)]) == 0
        outputs.append(out.read_text())
    assert len(set(outputs)) == 1 and len(outputs[0].splitlines()) == 2


def test_a_run_without_model_pt_says_training_has_not_finished(run_dir, image_dir, tmp_path, capsys):
    (run_dir / "model.pt").unlink()
    for argv in (["detect", str(run_dir / "checkpoint.pt"), "--images", str(image_dir), "--out", str(tmp_path / "o")],
                 ["export", str(run_dir), "--format", "torchscript"], ["evaluate", "--checkpoint", str(run_dir)]):
        assert main(argv) == 2
        err = _error(capsys)
        assert f"{run_dir} holds no model.pt: its training has not finished" in err, argv
    with pytest.raises(SystemExit):
        main(["detect", str(run_dir), "--checkpoint", str(run_dir), "--out", "o"])  # two runs
    assert "(the run is already given by --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--format", "onnx"])  # no run at all
    assert "give the run folder" in capsys.readouterr().err


def test_export_accepts_checkpoint_pt_and_writes_beside_it(run_dir):
    assert main(["export", "--checkpoint", str(run_dir / "checkpoint.pt"), "--format", "torchscript"]) == 0
    assert (run_dir / "detector.ts").is_file()


# --------------------------------------------------------------------------- predict


@pytest.fixture
def detector(run_dir):
    from k2l_dist import load_detector

    return load_detector(run_dir)


def test_predict_on_a_path_equals_predict_on_the_array(detector, image_dir):
    path = image_dir / "a.jpg"
    rgb = cv2.imread(str(path))[:, :, ::-1].copy()
    np.testing.assert_array_equal(detector.predict(path), detector.predict(rgb))
    # a batch of two (other kernels than one image: equal to float precision)
    np.testing.assert_allclose(detector.predict([str(path), rgb]), np.stack([detector.predict(rgb)] * 2), atol=1e-3)
    with pytest.raises(ValueError, match="not a readable image file"):
        detector.predict(image_dir / "missing.jpg")


def test_floats_in_0_255_are_warned_about_and_read_as_such(detector):
    rgb = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    rgb[0, 0] = 255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unit = detector.predict(rgb.astype(np.float32) / 255)  # the documented float range: no warning
    assert not [w for w in caught if "0..255" in str(w.message)]
    with pytest.warns(UserWarning, match="values up to 255: read as 0..255"):
        wide = detector.predict(rgb.astype(np.float32))
    np.testing.assert_array_equal(wide, detector.predict(rgb))
    np.testing.assert_array_equal(unit, detector.predict(rgb))


def test_16_bit_images_and_hwc_tensors_are_refused_with_the_fix(detector):
    with pytest.raises(ValueError, match=r"16 bits\?.*image >> 8"):
        detector.predict(np.zeros((40, 50, 3), np.uint16))
    hwc = torch.zeros(250, 240, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"got shape \(250, 240, 3\) \(HWC\?\): pass image.permute\(2, 0, 1\)"):
        detector.predict(hwc)
    with pytest.raises(ValueError, match=r"got shape \(40, 50, 2\)"):
        detector.predict(np.zeros((40, 50, 2), np.uint8))


# --------------------------------------------------------------------------- install extras


def test_each_install_extra_is_one_coherent_faiss_and_dali_build():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert "faiss" not in base and "dali" not in base  # a later `pip install -e .` cannot swap a build back
    extras = project["optional-dependencies"]
    for name, cuda in (("cpu", "130"), ("cu12", "120"), ("cu13", "130")):
        faiss = [d for d in extras[name] if d.startswith("faiss")]
        dali = [d for d in extras[name] if d.startswith("nvidia-dali")]
        assert len(faiss) == 1 and len(dali) == 1, name
        assert dali[0].startswith(f"nvidia-dali-cuda{cuda}"), name
        assert faiss[0].startswith("faiss-cpu" if name == "cpu" else f"faiss-gpu-{name}"), name
    assert "k2l-dist[cpu,export]" in extras["dev"]


def test_a_missing_faiss_is_one_line_naming_the_extras():
    code = ("import sys; sys.modules['faiss'] = None\n"  # as if no Faiss build were installed
            "from k2l_dist.cli import main\n"
            "sys.exit(main(['train', 'configs/quickstart.yaml', '--print-config']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: Faiss is not installed") and 'pip install -e ".[cpu]"' in done.stderr


def test_k2l_backends_names_the_builds(capsys):
    with pytest.raises(SystemExit) as ended:
        main(["--backends"])
    assert ended.value.code == 0
    line = capsys.readouterr().out
    assert line.startswith("torch 2.13.0") and "faiss " in line and "DALI " in line
    assert json.dumps(line)  # one printable line
