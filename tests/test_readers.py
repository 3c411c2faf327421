import numpy as np
import pytest

from k2l_dist.data.readers import (
    DatasetError,
    read_aflw,
    read_box_file,
    read_folder,
    read_items,
    read_lsp,
    read_mafl,
    read_mtfl,
    read_pts,
)

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


def test_mtfl_skips_non_finite_coordinates_naming_file_and_line(tmp_path):
    ann = tmp_path / "training.txt"
    ann.write_text(
        "a/1.jpg" + " nan" * 10 + " 1 2 2 3\n"
        "a/2.jpg 1 2 3 4 5 6 7 8 9 10 1 2 2 3\n"
        "a/3.jpg 1 2 3 4 inf 6 7 8 9 10 1 2 2 3\n"
        "a/4.jpg 1 2 3 4 5 6 7 8 9 1e39 1 2 2 3\n"  # overflows float32
    )
    items, skips = read_mtfl(tmp_path, ann)
    assert [i.path for i in items] == ["a/2.jpg"]
    assert [s.path for s in skips] == ["a/1.jpg", "a/3.jpg", "a/4.jpg"]
    assert {s.reason for s in skips} == {"malformed annotation line"}
    assert [s.detail for s in skips] == [f"training.txt line {n}: non-finite coordinate" for n in (1, 3, 4)]


def test_lsp_skips_images_without_a_finite_joint(tmp_path):
    import scipy.io

    joints = np.zeros((3, 14, 3))
    joints[:2] = 10.0
    joints[:2, :, 1] = np.nan
    joints[0, 3, 2] = np.nan  # one missing joint still leaves a box and a score
    scipy.io.savemat(tmp_path / "joints.mat", {"joints": joints})
    items, skips = read_lsp(tmp_path)
    assert [i.id for i in items] == [0, 2]
    assert [(s.path, s.reason) for s in skips] == [("images/im0002.jpg", "malformed annotation")]
    assert "joints.mat image 2" in skips[0].detail


def test_pts_with_non_finite_coordinates_is_malformed(tmp_path):
    blocks = {"f": "11 21\n31 41", "g": "11 nan\n31 41", "h": "11 21\ninf 41", "i": "11 21\n31 1e39"}
    for name, block in blocks.items():
        (tmp_path / f"{name}.png").write_bytes(b"x")
        (tmp_path / f"{name}.pts").write_text(f"version: 1\nn_points: 2\n{{\n{block}\n}}\n")
    items, skips = read_pts(tmp_path)
    assert [i.path for i in items] == ["f.png"]
    assert [(s.path, s.reason) for s in skips] == [(f"{n}.png", "malformed .pts file") for n in "ghi"]
    assert "g.pts" in skips[0].detail and "non-finite" in skips[0].detail


def test_box_file_refuses_non_finite_or_empty_boxes_naming_the_line(tmp_path):
    path = tmp_path / "boxes.txt"
    for bad in ["b.jpg nan 2 3 4", "b.jpg 1 2 inf 4", "b.jpg 1 2 0 4", "b.jpg 1 2 3 -4"]:
        path.write_text(f"a.jpg 1 2 3 4\n{bad}\n")
        with pytest.raises(DatasetError, match=r"boxes.txt line 2: box '.*' needs finite values"):
            read_box_file(path)


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


def _celeba_files(root, lines, test=("000004.jpg",), train=("000001.jpg", "000002.jpg")):
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (root / "list_landmarks_align_celeba.txt").write_text(f"{len(lines)}\n{header}\n" + "\n".join(lines) + "\n")
    (root / "testing.txt").write_text("".join(f"{n}\n" for n in test))
    (root / "training.txt").write_text("".join(f"{n}\n" for n in train))
    return root / "list_landmarks_align_celeba.txt", root / "training.txt", root / "testing.txt"


def test_mafl_reads_celeba_landmarks_and_marks_the_protocol_images(tmp_path):
    lines = ["000001.jpg 69  109  106  113   77  142   73  152  108  154",
             "000002.jpg 69 110 107 112 81 135 70 151 108 153",
             "000003.jpg 1 2 3",  # malformed: the id of the next line does not move
             "000004.jpg 70 112 108 111 85 135 72 152 104 152",
             "000005.jpg 68 111 108 112 103 148 71 152 105 151"]
    ann, train, test = _celeba_files(tmp_path, lines, train=("000001.jpg", "000002.jpg", "gone.jpg"))
    items, skips = read_mafl(tmp_path, ann, train, test)
    assert [(i.id, i.path, i.split) for i in items] == [
        (0, "000001.jpg", "train"), (1, "000002.jpg", "train"), (3, "000004.jpg", "test"), (4, "000005.jpg", "")]
    # x, y interleaved per landmark: left eye, right eye, nose, left mouth, right mouth
    np.testing.assert_array_equal(items[0].landmarks, [[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]])
    assert [(s.path, s.reason) for s in skips] == [("000003.jpg", "malformed annotation line"),
                                                   ("gone.jpg", "listed image without landmarks")]
    assert "list_landmarks_align_celeba.txt line 5: expected 11 fields" in skips[0].detail
    assert skips[1].detail == "training.txt line 3"
    via_items, _ = read_items("mafl", str(tmp_path), str(ann), test_list=str(test), train_list=str(train))
    assert [i.split for i in via_items] == [i.split for i in items]


def test_mafl_refuses_overlapping_lists_truncated_files_and_missing_keys(tmp_path):
    lines = ["000001.jpg 69 109 106 113 77 142 73 152 108 154", "000004.jpg 70 112 108 111 85 135 72 152 104 152"]
    ann, train, test = _celeba_files(tmp_path, lines, train=("000001.jpg", "000004.jpg"))
    with pytest.raises(DatasetError, match=r"training.txt line 2 and .*testing.txt line 1 both list 000004.jpg"):
        read_mafl(tmp_path, ann, train, test)
    with pytest.raises(DatasetError, match="data.train_list: required for format mafl"):
        read_items("mafl", str(tmp_path), str(ann), test_list=str(test))
    with pytest.raises(DatasetError, match="data.test_list .*not found"):
        read_mafl(tmp_path, ann, train, tmp_path / "nope.txt")
    ann.write_text("3\n" + ann.read_text().split("\n", 1)[1])
    with pytest.raises(DatasetError, match=r"list_landmarks_align_celeba.txt line 1: declares 3 images but 2"):
        read_mafl(tmp_path, ann, train, test)


def test_aflw_trains_on_mtfl_training_and_tests_on_its_aflw_faces(tmp_path):
    row = " 1 2 3 4 5 6 7 8 9 10 1 2 2 3"
    (tmp_path / "training.txt").write_text(f"lfw_5590\\a.jpg{row}\n\nnet_7876\\b.jpg{row}\n")
    # MTFL's own files: Windows paths, a leading space on testing lines
    (tmp_path / "testing.txt").write_text(
        f" AFLW\\1.jpg{row}\n other\\2.jpg{row}\n AFLW\\3.jpg 1 2\n AFLW\\4.jpg{row}\n")
    items, skips = read_aflw(tmp_path, tmp_path / "training.txt", tmp_path / "testing.txt")
    assert [(i.id, i.path, i.split) for i in items] == [
        (0, "lfw_5590/a.jpg", "train"), (1, "net_7876/b.jpg", "train"), (2, "AFLW/1.jpg", "test"),
        (5, "AFLW/4.jpg", "test")]
    np.testing.assert_array_equal(items[2].landmarks[:, 1], [6, 7, 8, 9, 10])
    assert [(s.path, s.detail) for s in skips] == [("AFLW\\3.jpg", "testing.txt line 3: expected 15 fields, got 3")]
    assert [i.path for i in read_items("aflw", str(tmp_path))[0]] == [i.path for i in items]  # MTFL layout defaults
    (tmp_path / "testing.txt").write_text(f"other\\2.jpg{row}\n")
    with pytest.raises(DatasetError, match="data.test_list: .*no line whose image is under AFLW/"):
        read_aflw(tmp_path, tmp_path / "training.txt", tmp_path / "testing.txt")


def test_pts_whose_block_disagrees_with_its_header_is_malformed(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    (tmp_path / "f.pts").write_text("version: 1\nn_points:  3\n{\n11 21\n31 41\n}\n")
    items, skips = read_pts(tmp_path)
    assert not items and skips[0].reason == "malformed .pts file"
    assert "n_points: 3 in the header, 2 points in the block" in skips[0].detail


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


def test_lspet_reader_takes_its_own_layout_and_flags(tmp_path):
    """LSP Extended: joints.mat 14×3×N, flag 1 = visible (LSP's is the opposite), 5-digit names;
    a joint without annotation is left out, an image with fewer than 2 annotated joints skipped."""
    from scipy.io import savemat

    from k2l_dist.data.readers import LSP_JOINTS, read_items

    rng = np.random.default_rng(0)
    joints = np.concatenate([rng.uniform(10, 90, (14, 2, 3)), np.ones((14, 1, 3))], axis=1)
    joints[0, :, 0] = [0.0, -26.1, 0.0]  # not annotated, placeholder coordinates as in the real file
    joints[:, 2, 2] = 0
    joints[5, 2, 2] = 1  # one annotated joint only
    (tmp_path / "images").mkdir()
    savemat(tmp_path / "joints.mat", {"joints": joints})
    items, skips = read_items("lspet", str(tmp_path))
    assert [i.path for i in items] == ["images/im00001.jpg", "images/im00002.jpg"]
    assert np.isnan(items[0].landmarks[0]).all() and not items[0].visible[0] and items[0].visible[1:].all()
    np.testing.assert_allclose(items[1].landmarks, joints[:, :2, 1].astype(np.float32))
    assert [(s.path, s.reason) for s in skips] == [("images/im00003.jpg", "malformed annotation")]
    assert len(LSP_JOINTS) == 14 and LSP_JOINTS[9] == "left_shoulder" and LSP_JOINTS[2] == "right_hip"
    savemat(tmp_path / "joints.mat", {"joints": joints.transpose(1, 0, 2)})  # LSP's layout under the wrong name
    with pytest.raises(DatasetError, match="LSP's 3×14×N layout: data.format=lsp"):
        read_items("lspet", str(tmp_path))


def test_mafl_with_celebas_partitions_trains_on_the_training_partition_only(tmp_path):
    lines = ["000001.jpg 69 109 106 113 77 142 73 152 108 154", "000002.jpg 69 110 107 112 81 135 70 151 108 153",
             "000004.jpg 70 112 108 111 85 135 72 152 104 152", "000005.jpg 68 111 108 112 103 148 71 152 105 151",
             "000006.jpg 68 111 108 112 103 148 71 152 105 151"]
    ann, train, test = _celeba_files(tmp_path, lines)
    (tmp_path / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n000002.jpg 0\n000004.jpg 2\n000005.jpg 1\n000006.jpg 0\n")
    items, _ = read_items("mafl", str(tmp_path), str(ann), test_list=str(test), train_list=str(train),
                          partition=str(tmp_path / "list_eval_partition.txt"))
    # 000005 (validation partition) leaves; 000004 stays though in partition 2: MAFL holds it out for the test
    assert [(i.path, i.split) for i in items] == [("000001.jpg", "train"), ("000002.jpg", "train"),
                                                  ("000004.jpg", "test"), ("000006.jpg", "")]
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg train\n")
    with pytest.raises(DatasetError, match="list_eval_partition.txt line 1"):
        read_items("mafl", str(tmp_path), str(ann), test_list=str(test), train_list=str(train),
                   partition=str(tmp_path / "list_eval_partition.txt"))
