"""Render one case of a review export as a PNG (the picture in docs/review.md of what a reviewer opens).

    python scripts/render_review_case.py EXPORT_FOLDER CASE OUT.png

Panels on the slice (first axis) with the most changed or ignored voxels: the image, the original annotation, the
proposal (ignore in yellow), the changes (red: class changed, yellow: set to ignore) and, when exported, the
uncertainty map.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import SimpleITK as sitk


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("case")
    parser.add_argument("out")
    args = parser.parse_args()
    with open(os.path.join(args.export, "export.json")) as handle:
        export = json.load(handle)
    folder = os.path.join(args.export, args.case)
    ending = export["file_ending"]

    def read(name):
        return sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, name)))

    image, original, proposal, changes = (read(f"image_0000{ending}"), read(f"original{ending}"),
                                          read(f"proposal{ending}"), read(f"changes{ending}"))
    uncertainty = read("uncertainty.nii.gz") if export["cases"][args.case].get("uncertainty") else None
    index = int(np.argmax((changes > 0).reshape(changes.shape[0], -1).sum(axis=1)))
    ignore = export["ignore_label"]
    labels = ListedColormap([(0, 0, 0, 0), (0.9, 0.1, 0.3, 0.55), (0.2, 0.7, 0.3, 0.55), (1, 1, 0, 0.8)])
    panels = [("image", None), ("original annotation", original), ("proposal (yellow: ignore)", proposal),
              ("changes (red) / ignored (yellow)", changes)]
    if uncertainty is not None:
        panels.append(("uncertainty of the proposal", uncertainty))
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for axis, (title, overlay) in zip(axes, panels, strict=True):
        axis.imshow(image[index], cmap="gray")
        if overlay is not None and title.startswith("uncertainty"):
            axis.imshow(overlay[index], cmap="magma", vmin=0, vmax=1, alpha=0.7)
        elif overlay is not None and title.startswith("changes"):
            axis.imshow(overlay[index], cmap=ListedColormap([(0, 0, 0, 0), (1, 0, 0, 0.8), (1, 1, 0, 0.8)]),
                        vmin=0, vmax=2, interpolation="nearest")
        elif overlay is not None:
            axis.imshow(np.where(overlay[index] == ignore, 3, overlay[index]), cmap=labels, vmin=0, vmax=3,
                        interpolation="nearest")
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    row = export["cases"][args.case]
    figure.suptitle(f"{args.case}: rank {row['rank']}, review score {row['review_score']:.3f} ({row['why']}); "
                    f"slice {index}", fontsize=9)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
