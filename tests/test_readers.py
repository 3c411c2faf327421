import numpy as np
import pytest

from k2l_dist.data.readers import DatasetError, read_box_file, read_folder, read_items, read_lsp, read_mtfl, read_pts

SHARED = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


def test_folder_lists_images_recursively_sorted_with_stable_ids(tmp_path):
    for name in ["b.jpg", "a.png", "sub/c.JPG", "notes.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items, skips = read_folder(tmp_path)
    assert [i.path for i in items] == ["a.png", "b.jpg", "sub/c.JPG"]
    assert [i.id for i in items] == [0, 1, 2] and not skips


def test_mtfl_parses_points_and_skips_malformed_lines(tmp_path):
    ann = tmp_path / "training.txt"
    ann.write_text(
        "a/1.jpg 1 2 3 4 5 6 7 8 9 10 1 2 2 3\n"
        "a/2.jpg 1 2 3\n"
        "a/3.jpg 1 2 3 4 5 6 7 8 9 x 1 2 2 3\n"
        "a/4.jpg 11 12 13 14 15 16 17 18 19 20 1 2 2 3\n"
    )
    items, skips = read_mtfl(tmp_path, ann)
    assert [i.path for i in items] == ["a/1.jpg", "a/4.jpg"]
    assert [i.id for i in items] == [0, 3]  # ids are line positions, stable under skips
    np.testing.assert_array_equal(items[0].landmarks, [[1, 6], [2, 7], [3, 8], [4, 9], [5, 10]])
    assert [s.reason for s in skips] == ["malformed annotation line"] * 2
    assert "line 2" in skips[0].detail and "expected 15 fields, got 4" in skips[0].detail


def test_missing_root_or_annotation_is_a_named_error(tmp_path):
    with pytest.raises(DatasetError, match="nowhere"):
        read_mtfl(tmp_path / "nowhere", tmp_path / "t.txt")
    with pytest.raises(DatasetError, match="t.txt"):
        read_mtfl(tmp_path, tmp_path / "t.txt")
    with pytest.raises(DatasetError, match="unknown dataset format 'coco'"):
        read_items("coco", str(tmp_path))


def test_pts_reader_shifts_one_based_coordinates(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    (tmp_path / "g.png").write_bytes(b"x")
    (tmp_path / "f.pts").write_text("version: 1\nn_points: 2\n{\n11 21\n31 41\n}\n")
    items, skips = read_pts(tmp_path)
    np.testing.assert_array_equal(items[0].landmarks, [[10, 20], [30, 40]])
    assert [s.reason for s in skips] == ["missing .pts file"]


def test_box_file_errors_name_the_line(tmp_path):
    path = tmp_path / "boxes.txt"
    path.write_text("# comment\na.jpg 1 2 3 4\nb.jpg 1 2\n")
    with pytest.raises(DatasetError, match="line 3"):
        read_box_file(path)
    path.write_text("a.jpg 1 2 3 4\n")
    assert read_box_file(path) == {"a.jpg": (1.0, 2.0, 3.0, 4.0)}


@pytest.mark.skipif(not (SHARED / "mtfl_train").is_dir(), reason="../shared/data absent")
def test_real_mtfl_annotations_all_parse():
    items, skips = read_mtfl(SHARED / "mtfl_train", SHARED / "mtfl_train" / "training.txt")
    assert len(items) == 10000 and not skips
    assert all((SHARED / "mtfl_train" / i.path).is_file() for i in items[:50])


@pytest.mark.skipif(not (SHARED / "lsp").is_dir(), reason="../shared/data absent")
def test_real_lsp_joints_parse():
    items, _ = read_lsp(SHARED / "lsp")
    assert len(items) == 2000 and items[0].path == "images/im0001.jpg"
    assert items[0].landmarks.shape == (14, 2)
    share_visible = np.mean([i.visible.mean() for i in items])
    assert 0.85 < share_visible < 0.99  # flag 0 = visible in the original release
