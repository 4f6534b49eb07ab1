"""Everything nnunetv2_em keeps on disk. The only package that writes label files; every write is atomic (temp file
+ rename). Modules: ``files`` (atomic writes, stamps, checksums), ``trainer_labels`` (EMTrainer's), ``versions``
(a dataset's label versions), ``reviewed`` (labels a person reviewed), ``activation`` (making a version live),
``lock`` (one command at a time), ``status`` (status and restore).

Layout for a training run (``EMTrainer``), next to nnU-Net's own folders, which are only ever read:

    nnUNet_preprocessed/<Dataset>/
        <data_identifier>/                       nnU-Net's preprocessed cases: the original labels, never written
        em_training_labels/<Trainer>__<Plans>__<configuration>/fold_<f>/
            <case>.b2nd          -> symlink to nnU-Net's image (images are never re-preprocessed)
            <case>_seg.b2nd      -> symlink to the original, or the refined segmentation of the last E-step
            <case>.pkl           -> symlink to the original, or a copy with recomputed class_locations
        em_training_labels/<Trainer>__<Plans>__<configuration>/exchange/fold_<f>/round_<r>/
            <case>_seg.b2nd, <case>.json   fold f's out-of-fold refinement of its validation case (FoldExchange)
    nnUNet_results/<Dataset>/<Trainer>__<Plans>__<configuration>/fold_<f>/em/
        state.json               resumable state of the loop
        originals.json           SHA-256 of every original label file the run reads
        round_<r>/labelsTr/      the round's labels in raw geometry: a complete labelsTr folder
        round_<r>/dataset.json   nnU-Net dataset.json for it (with the ignore label)
        round_<r>/cases.csv|json cases ranked by how much review they need
        round_<r>/summary.json   noise model, likelihood and change counts of the round

A run's training segmentations live in a folder of their own, so folds can train at the same time and a vanilla
nnU-Net training on the same preprocessed data still sees the original annotation.
"""

from nnunetv2_em.storage.activation import (
    activate,
    gt_segmentations_changed,
    recover_activation,
    restore_gt_segmentations,
    roll_forward,
)
from nnunetv2_em.storage.files import (
    KILL_AT_ENV,
    STAMP_KEYS,
    STAMP_PREFIX,
    STAMPED_ENDINGS,
    TEMP_DIR_PREFIX,
    atomic_write,
    changed_files,
    checksum_manifest,
    copy_file,
    fault_point,
    json_fix,
    label_stamp,
    place_case_images,
    read_json,
    read_seg_b2nd,
    sha256,
    stamp_label,
    temporary_folder,
    verified_copy,
    write_json,
    write_label_image,
    write_pickle,
    write_seg_b2nd,
    write_text,
    write_uncertainty,
)
from nnunetv2_em.storage.lock import (
    LOCK_ENV,
    LOCK_SUFFIX,
    dataset_lock,
    lock_holder,
    lock_path,
    reap_leftover_processes,
    remove_stale_temp_folders,
)
from nnunetv2_em.storage.reviewed import ReviewedLabels, review_version_base, stage_review_version, stage_reviewed_case
from nnunetv2_em.storage.status import dataset_status, dataset_versions, labels_folder_state, restore
from nnunetv2_em.storage.trainer_labels import FoldExchange, TrainingLabelFolder, write_round_labels
from nnunetv2_em.storage.versions import (
    EM_LABELS,
    JOURNAL,
    ORIGINAL,
    PREPROCESSED_MARKER_SUFFIX,
    PREVIOUS_LABELS,
    PSEUDO,
    REFINED,
    REVIEW_RUN,
    REVIEWED,
    SOFT_MAPS_FOLDER,
    STAGING_LABELS,
    VERSION_MARKER,
    DatasetLabelVersions,
    check_switchable,
    exchange_paths,
    labels_digest,
    labels_switch_paths,
    non_label_files,
    originals_manifest_path,
    other_files,
    preprocessed_em_output,
    preprocessed_marker_path,
    read_labels_marker,
    read_preprocessed_marker,
    soft_maps_path,
    version_name,
)

__all__ = [
    "DatasetLabelVersions",
    "EM_LABELS",
    "FoldExchange",
    "JOURNAL",
    "KILL_AT_ENV",
    "LOCK_ENV",
    "LOCK_SUFFIX",
    "ORIGINAL",
    "PREPROCESSED_MARKER_SUFFIX",
    "PREVIOUS_LABELS",
    "PSEUDO",
    "REFINED",
    "REVIEWED",
    "REVIEW_RUN",
    "ReviewedLabels",
    "SOFT_MAPS_FOLDER",
    "STAGING_LABELS",
    "STAMPED_ENDINGS",
    "STAMP_KEYS",
    "STAMP_PREFIX",
    "TEMP_DIR_PREFIX",
    "TrainingLabelFolder",
    "VERSION_MARKER",
    "activate",
    "atomic_write",
    "changed_files",
    "check_switchable",
    "checksum_manifest",
    "copy_file",
    "dataset_lock",
    "dataset_status",
    "dataset_versions",
    "exchange_paths",
    "fault_point",
    "gt_segmentations_changed",
    "json_fix",
    "label_stamp",
    "place_case_images",
    "labels_digest",
    "labels_folder_state",
    "labels_switch_paths",
    "lock_holder",
    "lock_path",
    "non_label_files",
    "originals_manifest_path",
    "other_files",
    "preprocessed_em_output",
    "preprocessed_marker_path",
    "read_json",
    "read_labels_marker",
    "read_preprocessed_marker",
    "read_seg_b2nd",
    "reap_leftover_processes",
    "recover_activation",
    "remove_stale_temp_folders",
    "restore",
    "restore_gt_segmentations",
    "review_version_base",
    "roll_forward",
    "sha256",
    "soft_maps_path",
    "stage_review_version",
    "stage_reviewed_case",
    "stamp_label",
    "temporary_folder",
    "verified_copy",
    "version_name",
    "write_json",
    "write_label_image",
    "write_pickle",
    "write_round_labels",
    "write_seg_b2nd",
    "write_text",
    "write_uncertainty",
]
