"""Thin wrappers over nnU-Net's own functions for preprocessed segmentations (no file writes here).

Everything that converts between nnU-Net's preprocessed space and the raw label geometry goes through nnU-Net's
code (resampling function from the plans, ``insert_crop_into_image``, the plans' transpose, the preprocessor's
foreground sampler), so refined labels stay consistent with what ``nnUNetv2_preprocess`` would produce.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # nnU-Net's modules import torch (seconds): imported where used, so storage and the CLI start fast
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

SEG_DTYPE = np.int16  # what DefaultPreprocessor.run_case_save stores


def class_locations(seg: np.ndarray, label_manager: LabelManager) -> dict:
    """Foreground sample locations for nnU-Net's oversampling, exactly as ``DefaultPreprocessor.run_case_npy``.

    Args:
        seg: ``(1, *spatial)`` preprocessed segmentation.
    """
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    collect = list(label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels)
    if label_manager.has_ignore_label:
        collect.append([-1] + label_manager.all_labels)
    return DefaultPreprocessor._sample_foreground_locations(seg, collect, verbose=False)


def blosc2_seg_layout(seg_shape, patch_size) -> tuple:
    """(blocks, chunks) nnU-Net uses for a segmentation of this shape and patch size."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    return comp_blosc2_params(seg_shape, tuple(patch_size), np.dtype(SEG_DTYPE).itemsize)


def _reverting_resampling(properties: dict, plans_manager: PlansManager,
                          configuration_manager: ConfigurationManager) -> tuple:
    """``(cropped shape, preprocessed spacing, raw spacing)`` (transposed) that revert a case's resampling, as
    ``convert_predicted_logits_to_segmentation_with_correct_shape`` computes them."""
    spacing_transposed = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    target_shape = properties["shape_after_cropping_and_before_resampling"]
    current_spacing = (configuration_manager.spacing
                       if len(configuration_manager.spacing) == len(target_shape)
                       else [spacing_transposed[0], *configuration_manager.spacing])
    return target_shape, current_spacing, spacing_transposed


def preprocessed_to_raw_geometry(seg: np.ndarray, properties: dict, plans_manager: PlansManager,
                                 configuration_manager: ConfigurationManager) -> np.ndarray:
    """Revert preprocessing of a label map: resample to the cropped shape, undo cropping, undo the transpose.

    Mirrors ``convert_predicted_logits_to_segmentation_with_correct_shape`` for label maps. Voxels outside the
    image's nonzero mask (``-1`` in preprocessed space) and outside the crop become 0, as in the raw labels.

    Args:
        seg: ``(1, *spatial)`` or ``(*spatial)`` preprocessed labels.

    Returns:
        ``(*raw_spatial)`` uint8 or uint16 array in the raw file's axis order.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    seg = np.asarray(seg)
    if seg.ndim == len(properties["shape_before_cropping"]):
        seg = seg[None]
    target_shape, current_spacing, spacing_transposed = _reverting_resampling(properties, plans_manager,
                                                                              configuration_manager)
    if tuple(seg.shape[1:]) != tuple(target_shape):
        seg = configuration_manager.resampling_fn_seg(seg, target_shape, current_spacing, spacing_transposed)
    seg = np.maximum(np.asarray(seg)[0], 0)
    dtype = np.uint8 if seg.max(initial=0) < 255 else np.uint16
    full = np.zeros(properties["shape_before_cropping"], dtype=dtype)
    full = insert_crop_into_image(full, seg.astype(dtype), properties["bbox_used_for_cropping"])
    return full.transpose(plans_manager.transpose_backward)


def preprocessed_map_to_raw_geometry(values: np.ndarray, properties: dict, plans_manager: PlansManager,
                                     configuration_manager: ConfigurationManager, *, fill: float = 0.0
                                     ) -> np.ndarray:
    """Revert preprocessing of a float map (a probability, an uncertainty) the way nnU-Net reverts predicted
    probabilities: the plans' probability resampling, the crop undone (``fill`` outside it), the transpose undone.

    Args:
        values: ``(*spatial)`` float map in the preprocessed array.

    Returns:
        ``(*raw_spatial)`` float32 in the raw file's axis order.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    values = np.asarray(values, dtype=np.float32)[None]
    target_shape, current_spacing, spacing_transposed = _reverting_resampling(properties, plans_manager,
                                                                              configuration_manager)
    if tuple(values.shape[1:]) != tuple(target_shape):
        values = configuration_manager.resampling_fn_probabilities(values, target_shape, current_spacing,
                                                                   spacing_transposed)
    full = np.full(properties["shape_before_cropping"], fill, dtype=np.float32)
    full = insert_crop_into_image(full, np.asarray(values[0], dtype=np.float32), properties["bbox_used_for_cropping"])
    return full.transpose(plans_manager.transpose_backward)


def preprocess_label(label_file: str, image_files: list[str], plans_manager: PlansManager,
                     configuration_manager: ConfigurationManager, dataset_json: dict) -> tuple[np.ndarray, dict]:
    """A raw label file as nnU-Net's preprocessing makes it for training: ``(1, *spatial)`` int16 segmentation and
    the properties with its ``class_locations`` (the image is preprocessed in memory alongside, never written)."""
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    _, seg, properties = preprocessor.run_case(image_files, label_file, plans_manager, configuration_manager,
                                               dataset_json)
    return np.asarray(seg).astype(SEG_DTYPE), properties


def refined_raw_label(original_raw: np.ndarray, original_preprocessed: np.ndarray, refined_preprocessed: np.ndarray,
                      properties: dict, plans_manager: PlansManager,
                      configuration_manager: ConfigurationManager) -> np.ndarray:
    """Raw-geometry refined label that equals the original raw file wherever the refinement changed nothing.

    Reverting preprocessing is exact only without resampling; applying just the voxels that differ keeps every
    untouched voxel of the annotation byte-identical.
    """
    # most cases of a round change nothing; skip the two resamplings (the bulk of staging a case)
    if np.array_equal(original_preprocessed, refined_preprocessed):
        return original_raw
    before = preprocessed_to_raw_geometry(original_preprocessed, properties, plans_manager, configuration_manager)
    after = preprocessed_to_raw_geometry(refined_preprocessed, properties, plans_manager, configuration_manager)
    if before.shape != original_raw.shape:
        raise ValueError(f"raw label shape {original_raw.shape} does not match the preprocessing properties "
                         f"{before.shape}")
    out_dtype = np.promote_types(original_raw.dtype, after.dtype)
    return np.where(after != before, after, original_raw).astype(out_dtype)


def constraints_to_preprocessed(constraints, properties: dict, plans_manager: PlansManager, preprocessed_shape):
    """A case's ``CaseConstraints`` in raw image voxels, expressed in its preprocessed array: regions follow the
    plans' transpose, the crop to nonzero and the resampling; volumes scale with the voxel size. A region that
    lies wholly outside the crop makes its class absent (the class cannot be where the image is empty).

    Args:
        constraints: ``nnunetv2_em.constraints.CaseConstraints`` in raw voxels. preprocessed_shape: the
            preprocessed array's spatial shape.
    """
    import dataclasses

    cropped_shape = tuple(properties["shape_after_cropping_and_before_resampling"])
    bbox = properties["bbox_used_for_cropping"]
    factors = [new / old for new, old in zip(preprocessed_shape, cropped_shape, strict=True)]
    region, absent = {}, set(constraints.absent)
    for c, box in constraints.region.items():
        transposed = [box[axis] for axis in plans_manager.transpose_forward]
        converted = []
        for (start, stop), (crop_start, crop_stop), factor, size in zip(transposed, bbox, factors,
                                                                        preprocessed_shape, strict=True):
            start, stop = max(start, crop_start) - crop_start, min(stop, crop_stop) - crop_start
            converted.append((min(int(np.floor(start * factor)), size), min(int(np.ceil(stop * factor)), size)))
        if any(start >= stop for start, stop in converted):
            absent.add(c)
        else:
            region[c] = tuple(converted)
    scale = float(np.prod(factors))
    volume = {c: (low * scale, high * scale) for c, (low, high) in constraints.volume.items()}
    return dataclasses.replace(constraints, region=region, absent=frozenset(absent), volume=volume)
