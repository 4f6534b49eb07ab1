"""Logits of preprocessed cases from trained folds, run as its own process (``python -m nnunetv2_em.oof SPEC``).

The cross-fold loop predicts each labelled case with the one fold that did not train on it (out-of-fold) and the
unlabeled cases with the ensemble of all folds. nnU-Net's ``nnUNetPredictor`` does the work
(``initialize_from_trained_model_folder`` + ``predict_logits_from_preprocessed_data``, which averages folds).
Each case's logits are written as ``<cache>/<case>.npy`` (float16, ``(C, *preprocessed shape)``), atomically;
cases already in the cache are skipped, so a killed prediction resumes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def predict_cases(model_folder: str, folds: list[int], cases: dict[str, str], cache: str, *, mirroring: bool,
                  device: str, flip_axis: int | None = None, embeddings_cache: str | None = None) -> list[str]:
    """Predict ``cases`` ({case: preprocessed folder holding <case>.b2nd}) into ``cache``; returns the new ones.

    ``flip_axis`` (a spatial axis of the preprocessed array): predict the mirrored image and mirror the logits back,
    a second opinion of the same network (``estep.agree_on_changes``). ``embeddings_cache``: also write each case's
    encoder embedding there (``rank_unlabeled.case_embedding``, ``<case>.npy``)."""
    import blosc2
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_em import storage

    todo = [case for case in sorted(cases) if not os.path.isfile(os.path.join(cache, f"{case}.npy"))]
    if not todo:
        return []
    os.makedirs(cache, exist_ok=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=tuple(folds),
                                                   checkpoint_name="checkpoint_final.pth")
    for case in todo:
        data = blosc2.open(urlpath=os.path.join(cases[case], f"{case}.b2nd"), mode="r")[:]
        if flip_axis is not None:
            data = np.flip(data, axis=1 + flip_axis)
        if embeddings_cache is not None:
            from nnunetv2_em.rank_unlabeled import case_embedding

            os.makedirs(embeddings_cache, exist_ok=True)
            embedding = case_embedding(predictor, data)
            storage.atomic_write(os.path.join(embeddings_cache, f"{case}.npy"),
                                 lambda temp, e=embedding: np.save(temp, e), suffix=".npy")
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
        array = logits.float().cpu().numpy().astype(np.float16)
        if flip_axis is not None:
            array = np.ascontiguousarray(np.flip(array, axis=1 + flip_axis))
        storage.atomic_write(os.path.join(cache, f"{case}.npy"), lambda temp, a=array: np.save(temp, a),
                             suffix=".npy")
    return todo


def main(argv=None) -> None:
    """``SPEC`` is a JSON file with the keyword arguments of ``predict_cases``."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as handle:
        spec = json.load(handle)
    predict_cases(spec["model_folder"], spec["folds"], spec["cases"], spec["cache"], mirroring=spec["mirroring"],
                  device=spec["device"], flip_axis=spec.get("flip_axis"), embeddings_cache=spec.get("embeddings_cache"))


if __name__ == "__main__":
    main()
