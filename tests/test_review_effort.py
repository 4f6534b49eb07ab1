"""Edit effort of a review against hand-counted answers."""

import numpy as np
import pytest

from nnunetv2_em.review_effort import added_path_length, edit_effort


def test_added_path_length_counts_only_the_contour_the_reviewer_had_to_draw():
    proposal = np.zeros((1, 8, 8), np.int64)
    proposal[0, 2:5, 2:5] = 1  # a 3x3 square: contour of 8 pixels
    assert added_path_length(proposal, proposal, classes=[1]) == 0
    reviewed = proposal.copy()
    reviewed[0, 2:5, 5] = 1  # widened by one column: the new right edge (3 pixels) and the top/bottom ends move
    added = added_path_length(proposal, reviewed, classes=[1])
    # reviewed contour: the border of a 3x4 rectangle = 10 pixels; shared with the proposal's: its left column (3),
    # top and bottom rows at columns 2..4 (2 x 2 more, the corners counted once) -> 10 - 7 = 3
    assert added == 3
    # a structure the proposal missed entirely: its whole contour is added, on every slice
    missed = np.zeros((2, 8, 8), np.int64)
    missed[:, 1:4, 1:4] = 2
    assert added_path_length(np.zeros_like(missed), missed, classes=[2]) == 2 * 8
    with pytest.raises(ValueError, match="differ in shape"):
        added_path_length(proposal, proposal[:, :4], classes=[1])


def test_edit_effort_counts_resolved_ignore_voxels_as_edits_and_scores_per_class():
    proposal = np.zeros((1, 10, 10), np.int64)
    proposal[0, 2:6, 2:6] = 1
    proposal[0, 6, 2:6] = 3  # the ignore label: the reviewer decides these
    reviewed = proposal.copy()
    reviewed[0, 6, 2:6] = 1  # resolved as class 1
    effort = edit_effort(proposal, reviewed, classes=[1, 2], ignore_label=3)
    assert effort["voxels_edited"] == 4 and effort["voxels_ignored_in_proposal"] == 4
    assert effort["dice_1"] == pytest.approx(2 * 16 / (16 + 20))
    assert np.isnan(effort["dice_2"])  # absent from both
    assert effort["surface_dice_2"] == 1.0 and effort["hd95_2"] == 0.0
    # one row added: every surface point within the 1-voxel tolerance, 1 voxel the farthest
    assert effort["surface_dice_1"] == 1.0 and effort["hd95_1"] == pytest.approx(1.0)
    grown = reviewed.copy()
    grown[0, 7:10, 2:6] = 1  # three rows more: beyond the tolerance
    far = edit_effort(proposal, grown, classes=[1], ignore_label=3)
    assert 0 < far["surface_dice_1"] < 1 and far["hd95_1"] > 1.0
    unchanged = edit_effort(proposal, proposal, classes=[1], ignore_label=3, surfaces=False)
    assert unchanged["voxels_edited"] == 0 and unchanged["added_path_length"] == 0 and "hd95_1" not in unchanged
