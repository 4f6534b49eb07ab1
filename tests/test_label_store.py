import os

import numpy as np
import pytest

from nnunetv2_em import storage


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "a.json"
    storage.write_json(str(target), {"x": 1})
    storage.write_json(str(target), {"x": 2})
    assert target.read_text().strip().endswith("}")
    assert '"x": 2' in target.read_text()
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "labels.txt"
    target.write_text("original")

    def broken_writer(temp):
        with open(temp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        storage.atomic_write(str(target), broken_writer)
    assert target.read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == ["labels.txt"]


def test_checksums_detect_changed_and_missing_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    manifest = storage.checksum_manifest({"a": str(a), "b": str(b)})
    assert storage.changed_files(manifest) == []
    a.write_bytes(b"changed")
    b.unlink()
    assert storage.changed_files(manifest) == ["a", "b"]


def _fake_preprocessed_folder(folder, cases):
    os.makedirs(folder)
    for index, case in enumerate(cases):
        seg = np.full((1, 4, 5, 6), index, dtype=np.int16)
        storage.write_seg_b2nd(os.path.join(folder, f"{case}_seg.b2nd"), seg, (4, 4, 4))
        storage.write_seg_b2nd(os.path.join(folder, f"{case}.b2nd"), seg, (4, 4, 4))
        storage.write_pickle(os.path.join(folder, f"{case}.pkl"), {"case": case})


def test_training_label_folder_links_originals_and_replaces_only_what_is_refined(tmp_path):
    original = str(tmp_path / "nnUNetPlans_3d_fullres")
    _fake_preprocessed_folder(original, ["a", "b"])
    before = {name: open(os.path.join(original, name), "rb").read() for name in os.listdir(original)}
    folder = storage.TrainingLabelFolder(original, str(tmp_path / "em_training_labels" / "fold_0"))
    folder.ensure(["a", "b"])
    assert sorted(os.listdir(folder.folder)) == ["a.b2nd", "a.pkl", "a_seg.b2nd", "b.b2nd", "b.pkl", "b_seg.b2nd"]
    assert not folder.is_refined("a")

    refined = np.full((1, 4, 5, 6), 7, dtype=np.int16)
    folder.write_case("a", refined, {"case": "a", "class_locations": {}}, (4, 4, 4))
    assert folder.is_refined("a") and not folder.is_refined("b")
    np.testing.assert_array_equal(folder.read_current_seg("a"), refined)
    np.testing.assert_array_equal(folder.read_original_seg("a"), np.zeros((1, 4, 5, 6)))
    assert os.path.islink(os.path.join(folder.folder, "a.b2nd"))  # images are never copied
    # nnU-Net's originals are byte-identical
    assert {name: open(os.path.join(original, name), "rb").read() for name in os.listdir(original)} == before

    folder.ensure(["a", "b"])  # keeps refinements
    assert folder.is_refined("a")
    folder.reset(["a", "b"])  # a fresh run starts from the originals
    assert not folder.is_refined("a")
    np.testing.assert_array_equal(folder.read_current_seg("a"), np.zeros((1, 4, 5, 6)))
    assert not [name for name in os.listdir(folder.folder) if name.startswith(storage.TEMP_DIR_PREFIX)]


def test_round_labels_are_complete_refined_or_copied(tmp_path):
    originals = tmp_path / "gt"
    originals.mkdir()
    for case in ("a", "b"):
        (originals / f"{case}.txt").write_text(f"original {case}")

    class TextWriter:
        def write_seg(self, seg, path, properties):
            with open(path, "w") as handle:
                handle.write(f"refined {int(seg.sum())} {properties['case']}")

    storage.write_round_labels(
        str(tmp_path / "round_01" / "labelsTr"), ["a", "b"], file_ending=".txt",
        original_label_path=lambda case: str(originals / f"{case}.txt"),
        refined_label=lambda case: (np.ones(3), {"case": case}) if case == "a" else None, reader_writer=TextWriter(),
        provenance="refined, round 1 of a test")  # .txt has no header: written as it is
    labels = tmp_path / "round_01" / "labelsTr"
    assert sorted(os.listdir(labels)) == ["a.txt", "b.txt"]
    assert (labels / "a.txt").read_text() == "refined 3 a"
    assert (labels / "b.txt").read_text() == "original b"


def test_fold_exchange_hands_on_the_newest_refinement_of_the_same_originals(tmp_path):
    original = tmp_path / "case_seg.b2nd"
    storage.write_seg_b2nd(str(original), np.zeros((1, 2, 4, 4), np.int16), (2, 4, 4))
    exchange = storage.FoldExchange(str(tmp_path / "exchange"))
    assert exchange.latest("case", original_seg_path=str(original)) is None
    for round_index, value in ((1, 1), (2, 2)):
        exchange.publish(0, round_index, "case", np.full((1, 2, 4, 4), value), original_seg_path=str(original),
                         patch_size=(2, 4, 4))
    newest = exchange.latest("case", original_seg_path=str(original))
    assert (newest["fold"], newest["round"]) == (0, 2)
    assert np.all(storage.read_seg_b2nd(newest["seg_path"]) == 2)
    assert exchange.latest("case", original_seg_path=str(original), up_to_round=1)["round"] == 1
    assert exchange.latest("case", original_seg_path=str(original), exclude_fold=0) is None  # never its own
    # a record exists only once its segmentation is complete: a segmentation without one is not handed on
    storage.write_seg_b2nd(str(tmp_path / "exchange" / "fold_0" / "round_03" / "case_seg.b2nd"),
                           np.full((1, 2, 4, 4), 3), (2, 4, 4))
    assert exchange.latest("case", original_seg_path=str(original))["round"] == 2
    # a refinement of other originals is never handed on
    storage.write_seg_b2nd(str(original), np.ones((1, 2, 4, 4), np.int16), (2, 4, 4))
    assert exchange.latest("case", original_seg_path=str(original)) is None
    exchange.publish(1, 1, "case", np.full((1, 2, 4, 4), 5), original_seg_path=str(original), patch_size=(2, 4, 4))
    assert exchange.latest("case", original_seg_path=str(original), exclude_fold=0)["fold"] == 1
    exchange.clear_fold(1)
    assert exchange.latest("case", original_seg_path=str(original)) is None
    assert sorted(os.listdir(tmp_path / "exchange")) == ["fold_0"]


def test_reviewed_labels_keep_every_version_and_show_none_before_commit(tmp_path):
    raw, preprocessed = tmp_path / "raw", tmp_path / "pre"
    raw.mkdir()
    store = storage.ReviewedLabels(str(raw), str(preprocessed), ".nii.gz")
    first = tmp_path / "first.nii.gz"
    first.write_bytes(b"first review")
    kept = store.keep({"case_a": (str(first), {"reviewer": "ana"})})
    assert store.records() == {}  # kept, not yet the case's reviewed label
    store.commit(kept)
    assert store.records()["case_a"]["version"] == 1 and store.records()["case_a"]["reviewer"] == "ana"
    second = tmp_path / "second.nii.gz"
    second.write_bytes(b"second review")
    store.commit(store.keep({"case_a": (str(second), {"reviewer": "ben"})}))
    assert open(store.label_path("case_a"), "rb").read() == b"second review"
    assert open(store.label_path("case_a", 1), "rb").read() == b"first review"  # the earlier review stays
    assert store.records()["case_a"]["sha256"] == storage.sha256(str(second))
    # a segmentation made from an older review is not taken for the current one
    store.write_segmentation("case_a", "ident", np.zeros((1, 1, 4, 4), np.int16), {}, (1, 4, 4),
                             storage.sha256(str(first)))
    assert not store.has_segmentation("case_a", "ident")
    store.write_segmentation("case_a", "ident", np.ones((1, 1, 4, 4), np.int16), {}, (1, 4, 4),
                             store.records()["case_a"]["sha256"])
    assert store.has_segmentation("case_a", "ident")
    assert store.read_segmentation("case_a", "ident").sum() == 16
