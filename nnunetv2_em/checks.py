"""Input checks that run before anything is written; each failure is one ``EMInputError`` naming file and fix."""

from __future__ import annotations

import json
import os

import numpy as np

from nnunetv2_em.errors import EMInputError

GEOMETRY_TOLERANCE = 1e-4  # relative, as a float32 header round-trip allows


def require_env(*names: str) -> dict[str, str]:
    """Values of nnU-Net's path variables; an error naming every missing one otherwise."""
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        exports = " ".join(f"{name}=/path/to/{name}" for name in missing)
        raise EMInputError(f"nnU-Net environment variable(s) {', '.join(missing)} not set. Fix: export {exports} "
                           f"(see nnU-Net's documentation/set_environment_variables.md).")
    return {name: os.environ[name] for name in names}


def load_dataset_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise EMInputError(f"{path}: file not found. Fix: create it (nnU-Net's generate_dataset_json) or check the "
                           f"dataset name/id.")
    try:
        with open(path) as handle:
            dataset_json = json.load(handle)
    except json.JSONDecodeError as error:
        raise EMInputError(f"{path}: not valid JSON ({error}). Fix: repair the file.") from None
    for key in ("labels", "file_ending"):
        if key not in dataset_json:
            raise EMInputError(f"{path}: missing key '{key}'. Fix: add it (see nnU-Net's dataset_format.md).")
    return dataset_json


def label_values(dataset_json: dict, source: str) -> list[int]:
    """The annotated classes ``0..K-1`` of a label-map dataset (the ignore label excluded), checked."""
    labels = {name: value for name, value in dataset_json["labels"].items() if name != "ignore"}
    if any(isinstance(value, (list, tuple)) for value in labels.values()):
        raise EMInputError(f"{source}: region-based labels (lists of values) are not supported by the EM loop, which "
                           f"models one true class per voxel. Fix: use a dataset with one integer per label.")
    values = sorted(int(v) for v in labels.values())
    if values != list(range(len(values))) or len(values) < 2:
        raise EMInputError(f"{source}: labels must be consecutive integers 0..K-1 with background 0 and at least one "
                           f"foreground class, got {values}. Fix: renumber the labels and their files.")
    if "ignore" in dataset_json["labels"] and int(dataset_json["labels"]["ignore"]) != len(values):
        raise EMInputError(f"{source}: the ignore label must be max label + 1 = {len(values)}, got "
                           f"{dataset_json['labels']['ignore']}. Fix: set \"ignore\": {len(values)}.")
    return values


def split_labelled(cases: dict) -> tuple[dict, dict]:
    """nnU-Net's ``{case: {"images", "label"}}`` split into (cases with a label file, cases without). A label
    entry that exists but cannot be read (a dangling link to an unmounted share) is an error, never "unlabeled"."""
    for entry in cases.values():
        if os.path.lexists(entry["label"]) and not os.path.isfile(entry["label"]):
            raise EMInputError(f"{entry['label']}: exists but is not a readable file (a dangling link?). Fix: mount "
                               f"or restore its target, or remove the entry if the case has no label.")
    labelled = {case: entry for case, entry in cases.items() if os.path.isfile(entry["label"])}
    return labelled, {case: entry for case, entry in cases.items() if case not in labelled}


def optional_file(path: str) -> bool:
    """Whether an optional input file (``em_verified_cases.json``, ``em_weak_labels.json``) is there; a link to
    nothing is an error, never "no file"."""
    if os.path.islink(path) and not os.path.isfile(path):
        raise EMInputError(f"{path}: a link to {os.readlink(path)!r}, which is missing. Fix: restore its target, or "
                           f"delete the link if the dataset has no such file.")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise EMInputError(f"{path}: not a file. Fix: replace it with the JSON file it should be, or remove it.")
    return os.path.isfile(path)


def check_file_decodes(path: str) -> None:
    """The whole file is readable: not empty, and a gzip stream (``.gz``) decodes to its end with a valid CRC.
    ITK reads a truncated ``.nii.gz`` without complaint and fills the missing part with zeros."""
    import gzip
    import zlib

    try:
        if os.path.getsize(path) == 0:
            raise EMInputError(f"{path}: empty file. Fix: write the file again from its source.")
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    except (EOFError, OSError, zlib.error) as error:
        raise EMInputError(f"{path}: cannot be read to its end ({error}); the file is truncated or corrupt. Fix: "
                           f"copy or export it again from its source.") from None


def check_writable(folder: str) -> None:
    """A file can be created in ``folder`` (probed: permission bits say nothing to root or on read-only mounts)."""
    import tempfile

    try:
        handle, path = tempfile.mkstemp(prefix=".em_write_probe_", dir=folder)
        os.close(handle)
        os.remove(path)
    except OSError as error:
        raise EMInputError(f"{folder}: not writable ({error.strerror}). Fix: make it a folder this user can write "
                           f"to (or mount it read-write), then run again.") from None


def num_channels(dataset_json: dict, source: str) -> int:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise EMInputError(f"{source}: missing key 'channel_names' (e.g. {{\"0\": \"MRI\"}}). Fix: add one entry per "
                           f"input channel (see nnU-Net's dataset_format.md).")
    return len(channels)


def image_dimension(properties: dict) -> int:
    """2 or 3: what the file holds (nnU-Net reads 2D images as 3D arrays of one slice)."""
    return len(properties.get("sitk_stuff", {}).get("spacing", properties.get("spacing", ())))


def check_images(case: str, images: list[str], expected_channels: int, reader_writer, source: str):
    """One case's images: the channel count of dataset.json, each file decodable; returns nnU-Net's
    ``(array, properties)`` of the images."""
    if len(images) != expected_channels:
        raise EMInputError(f"{source}: case {case} has {len(images)} image channel(s) ({images[:3]}), "
                           f"dataset.json's channel_names has {expected_channels}. Fix: provide "
                           f"{case}_0000 .. {case}_{expected_channels - 1:04d}, or correct channel_names.")
    for image in images:
        check_file_decodes(image)
    try:
        image, properties = reader_writer.read_images(images)
    except Exception as error:  # noqa: BLE001 (any reader failure is bad input here)
        raise EMInputError(f"{images[0]}: cannot be read ({error}). Fix: export it again from its source.") from None
    if not np.isfinite(image).all():
        channel = next(index for index in range(image.shape[0]) if not np.isfinite(image[index]).all())
        raise EMInputError(f"{images[channel]}: holds NaN or infinite intensities, which nnU-Net's normalization turns "
                           f"into NaN inputs. Fix: export the image again, or replace them (e.g. by the image's "
                           f"minimum).")
    return image, properties


def guard_label_versions(raw_folder: str, dataset: str, *, continuing_run: str | None = None) -> None:
    """Refuse to treat EM output as annotations: labelsTr holding a refined version (its marker file says so),
    or a switch of versions that a kill interrupted. ``continuing_run``: the run that may continue on its own
    labels (the ``run`` command completes interrupted switches itself)."""
    from nnunetv2_em import storage

    labels = os.path.join(raw_folder, "labelsTr")
    root = os.path.join(raw_folder, storage.EM_LABELS)
    if continuing_run is None and os.path.isfile(os.path.join(root, storage.JOURNAL)):
        raise EMInputError(f"{raw_folder}: a switch of labelsTr to another label version was interrupted. Fix: "
                           f"`nnunetv2_em restore -d {dataset}` completes it; then run this command again.")
    marker = storage.read_labels_marker(labels)
    if marker is None or (continuing_run is not None and marker.get("run") == continuing_run):
        return
    if continuing_run is not None and marker.get("run") == storage.REVIEW_RUN and \
            storage.review_version_base(raw_folder, int(marker.get("round", 0))).get("run") in (continuing_run,
                                                                                                   None):
        return  # reviewed labels imported into this run's labels (or into the originals)
    version = storage.version_name(marker.get("run"), int(marker.get("round", 0)))
    marker_file = os.path.join(labels, storage.VERSION_MARKER)
    if not os.path.isfile(storage.originals_manifest_path(raw_folder)):
        raise EMInputError(f"{labels}: holds EM output ({version}), and the original annotations "
                           f"({root}/round_00) are missing. Fix: put em_labels/ back from a backup, then "
                           f"`nnunetv2_em restore -d {dataset} --round 0`; only if these labels are to become your "
                           f"annotations, delete {marker_file}.")
    if continuing_run is not None:
        raise EMInputError(f"{labels}: holds {version}; the run {continuing_run} would start from another run's "
                           f"labels. Fix: `nnunetv2_em restore -d {dataset} --round 0` first (the other run's versions "
                           f"stay in em_labels/), or continue that run with its own options.")
    raise EMInputError(f"{labels}: holds EM output ({version}), not the original annotations. Fix: "
                       f"`nnunetv2_em restore -d {dataset} --round 0` puts the originals back (em_labels/ keeps every "
                       f"version).")


def check_not_em_output(label_file: str) -> None:
    """A label file that nnunetv2_em wrote (its header stamp, ``storage.stamp_label``) is not an annotation,
    wherever it was copied to."""
    from nnunetv2_em import storage

    stamp = storage.label_stamp(label_file)
    if stamp:
        raise EMInputError(f"{label_file}: written by nnunetv2_em ({stamp}), not an annotation (copied out of a "
                           f"dataset's labelsTr or em_labels/ without its version marker?). Fix: use the original "
                           f"annotations (em_labels/round_00/labelsTr of the dataset it came from); to adopt such "
                           f"labels as annotations on purpose, clear the header note (SimpleITK: image = "
                           f"sitk.ReadImage(path); image.SetMetaData('ITK_FileNotes', ''); "
                           f"sitk.WriteImage(image, path, True)).")


def check_raw_dataset(raw_folder: str, *, allow_unlabeled: bool = False) -> dict:
    """Check a raw nnU-Net dataset for the EM loop: labels present, values known, geometry equal to the image.

    Args:
        allow_unlabeled: images in imagesTr without a label are accepted (the cross-fold loop pseudo-labels them)
            instead of being an error; they are not checked further.

    Returns:
        ``{case: {"images": [...], "label": path}}`` as nnU-Net maps it, labelled cases only.
    """
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json_path = os.path.join(raw_folder, "dataset.json")
    guard_label_versions(raw_folder, os.path.basename(os.path.normpath(raw_folder)))
    dataset_json = load_dataset_json(dataset_json_path)
    expected_channels = num_channels(dataset_json, dataset_json_path)
    allowed = set(label_values(dataset_json, dataset_json_path))
    if "ignore" in dataset_json["labels"]:
        allowed.add(int(dataset_json["labels"]["ignore"]))
    labels_folder = os.path.join(raw_folder, "labelsTr")
    if "dataset" not in dataset_json and (not os.path.isdir(labels_folder) or not any(
            name.endswith(dataset_json["file_ending"]) for name in os.listdir(labels_folder))):
        raise EMInputError(f"{labels_folder}: no label files ({dataset_json['file_ending']}). The EM loop refines "
                           f"existing annotations and needs them. Fix: put one label per case in labelsTr/<case>"
                           f"{dataset_json['file_ending']}.")
    cases = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    if not cases:
        raise EMInputError(f"{raw_folder}/imagesTr: no images named <case>_0000{dataset_json['file_ending']}. "
                           f"Fix: add the images in nnU-Net's naming scheme.")
    cases, unlabeled = split_labelled(cases)
    if "dataset" not in dataset_json:
        ending = dataset_json["file_ending"]
        orphans = sorted(name for name in os.listdir(labels_folder)
                         if name.endswith(ending) and name[:-len(ending)] not in cases)
        if orphans:
            raise EMInputError(f"{os.path.join(labels_folder, orphans[0])}: a label without an image "
                               f"({len(orphans)} such file(s)). Fix: add imagesTr/{orphans[0][:-len(ending)]}_0000"
                               f"{ending} or move the label out of labelsTr.")
    if not isinstance(dataset_json.get("numTraining"), int):
        raise EMInputError(f"{dataset_json_path}: 'numTraining' is missing or not an integer (nnU-Net's planner and "
                           f"integrity check need it). Fix: add \"numTraining\": {len(cases) + len(unlabeled)}, the "
                           f"number of training images.")
    if unlabeled and not allow_unlabeled:
        example = next(iter(unlabeled.values()))["label"]
        raise EMInputError(f"{len(unlabeled)} training image(s) have no label, e.g. {example}. Fix: add the label "
                           f"files, move the unlabeled images out of imagesTr, or let `nnunetv2_em run` "
                           f"pseudo-label them.")
    if not cases:
        raise EMInputError(f"{labels_folder}: no label matches an image in imagesTr. Fix: name labels "
                           f"<case>{dataset_json['file_ending']} for images <case>_0000{dataset_json['file_ending']}.")
    first_case = next(iter(cases.values()))
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, first_case["images"][0])()
    for case, entry in sorted(cases.items()):
        check_file_decodes(entry["label"])
        check_not_em_output(entry["label"])
        try:
            seg, seg_properties = reader_writer.read_seg(entry["label"])
        except Exception as error:  # noqa: BLE001 (any reader failure is bad input here)
            raise EMInputError(f"{entry['label']}: cannot be read ({error}). Fix: export it again.") from None
        values = np.unique(seg)
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise EMInputError(f"{entry['label']}: non-integer label values {fractional[:3].tolist()} (a float image "
                               f"resampled with interpolation?). Fix: write the label as integers, resampled with "
                               f"nearest neighbour.")
        unexpected = sorted(set(values.astype(int).tolist()) - allowed)
        if unexpected:
            raise EMInputError(f"{entry['label']}: label values {unexpected} are not in {dataset_json_path} "
                               f"(allowed {sorted(allowed)}). Fix: correct the label file or add the classes to "
                               f"dataset.json.")
        image, image_properties = check_images(case, entry["images"], expected_channels, reader_writer,
                                               f"{raw_folder}/imagesTr")
        check_same_geometry(entry["label"], seg, seg_properties, entry["images"][0], image, image_properties)
    return cases


def check_unlabeled_images(images_by_case: dict[str, list[str]], raw_folder: str, source: str) -> None:
    """Extra images to pseudo-label: the dataset's channel count and dimensionality, each file decodable."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json_path = os.path.join(raw_folder, "dataset.json")
    dataset_json = load_dataset_json(dataset_json_path)
    expected_channels = num_channels(dataset_json, dataset_json_path)
    reference = next(iter(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).values()))["images"]
    reader_writer = determine_reader_writer_from_dataset_json(dataset_json, reference[0])()
    dimension = image_dimension(reader_writer.read_images(reference)[1])
    for case, images in sorted(images_by_case.items()):
        _, properties = check_images(case, images, expected_channels, reader_writer, source)
        if image_dimension(properties) != dimension:
            raise EMInputError(f"{images[0]}: a {image_dimension(properties)}D image; the dataset's images are "
                               f"{dimension}D. Fix: provide {dimension}D images in {source}.")


def unlabeled_images_in_folder(folder: str, raw_folder: str, *, existing, source: str) -> dict[str, list[str]]:
    """``{case: [image files]}`` of a folder of images in nnU-Net's naming (``<case>_0000<ending>``), checked
    like the dataset's images; a case id that ``existing`` holds already is an error."""
    from nnunetv2.utilities.utils import (
        create_lists_from_splitted_dataset_folder,
        get_identifiers_from_splitted_dataset_folder,
    )

    ending = load_dataset_json(os.path.join(raw_folder, "dataset.json"))["file_ending"]
    identifiers = list(get_identifiers_from_splitted_dataset_folder(folder, ending))
    if not identifiers:
        raise EMInputError(f"{source}: no images named <case>_0000{ending}. Fix: use nnU-Net's naming.")
    clashes = sorted(set(identifiers) & set(existing))
    if clashes:
        raise EMInputError(f"{source}: cases {clashes[:3]} already exist in the dataset. Fix: rename them.")
    images = dict(zip(identifiers, create_lists_from_splitted_dataset_folder(folder, ending, identifiers, 1),
                      strict=True))
    check_unlabeled_images(images, raw_folder, source)
    return images


def check_same_geometry(label_path, seg, seg_properties, image_path, image, image_properties) -> None:
    if seg.shape[1:] != image.shape[1:]:
        raise EMInputError(f"{label_path}: shape {seg.shape[1:]} differs from its image {image_path} "
                           f"{image.shape[1:]}. Fix: resample the label onto the image grid.")
    for key in ("spacing", "origin", "direction"):
        a = np.asarray(seg_properties.get("sitk_stuff", seg_properties).get(key, ()), dtype=float)
        b = np.asarray(image_properties.get("sitk_stuff", image_properties).get(key, ()), dtype=float)
        if a.shape != b.shape or not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            raise EMInputError(f"{label_path}: {key} {a.tolist()} differs from its image {image_path} {b.tolist()}. "
                               f"Fix: write the label with the image's geometry (e.g. SimpleITK "
                               f"CopyInformation).")


def check_preprocessed_segmentations(folder: str, cases, allowed_values: set[int]) -> None:
    """Every preprocessed segmentation only holds ``-1`` (outside the image mask) and known label values."""
    import blosc2

    for case in cases:
        path = os.path.join(folder, f"{case}_seg.b2nd")
        if not os.path.isfile(path):
            raise EMInputError(f"{path}: missing. Fix: rerun nnUNetv2_plan_and_preprocess for this configuration.")
        values = set(np.unique(blosc2.open(urlpath=path, mode="r")[:]).astype(int).tolist()) - {-1}
        unexpected = sorted(values - allowed_values)
        if unexpected:
            raise EMInputError(f"{path}: label values {unexpected} are not in dataset.json (allowed "
                               f"{sorted(allowed_values)}). Fix: correct the raw label of {case} and rerun "
                               f"nnUNetv2_plan_and_preprocess.")


VERIFIED_CASES_FILE = "em_verified_cases.json"  # beside dataset.json: cases whose labels a person checked


def load_verified_cases(raw_folder: str, labelled) -> list[str]:
    """Case ids from ``<raw>/em_verified_cases.json`` (a JSON list, or ``{"cases": [...]}``); ``[]`` without it.

    Verified labels are never changed by an E-step, and they are what the precision gate estimates false changes
    from. Every id must be a labelled case of the dataset.
    """
    path = os.path.join(raw_folder, VERIFIED_CASES_FILE)
    if not optional_file(path):
        return []
    try:
        with open(path) as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EMInputError(f"{path}: not valid JSON ({error}). Fix: write a list of case ids, e.g. "
                           f'["hippocampus_001", "hippocampus_004"], or delete the file.') from None
    cases = content.get("cases") if isinstance(content, dict) else content
    if not isinstance(cases, list) or not all(isinstance(c, str) for c in cases):
        raise EMInputError(f"{path}: expected a list of case ids (or {{\"cases\": [...]}}). Fix: e.g. "
                           f'["hippocampus_001", "hippocampus_004"].')
    unknown = sorted(set(cases) - set(labelled))
    if unknown:
        raise EMInputError(f"{path}: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} not labelled cases "
                           f"of this dataset. Fix: list only case ids that have a file in labelsTr.")
    return sorted(set(cases))
