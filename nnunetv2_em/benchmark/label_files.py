"""Label files of the benchmark's datasets as arrays: read one, write one in another's geometry (atomically)."""

from __future__ import annotations

import numpy as np

from nnunetv2_em import storage


def read_label(path: str) -> np.ndarray:
    """(z, y, x) the label image at ``path`` (SimpleITK's axis order)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def write_label_like(array: np.ndarray, reference: str, path: str) -> None:
    """``array`` (z, y, x) as uint8 at ``path`` with the geometry of the image at ``reference``."""
    import SimpleITK as sitk

    image = sitk.ReadImage(reference)
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(image)
    storage.atomic_write(path, lambda temp: sitk.WriteImage(out, temp, True), suffix=".nii.gz")
