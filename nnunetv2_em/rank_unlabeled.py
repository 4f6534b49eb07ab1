"""``nnunetv2_em rank-unlabeled``: which unlabeled cases to annotate next, ranked by several strategies.

Per case, from a trained nnU-Net model (a fold folder's parent, as ``nnUNetv2_predict -m`` takes it): its embedding
(the encoder's bottleneck, global-average-pooled per sliding window and averaged over the windows) and the
prediction's mean entropy and foreground size. Strategies (``selection``): ``examine`` (EXAMINE score on the
unlabeled pool's embeddings), ``entropy`` (mean predictive entropy of the fold ensemble), ``k-center`` (diversity:
farthest from the labelled cases and each other), ``random`` and ``fg-random`` (random among cases with predicted
foreground first: nnActive's strong baseline). With ``ssl_model`` the embeddings come from a self-supervised
encoder instead (``-tr MaskedPretrainTrainer``: masked-image pretraining on the dataset's own images).
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from nnunetv2_em import checks, selection, storage
from nnunetv2_em.errors import EMInputError

STRATEGIES = ("examine", "entropy", "k-center", "random", "fg-random")


def load_predictor(model_folder: str, folds, device: str):
    """nnU-Net's predictor of a trained model folder (checked: plans, final checkpoints of the folds), no mirroring."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if not os.path.isfile(os.path.join(model_folder, "plans.json")):
        raise EMInputError(f"{model_folder}: no plans.json, not a trained nnU-Net model folder. Fix: pass the folder "
                           f"that holds fold_<f>/ (what nnUNetv2_predict -m takes).")
    missing = [f for f in folds if not os.path.isfile(os.path.join(model_folder, f"fold_{f}",
                                                                   "checkpoint_final.pth"))]
    if missing:
        raise EMInputError(f"{model_folder}: no checkpoint_final.pth for fold(s) {missing}. Fix: pass --folds of "
                           f"finished trainings.")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device != "cpu", device=torch.device(device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, use_folds=tuple(folds),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def _trainer_name(model_folder: str) -> str | None:
    """The trainer that wrote the model folder's first final checkpoint (None without one)."""
    import glob

    import torch

    checkpoints = sorted(glob.glob(os.path.join(model_folder, "fold_*", "checkpoint_final.pth")))
    if not checkpoints:
        return None
    return torch.load(checkpoints[0], map_location="cpu", weights_only=False)["trainer_name"]


def _is_masked_pretraining(trainer: str | None) -> bool:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_em.trainers.masked_pretraining import MaskedPretrainTrainer

    if trainer is None:
        return False
    try:
        return issubclass(recursive_find_trainer_class_by_name(trainer), MaskedPretrainTrainer)
    except (AssertionError, TypeError, RuntimeError):
        return False


def case_embedding(predictor, data: np.ndarray) -> np.ndarray:
    """``(F,)`` the bottleneck features of the first fold's network, pooled over each sliding window (global
    average) and averaged over the windows.

    Args:
        data: ``(channels, *spatial)`` a preprocessed case.
    """
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    padded, _ = pad_nd_image(torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)),
                             predictor.configuration_manager.patch_size, "constant", {"value": 0}, True, None)
    pooled = []
    with torch.inference_mode():
        for slicer in predictor._internal_get_sliding_window_slicers(padded.shape[1:]):
            features = network.encoder(padded[slicer][None].to(predictor.device))[-1]
            pooled.append(features.float().mean(dim=tuple(range(2, features.ndim)))[0].cpu().numpy())
    return np.mean(pooled, axis=0)


def case_prediction_stats(predictor, data: np.ndarray) -> dict:
    """Mean predictive entropy (nats, voxels inside the image) and predicted foreground voxels of the ensemble."""
    import torch

    logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.ascontiguousarray(data)))
    probabilities = torch.softmax(logits.float(), dim=0).cpu().numpy()
    inside = np.any(np.asarray(data) != 0, axis=0)
    return {"mean_entropy": selection.mean_entropy(probabilities, mask=inside if inside.any() else None),
            "foreground_voxels": int(np.count_nonzero(probabilities.argmax(axis=0) > 0))}


def preprocess_case(predictor, images: list[str]) -> np.ndarray:
    """``(channels, *spatial)`` one case's image files (one per channel) preprocessed as ``predictor``'s plans say."""
    data, _, _ = predictor.configuration_manager.preprocessor_class(verbose=False).run_case(
        images, None, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    return data


def case_features(images: dict[str, list[str]], *, embedder=None, predictor=None) -> tuple[np.ndarray | None,
                                                                                           list[dict]]:
    """Per case of ``images`` (``{case: image files}``, in its order): the ``embedder``'s embedding and the
    ``predictor``'s prediction stats; each case is preprocessed once per distinct network.

    Returns:
        ``(N, F)`` embeddings (``None`` without an embedder) and N dicts of ``case_prediction_stats`` (empty without
        a predictor).
    """
    first = embedder if embedder is not None else predictor
    if first is None:
        raise ValueError("case_features needs an embedder, a predictor or both")
    embeddings, stats = [], []
    for files in images.values():
        data = preprocess_case(first, files)
        if embedder is not None:
            embeddings.append(case_embedding(embedder, data))
        if predictor is not None:
            stats.append(case_prediction_stats(predictor, data if predictor is first
                                               else preprocess_case(predictor, files)))
        else:
            stats.append({})
    return (np.asarray(embeddings) if embedder is not None else None), stats


def rankings(embeddings: np.ndarray, stats: list[dict], *, labelled_embeddings: np.ndarray | None, strategies,
             seed: int) -> dict[str, list[int]]:
    """Order of the pool's rows (best first) per strategy. ``embeddings``: ``(N, F)`` of the pool;
    ``labelled_embeddings``: ``(L, F)`` of the labelled cases (k-center starts from them)."""
    n = embeddings.shape[0]
    orders = {}
    rng = np.random.default_rng(seed)
    for strategy in strategies:
        if strategy == "examine":
            scores = selection.examine_scores(embeddings)
            orders[strategy] = sorted(range(n), key=lambda i: (-scores[i], i))
        elif strategy == "entropy":
            orders[strategy] = sorted(range(n), key=lambda i: (-stats[i]["mean_entropy"], i))
        elif strategy == "k-center":
            if labelled_embeddings is not None and len(labelled_embeddings):
                both = np.vstack([labelled_embeddings, embeddings])
                taken = selection.k_center_greedy(both, n, selected=range(len(labelled_embeddings)))
                orders[strategy] = [i - len(labelled_embeddings) for i in taken]
            else:
                orders[strategy] = selection.k_center_greedy(embeddings, n)
        elif strategy == "random":
            orders[strategy] = [int(i) for i in rng.permutation(n)]
        elif strategy == "fg-random":
            permutation = [int(i) for i in rng.permutation(n)]
            orders[strategy] = [i for i in permutation if stats[i]["foreground_voxels"] > 0] + \
                [i for i in permutation if stats[i]["foreground_voxels"] == 0]
        else:
            raise EMInputError(f"--strategy {strategy}: unknown. Fix: one of {', '.join(STRATEGIES)}.")
    return orders


def write_ranking(out: str, rows: list[dict], header: dict) -> dict:
    """``out`` (CSV, one row per case) and the same with ``header`` as JSON beside it; returns the JSON's content."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(out, buffer.getvalue())
    result = {**header, "cases": rows}
    storage.write_json(os.path.splitext(out)[0] + ".json", result)
    return result


def rank_unlabeled(dataset: str, model_folder: str | None, out: str, *, folds=(0,), images: str | None = None,
                   strategies=STRATEGIES, seed: int = 0, device: str = "cpu", ssl_model: str | None = None,
                   ssl_fold="all") -> dict:
    """Rank the dataset's unlabeled images (``imagesTr`` without a label, and ``images``: a folder of
    ``<case>_0000<ending>`` files) by each strategy; writes ``out`` (CSV) and the same as JSON beside it.

    Embeddings come from the segmentation model's encoder (``model_folder``, its first fold) or, with
    ``ssl_model``, from a self-supervised encoder (``-tr MaskedPretrainTrainer``, fold ``ssl_fold``); the
    strategies that read predictions (entropy, fg-random) need ``model_folder``."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunetv2_em.planning import dataset_name

    paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
    name = dataset_name(dataset)
    raw = os.path.join(paths["nnUNet_raw"], name)
    dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
    labelled, pool = checks.split_labelled(get_filenames_of_train_images_and_targets(raw, dataset_json))
    pool = {case: entry["images"] for case, entry in pool.items()}
    if images:
        pool.update(checks.unlabeled_images_in_folder(images, raw, existing=[*labelled, *pool],
                                                      source=f"--images {images}"))
    if not pool:
        raise EMInputError(f"{raw}/imagesTr: every image has a label, and no --images folder was given. Fix: "
                           f"name a folder of unlabeled images with --images.")
    needs_predictions = [s for s in strategies if s in ("entropy", "fg-random")]
    if model_folder is None and (ssl_model is None or needs_predictions):
        raise EMInputError(f"--strategy {' '.join(needs_predictions) or '...'}: needs a segmentation model. Fix: "
                           f"pass --model (or, with --ssl-model, only examine, k-center, random).")
    if ssl_model is not None:
        trainer = _trainer_name(ssl_model)
        if not _is_masked_pretraining(trainer):
            raise EMInputError(f"{ssl_model}: trained with {trainer or 'no finished fold'}, not -tr "
                               f"MaskedPretrainTrainer. Fix: pass the self-supervised model folder, or drop "
                               f"--ssl-model.")
    predictor = load_predictor(model_folder, folds, device) if model_folder is not None else None
    embedder = load_predictor(ssl_model, (ssl_fold,), device) if ssl_model is not None else predictor

    cases = sorted(pool)
    embeddings, stats = case_features({case: pool[case] for case in cases}, embedder=embedder, predictor=predictor)
    labelled_embeddings = None
    if "k-center" in strategies and labelled:
        labelled_embeddings, _ = case_features({case: entry["images"] for case, entry in sorted(labelled.items())},
                                               embedder=embedder)
    orders = rankings(embeddings, stats, labelled_embeddings=labelled_embeddings, strategies=strategies, seed=seed)
    examine = selection.examine_scores(embeddings) if "examine" in strategies else None
    rows = []
    for index, case in enumerate(cases):
        row = {"case": case, **stats[index]}
        if examine is not None:
            row["examine_score"] = float(examine[index])
        for strategy, order in orders.items():
            row[f"rank_{strategy}"] = order.index(index) + 1
        rows.append(row)
    result = write_ranking(out, rows, {"dataset": name, "embeddings": "ssl" if ssl_model else "nnunet",
                                       "ssl_model": os.path.abspath(ssl_model) if ssl_model else None,
                                       "model": os.path.abspath(model_folder) if model_folder else None,
                                       "folds": list(folds),
                                       "seed": seed, "strategies": list(strategies),
                                       "embedding_features": int(embeddings.shape[1])})
    storage.atomic_write(os.path.splitext(out)[0] + "_embeddings.npz", lambda temp: np.savez_compressed(
        temp, cases=np.asarray(cases), embeddings=embeddings), suffix=".npz")
    return result
