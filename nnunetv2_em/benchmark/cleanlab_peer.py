"""The peer arm of the noise benchmark: cleanlab's label-issue filter on the same probabilities EM's first E-step
sees, its flagged voxels set to the ignore label."""

from __future__ import annotations

import os

import numpy as np

from nnunetv2_em import estep, storage
from nnunetv2_em.benchmark.label_files import read_label, write_label_like


def filtered_labels(cases: list[str], *, folder: str, layout, versions, plans_file: str, configuration: str,
                    label_files: dict[str, str], ending: str, ignore_label: int) -> dict[str, str]:
    """The noisy annotation with the voxels cleanlab flags set to ``ignore_label``, per case in ``folder/labels``.

    cleanlab's ``segmentation.filter.find_label_issues`` runs on the EM run's round-1 out-of-fold probabilities
    (``layout``: the run's ``RunLayout``; the network's softmax), one case at a time with its slices as images, in
    nnU-Net's preprocessed space (``versions``: the run's ``DatasetLabelVersions``, round 0 = the annotation); the
    result is mapped back to the raw geometry exactly as EM's refined labels are and written like
    ``label_files[case]``. Returns ``{case: raw label file}``; flags are kept per case (``folder/flags``) for the
    detection scores; a finished folder (``flags.json``) is reused as it is.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from cleanlab.segmentation.filter import find_label_issues
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_em import nnunet_data

    files = {case: os.path.join(folder, "labels", case + ending) for case in cases}
    done = os.path.join(folder, "flags.json")
    if os.path.isfile(done):
        return files
    plans_manager = PlansManager(plans_file)
    configuration_manager = plans_manager.get_configuration(configuration)
    os.makedirs(os.path.join(folder, "labels"), exist_ok=True)
    os.makedirs(os.path.join(folder, "flags"), exist_ok=True)
    counts = {}
    for case in cases:
        noisy = versions.read_segmentation(0, case)[0]
        probabilities = estep.softmax(np.load(layout.logits_file(1, case)), 1.0).astype(np.float32)
        issues = find_label_issues(np.maximum(noisy, 0), np.moveaxis(probabilities, 0, 1), n_jobs=1,
                                   verbose=False) & (noisy >= 0)
        storage.atomic_write(os.path.join(folder, "flags", f"{case}.npz"),
                             lambda temp, m=issues: np.savez_compressed(temp, flagged=m), suffix=".npz")
        filtered = np.where(issues, ignore_label, noisy)
        raw = nnunet_data.refined_raw_label(read_label(versions.original_label_path(case)), noisy, filtered,
                                            load_pickle(versions.original_properties_path(case)), plans_manager,
                                            configuration_manager)
        write_label_like(raw, label_files[case], files[case])
        counts[case] = int(issues.sum())
    storage.write_json(done, counts)
    return files
