"""``nnunetv2_em predict-tags``: segmentations, presence-tag probabilities and saliency maps of a multi-task model.

Through nnU-Net's own predictor (preprocessing, sliding windows, fold ensemble, export): the segmentation of each
case is what ``nnUNetv2_predict`` writes; the network's tag head is read on every sliding window (a class is
present in the case if some window sees it: the maximum over windows, then the mean over folds; with a 2d
configuration also per slice, the slices of the image array along ``axis`` from ``first_slice`` on, read off the
same windows); with
``saliency``, the Grad-CAM of each tag on the last encoder stage, the maximum over windows, averaged over folds,
brought back to the image's geometry as nnU-Net brings back probabilities.
"""

from __future__ import annotations

import json
import os

import numpy as np

from nnunetv2_em import nnunet_data, storage
from nnunetv2_em.errors import EMInputError


def _tag_names(predictor) -> list[str]:
    names = {int(v): k for k, v in predictor.dataset_json["labels"].items() if isinstance(v, int)}
    return [names.get(int(c), str(c)) for c in predictor.label_manager.foreground_labels]


def window_tags(recorded: list, num_folds: int) -> np.ndarray:
    """Per-window tag probabilities recorded fold after fold (each ``(1, T)``) -> ``(T,)``: the maximum over a
    fold's windows, averaged over folds."""
    windows = np.concatenate([np.asarray(r) for r in recorded], axis=0)
    if windows.shape[0] % num_folds:
        raise RuntimeError(f"{windows.shape[0]} recorded windows do not split into {num_folds} folds")
    return windows.reshape(num_folds, -1, windows.shape[1]).max(axis=1).mean(axis=0)


def _sliding_windows(predictor, data: np.ndarray, *, per_slice: bool = False):
    """``data (channels, *spatial)`` padded as nnU-Net's prediction pads it, the slicer that undoes the padding, and
    the prediction's sliding-window slicers in its order; ``per_slice`` asks for a 2d configuration."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    patch_size = predictor.configuration_manager.patch_size
    if per_slice and len(patch_size) != data.ndim - 2:
        raise ValueError(f"slice tags need a 2d configuration (patch {patch_size}, data {data.shape})")
    padded, revert = pad_nd_image(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), patch_size,
                                  "constant", {"value": 0}, True, None)
    return padded, revert, predictor._internal_get_sliding_window_slicers(padded.shape[1:])


def slice_tags(predictor, data: np.ndarray) -> np.ndarray:
    """``(D, T)`` tag probabilities of every slice (first axis) of ``data (channels, D, *plane)`` with a 2d
    configuration: the maximum over the slice's windows, averaged over the folds."""
    import torch

    network = predictor.network
    padded, _, slicers = _sliding_windows(predictor, data, per_slice=True)
    num_tags = len(predictor.label_manager.foreground_labels)
    total = np.zeros((padded.shape[1], num_tags), np.float32)
    network.return_tags = True
    try:
        for parameters in predictor.list_of_parameters:
            network.load_state_dict(parameters)
            network.eval()
            fold = np.zeros_like(total)
            with torch.inference_mode():
                for slicer in slicers:
                    _, logits = network(padded[slicer][None].to(predictor.device))
                    fold[slicer[1]] = np.maximum(fold[slicer[1]], torch.sigmoid(logits[0]).float().cpu().numpy())
            total += fold / len(predictor.list_of_parameters)
    finally:
        network.return_tags = False
    return total


def slice_tags_from_prediction(predictor, data: np.ndarray, recorded: list) -> np.ndarray | None:
    """``slice_tags`` read off the forward passes the prediction already made (``recorded``: the network's tag
    probabilities, one ``(1, T)`` per call, fold after fold, window after window in slicer order, the unmirrored
    call first), so that a 2d case's windows run once. ``None`` when the calls do not match that layout (nnU-Net
    retried a fold off the device): then run ``slice_tags``."""
    padded, _, slicers = _sliding_windows(predictor, data[:1], per_slice=True)
    mirror_axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    calls_per_window = 2 ** len(mirror_axes) if mirror_axes else 1  # nnU-Net: the input and every flip combination
    num_folds = len(predictor.list_of_parameters)
    if len(recorded) != num_folds * len(slicers) * calls_per_window or any(r.shape[0] != 1 for r in recorded):
        return None
    calls = np.concatenate([np.asarray(r) for r in recorded], axis=0).reshape(num_folds, len(slicers),
                                                                                calls_per_window, -1)
    total = np.zeros((padded.shape[1], calls.shape[-1]), np.float32)
    for fold_calls in calls:
        fold = np.zeros_like(total)
        for slicer, window_calls in zip(slicers, fold_calls, strict=True):
            fold[slicer[1]] = np.maximum(fold[slicer[1]], window_calls[0])
        total += fold / num_folds
    return total


def case_saliency(predictor, data: np.ndarray) -> np.ndarray:
    """``(T, *spatial)`` Grad-CAM of every tag over the sliding windows of ``data (channels, *spatial)``, the
    maximum over windows, averaged over the folds."""
    from nnunetv2_em.trainers.multitask import grad_cam

    network = predictor.network
    padded, revert, slicers = _sliding_windows(predictor, data)
    num_tags = len(predictor.label_manager.foreground_labels)
    total = np.zeros((num_tags, *padded.shape[1:]), np.float32)
    for parameters in predictor.list_of_parameters:
        network.load_state_dict(parameters)
        network.eval()
        fold = np.zeros_like(total)
        for slicer in slicers:
            window = padded[slicer][None].to(predictor.device)
            for tag in range(num_tags):
                cam = grad_cam(network, window, tag)[0].cpu().numpy()
                region = fold[(tag, *slicer[1:])]
                np.maximum(region, cam, out=region)
        total += fold / len(predictor.list_of_parameters)
    return total[(slice(None), *revert[1:])]


def _write_map(values: np.ndarray, properties: dict, path: str) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(values.astype(np.float32))
    stuff = properties["sitk_stuff"]
    image.SetSpacing(stuff["spacing"])
    image.SetOrigin(stuff["origin"])
    image.SetDirection(stuff["direction"])
    storage.atomic_write(path, lambda temp: sitk.WriteImage(image, temp, True), suffix=".nii.gz")


def predict_tags(model_folder: str, input_folder: str, output_folder: str, *, folds=(0,), device: str = "cpu",
                 saliency: bool = False) -> dict:
    """Predict every case of ``input_folder`` (``<case>_<channel><ending>`` files); writes per case the
    segmentation, ``<case>_tags.json`` and, with ``saliency``, ``<case>_saliency_<class>.nii.gz``, and all tag
    probabilities in ``tags.json``. Returns ``{case: {class: probability}}``."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    from nnunetv2_em.rank_unlabeled import load_predictor
    from nnunetv2_em.trainers.multitask import MultiTaskNetwork

    dataset_json_file = os.path.join(model_folder, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise EMInputError(f"{model_folder}: no dataset.json, not a trained nnU-Net model folder. Fix: pass the "
                           f"folder that holds fold_<f>/ (what nnUNetv2_predict -m takes).")
    with open(dataset_json_file) as handle:
        ending = json.load(handle)["file_ending"]
    lists = create_lists_from_splitted_dataset_folder(input_folder, ending) if os.path.isdir(input_folder) else []
    if not lists:
        raise EMInputError(f"{input_folder}: no images <case>_0000{ending}. Fix: name the folder that holds them.")
    predictor = load_predictor(model_folder, folds, device)
    network = predictor.network
    if not isinstance(network, MultiTaskNetwork):
        raise EMInputError(f"{model_folder}: its network ({type(network).__name__}) has no tag head. Fix: train "
                           f"with -tr MultiTaskTrainer (or _cpu), or use nnUNetv2_predict for segmentations only.")
    os.makedirs(output_folder, exist_ok=True)
    names = _tag_names(predictor)
    reader = predictor.plans_manager.image_reader_writer_class()
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    results = {}
    for files in lists:
        case = os.path.basename(files[0])[:-len(ending) - 5]
        image, properties = reader.read_images(files)
        data, _, data_properties = preprocessor.run_case_npy(image, None, properties, predictor.plans_manager,
                                                             predictor.configuration_manager, predictor.dataset_json)
        two_d = len(predictor.configuration_manager.patch_size) == data.ndim - 2
        network.recorded = []
        try:
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            probabilities = window_tags(network.recorded, len(predictor.list_of_parameters))
            per_slice = slice_tags_from_prediction(predictor, data, network.recorded) if two_d else None
        finally:
            network.recorded = None
        export_prediction_from_logits(logits, data_properties, predictor.configuration_manager,
                                      predictor.plans_manager, predictor.dataset_json,
                                      os.path.join(output_folder, case), False)
        results[case] = {name: float(p) for name, p in zip(names, probabilities, strict=True)}
        record = {"case": case, "tags": results[case], "folds": list(folds)}
        if two_d:  # a tag per slice
            if per_slice is None:
                per_slice = slice_tags(predictor, data)
            record["per_slice"] = {
                "axis": int(predictor.plans_manager.transpose_forward[0]),  # of the image array (z, y, x)
                "first_slice": int(data_properties["bbox_used_for_cropping"][0][0]),
                "probabilities": {name: [round(float(v), 5) for v in per_slice[:, t]]
                                  for t, name in enumerate(names)}}
        storage.write_json(os.path.join(output_folder, f"{case}_tags.json"), record)
        if saliency:
            maps = case_saliency(predictor, data)
            for name, values in zip(names, maps, strict=True):
                raw = nnunet_data.preprocessed_map_to_raw_geometry(values, data_properties, predictor.plans_manager,
                                                                   predictor.configuration_manager)
                _write_map(raw, data_properties, os.path.join(output_folder, f"{case}_saliency_{name}{ending}"))
    storage.write_json(os.path.join(output_folder, "tags.json"),
                       {"model": os.path.abspath(model_folder), "folds": list(folds), "tags": results})
    print(json.dumps({"cases": len(results), "output": output_folder}))
    return results
