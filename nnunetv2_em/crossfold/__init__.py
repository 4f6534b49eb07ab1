"""``nnunetv2_em run``: cross-validated EM over a whole dataset, each case corrected by the fold that never saw it.

Each round: (1) M-step: train every fold with an nnU-Net trainer (later rounds warm-start from the previous round's
weights of the same fold with a shorter budget); (2) E-step on out-of-fold logits: fit temperature and noise model,
refine each labelled case, pseudo-label unlabeled cases with the fold ensemble, score and rank; (3) the round's
labels become the dataset's labels (raw ``labelsTr`` and the preprocessed segmentations; round 0 keeps the
originals). Every step leaves a marker file, so the same command continues a killed run without redoing finished
folds or cases.

Paths of a run: ``nnunetv2_em.layout``; label versions: ``nnunetv2_em.storage``. Modules: ``options``
(what a run is), ``tasks`` (the Dask tasks, one per fold or case), ``driver`` (checks, rounds, resuming).
"""

from nnunetv2_em.crossfold.driver import CrossFoldRun, run
from nnunetv2_em.crossfold.options import RunContext, RunOptions
from nnunetv2_em.layout import UNLABELED_FOLDER

__all__ = ["CrossFoldRun", "RunContext", "RunOptions", "UNLABELED_FOLDER", "run"]
