"""The evaluation split: which ids are held out, which fit the regressors, from which config."""

import os
import subprocess
import sys

import numpy as np
import pytest

from k2l_dist.config import ConfigError, EvalConfig, load_config, validate
from k2l_dist.eval.split import hash_order, make_split, read_id_list, regressor_ids, split_for_run


def _meta(n: int, landmarks: bool = True) -> dict:
    meta = {"ids": np.arange(n, dtype=np.int64), "paths": np.array([f"imgs/{i:04d}.jpg" for i in range(n)])}
    if landmarks:
        meta["landmarks"] = np.zeros((n, 5, 2), np.float32)
    return meta


def test_last_split_holds_out_the_largest_ids_at_most_half():
    split = make_split(np.array([4, 0, 3, 1, 2, 9, 8, 7, 6, 5]), 3, "last")
    assert split.test.tolist() == [7, 8, 9] and split.train.tolist() == list(range(7))
    assert len(make_split(np.arange(10), 100, "last").test) == 5  # never more than half


def test_random_split_is_seeded_disjoint_and_spread_over_the_ids():
    ids = np.arange(1000)
    a, b = make_split(ids, 100, "random", seed=0), make_split(ids[::-1].copy(), 100, "random", seed=0)
    np.testing.assert_array_equal(a.test, b.test)  # the order ids come in does not matter
    assert len(a.test) == 100 and len(a.train) == 900 and not np.intersect1d(a.test, a.train).size
    assert a.test.min() < 200 and a.test.max() > 800  # not a block at one end
    assert len(np.intersect1d(a.test, make_split(ids, 100, "random", seed=1).test)) < 30
    assert len(make_split(np.arange(10), 100, "random").test) == 5


def test_random_split_is_the_same_in_every_process_and_numpy_version():
    # a fixed point: changing the hash (or using a version-dependent NumPy stream) moves it
    assert hash_order(np.arange(8), 0).tolist() == _REFERENCE_ORDER
    code = ("import numpy as np; from k2l_dist.eval.split import make_split; "
            "print(make_split(np.arange(500), 50, 'random', seed=7).test.tolist())")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == str(make_split(np.arange(500), 50, "random", seed=7).test.tolist())


_REFERENCE_ORDER = [1, 4, 5, 7, 6, 0, 3, 2]  # SplitMix64 keyed by seed 0, checked in pure Python


def test_hash_order_of_a_subset_is_the_full_order_restricted():
    full, part = hash_order(np.arange(100), 3), np.arange(0, 100, 3)
    assert hash_order(part, 3).tolist() == [i for i in full.tolist() if i % 3 == 0]


def test_id_list_reads_ids_paths_and_unique_file_names(tmp_path, caplog):
    path = tmp_path / "held_out.txt"
    path.write_text("# held out\n3\nimgs/0005.jpg\n\n0007.jpg extra fields\nimgs\\0009.jpg\nnot/there.jpg\n99999\n")
    meta = _meta(20)
    got = read_id_list(path, meta["ids"], meta["paths"])
    assert got.tolist() == [3, 5, 7, 9]
    assert "2 of 6 lines" in caplog.text and "line 7" in caplog.text
    path.write_text("nothing/here.jpg\n")
    with pytest.raises(ValueError, match=r"eval.split_file: .*held_out.txt names no prepared sample"):
        read_id_list(path, meta["ids"], meta["paths"])
    with pytest.raises(FileNotFoundError, match="eval.split_file: file not found"):
        read_id_list(tmp_path / "nope.txt", meta["ids"])


def test_file_split_holds_out_exactly_the_listed_images(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("imgs/0001.jpg\nimgs/0004.jpg\n")
    split = split_for_run(EvalConfig(split="file", split_file=str(path), test_count=0), _meta(6), tmp_path)
    assert split.test.tolist() == [1, 4] and split.train.tolist() == [0, 2, 3, 5]


def test_protocol_split_reads_the_prepared_lists(tmp_path):
    (tmp_path / "test_ids.txt").write_text("8\n9\n")
    (tmp_path / "train_ids.txt").write_text("0\n1\n2\n")
    split = split_for_run(EvalConfig(split="protocol"), _meta(10), tmp_path)
    assert split.test.tolist() == [8, 9] and split.train.tolist() == list(range(8))
    assert split.regressor.tolist() == [0, 1, 2]
    assert regressor_ids(split, 0, 0).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"eval.split=protocol: .*test_ids.txt not found"):
        split_for_run(EvalConfig(split="protocol"), _meta(10), tmp_path / "elsewhere")


def test_pattern_split_holds_out_whole_subjects(tmp_path):
    """Human3.6M's protocol: every frame of subject 11 tested, none trained on (a random split
    would put near-duplicate frames of one take on both sides)."""
    subjects = ["S1", "S5", "S11", "S9", "S11", "S1"]
    meta = {"ids": np.arange(6, dtype=np.int64), "landmarks": np.zeros((6, 5, 2), np.float32),
            "paths": np.array([f"{s}/Walking.54138969/{i:05d}.jpg" for i, s in enumerate(subjects)])}
    split = split_for_run(EvalConfig(split="pattern", split_pattern="(^|/)S11/", test_count=0), meta, tmp_path)
    assert split.test.tolist() == [2, 4] and split.train.tolist() == [0, 1, 3, 5]  # S1 and S11 kept apart
    with pytest.raises(ValueError, match=r"eval.split_pattern='\(\^\|/\)S7/' matches no image path"):
        split_for_run(EvalConfig(split="pattern", split_pattern="(^|/)S7/"), meta, tmp_path)


def test_without_landmarks_every_sample_trains(tmp_path):
    split = split_for_run(EvalConfig(split="random", test_count=3), _meta(10, landmarks=False), tmp_path)
    assert split.train.tolist() == list(range(10)) and len(split.test) == 0


def test_regressor_fits_all_training_images_by_default_or_a_seeded_subset():
    split = make_split(np.arange(100), 20, "random", seed=0)
    assert regressor_ids(split, 0, 0).tolist() == split.train.tolist()
    sub = regressor_ids(split, 10, 0)
    assert len(sub) == 10 and np.isin(sub, split.train).all()
    assert sub.tolist() != split.train[:10].tolist()  # drawn, not the first ids
    np.testing.assert_array_equal(sub, regressor_ids(split, 10, 0))
    assert regressor_ids(split, 1000, 0).tolist() == split.train.tolist()


@pytest.mark.parametrize("overrides, key", [
    (["eval.split=halves"], "eval.split"),
    (["eval.split=file"], "eval.split_file"),
    (["eval.split=file", "eval.split_file=/no/such/list.txt"], "eval.split_file"),
    (["eval.split_file=/tmp/x.txt"], "eval.split_file"),
    (["eval.split=pattern"], "eval.split_pattern"),
    (["eval.split=pattern", "eval.split_pattern=S1["], "eval.split_pattern"),
    (["eval.split_pattern=S11/"], "eval.split_pattern"),
    (["eval.test_count=-1"], "eval.test_count"),
    (["eval.regressor_train_count=-5"], "eval.regressor_train_count"),
])
def test_bad_split_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load_config(None, overrides))


def test_split_defaults_are_valid():
    cfg = load_config(None)
    assert cfg.eval.split == "random" and cfg.eval.regressor_train_count == 0
    try:
        validate(cfg)
    except ConfigError as err:  # other sections' rules are not this test's business
        assert "eval." not in str(err)
