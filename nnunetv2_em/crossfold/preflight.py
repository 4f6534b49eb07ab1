"""What ``nnunetv2_em run`` checks before it writes anything: its options, the raw dataset (or, mid-run, the kept
originals), the fold split, the extra unlabeled images and the trainer. Each problem is one ``EMInputError`` naming
the file or option and the fix."""

from __future__ import annotations

import json
import os

from nnunetv2_em import checks, storage
from nnunetv2_em.crossfold.options import RunOptions
from nnunetv2_em.errors import EMInputError


def check_options(options: RunOptions) -> None:
    if options.rounds is not None and options.rounds < 1:
        raise EMInputError(f"--rounds {options.rounds}: must be at least 1. Fix: pass --rounds 1 or more.")
    if options.seed is not None and options.seed < 0:
        raise EMInputError(f"--seed {options.seed}: must be an integer >= 0. Fix: e.g. --seed 0.")
    if not 0 < options.warm_fraction <= 1:
        raise EMInputError(f"--warm-fraction {options.warm_fraction}: must be in (0, 1]. Fix: e.g. 0.5.")
    if not options.folds or len(set(options.folds)) != len(options.folds) or min(options.folds) < 0:
        raise EMInputError(f"--folds {list(options.folds)}: need distinct fold numbers >= 0. Fix: e.g. 0 1 2.")
    if options.unlabeled and not os.path.isdir(options.unlabeled):
        raise EMInputError(f"--unlabeled {options.unlabeled}: not a folder. Fix: pass a folder of images named "
                           f"<case>_0000<file ending>.")


def raw_cases(raw: str) -> tuple[dict, dict]:
    """``(labelled, unlabeled)``: ``{case: {"images": [...], "label": path}}`` of the raw dataset, checked; once a run
    replaced ``labelsTr`` the labelled cases are those with a kept original."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    versions_manifest = storage.originals_manifest_path(raw)
    if os.path.isfile(versions_manifest):  # a run in progress already replaced labelsTr: check the originals
        with open(versions_manifest) as handle:
            originals = sorted(json.load(handle)["cases"])
        dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
        cases = get_filenames_of_train_images_and_targets(raw, dataset_json)
        labelled = {case: cases[case] for case in originals if case in cases}
        # cases without an original label stay pseudo-labelled cases, whatever labelsTr holds for them now
        return labelled, {case: entry for case, entry in cases.items() if case not in labelled}
    labelled = checks.check_raw_dataset(raw, allow_unlabeled=True)
    dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
    _, unlabeled = checks.split_labelled(get_filenames_of_train_images_and_targets(raw, dataset_json))
    if unlabeled:
        checks.check_unlabeled_images({case: entry["images"] for case, entry in unlabeled.items()}, raw,
                                      f"{raw}/imagesTr")
    return labelled, unlabeled


def check_folds(preprocessed: str, folds, *, labelled: int, dataset: str) -> None:
    """The requested ``folds`` exist in ``splits_final.json``, or are 0..K-1 (K >= 2, at most ``labelled``) for the
    run to create."""
    path = os.path.join(preprocessed, "splits_final.json")
    if os.path.isfile(path):
        try:
            with open(path) as handle:
                splits = json.load(handle)
            num_splits = len(splits)
            for split in splits:
                split["train"], split["val"]  # noqa: B018 (the keys nnU-Net reads)
        except (json.JSONDecodeError, TypeError, KeyError):
            raise EMInputError(f"{path}: not a list of {{'train': [...], 'val': [...]}} splits. Fix: repair it or "
                               f"delete it (the run then creates one split per fold).") from None
        if max(folds) >= num_splits:
            raise EMInputError(f"{path}: has {num_splits} splits, fold {max(folds)} requested. "
                               f"Fix: pick folds below {num_splits}.")
        return
    if sorted(folds) != list(range(len(folds))) or len(folds) < 2:
        raise EMInputError(f"--folds {list(folds)}: without a splits_final.json the run creates "
                           f"one split per fold, so folds must be 0..K-1 with K >= 2. Fix: e.g. --folds 0 1 2.")
    if labelled < len(folds):
        raise EMInputError(f"{dataset}: {labelled} labelled case(s) for {len(folds)} "
                           f"folds; every fold needs at least one case to judge. Fix: pass fewer --folds (at "
                           f"least 2) or add labelled cases.")


def extra_unlabeled(folder: str | None, raw: str, *, labelled) -> dict[str, list[str]]:
    """``{case: [image files]}`` of ``--unlabeled`` (none without it), checked against the dataset's cases."""
    if not folder:
        return {}
    return checks.unlabeled_images_in_folder(folder, raw, existing=labelled, source=f"--unlabeled {folder}")


def check_trainer(name: str) -> None:
    """``name`` is an nnU-Net trainer, and a plain one: the run does the E-steps itself."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_em.trainers.em_trainer import EMTrainer

    try:
        trainer_class = recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise EMInputError(f"--trainer {name}: no such nnU-Net trainer. Fix: use a trainer "
                           f"name that nnUNetv2_train accepts, e.g. nnUNetTrainer.") from None
    if issubclass(trainer_class, EMTrainer):
        raise EMInputError(f"--trainer {name}: the cross-fold loop runs the E-steps itself and "
                           f"needs a plain trainer. Fix: e.g. nnUNetTrainer (GPU) or VanillaTrainer_cpu.")
