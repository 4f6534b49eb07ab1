"""The human review loop: ``nnunetv2_em review export`` and ``nnunetv2_em review import``.

An export folder is one batch of cases for a reviewer; it can be copied to another machine (every path in it is
relative):

    <out>/export.json            what was exported: dataset, run, round, data identifier, label table, and per case
                                 the checksums of the proposal and of the annotation it was made from
    <out>/review.csv             one row per case: rank, case, score, why it was flagged, then status / reviewer /
                                 minutes for the reviewer to fill in; the import adds the edit effort
    <out>/labels_itksnap.txt     the label table and colours for ITK-SNAP (Segmentation > Import Label Descriptions)
    <out>/labels_slicer.ctbl     the same for 3D Slicer (a colour table); both also in every case folder
    <out>/<case>/image_0000<ending> ...   the image channels (copies)
    <out>/<case>/proposal<ending>         the round's label, the one to correct (ignore = the E-step was unsure)
    <out>/<case>/original<ending>         the annotation the round started from
    <out>/<case>/changes<ending>          1 where the proposal changed the annotation, 2 where it set ignore
    <out>/<case>/uncertainty.nii.gz       1 - posterior of the proposed label (float; NIfTI-like datasets)
    <out>/<case>/<case>.itksnap           ITK-SNAP workspace: image, proposal, original, uncertainty
    <out>/<case>/load_in_slicer.py        3D Slicer: paste ``exec(open("<path>").read())`` into its Python console
    <out>/<case>/README.txt               what to do
    the reviewer writes <out>/<case>/reviewed<ending> (the corrected label) or sets the status ``accepted``
    (the proposal is right as it is)

The import checks every returned label before it writes anything, keeps the reviewed labels in the dataset's
``ReviewedLabels`` store (never changed by later E-steps) and activates a label version with them, so the next
round trains on them without preprocessing images again.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import numpy as np

from nnunetv2_em import checks, label_conventions, multi_rater, storage
from nnunetv2_em.errors import EMInputError
from nnunetv2_em.layout import RUN_PREFIX, RunLayout, TrainerLayout, trainer_output_name

EXPORT_FORMAT = 1
STATUSES = ("pending", "accepted", "corrected", "skipped")
REVIEW_COLUMNS = ("rank", "case", "selection", "review_score", "why", "status", "reviewer", "minutes")
EFFORT_COLUMNS = ("voxels_edited", "added_path_length")
COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))
IGNORE_COLOUR = (255, 255, 0)
SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")


# ------------------------------------------------------------------------------------------------------ shared
def _dataset_folders(dataset: str) -> tuple[str, str, str]:
    from nnunetv2_em.planning import dataset_name

    paths = checks.require_env("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    name = dataset_name(dataset)
    return (os.path.join(paths["nnUNet_raw"], name), os.path.join(paths["nnUNet_preprocessed"], name),
            paths["nnUNet_results"])


def run_layout(results_folder: str, dataset_name: str, run: str) -> RunLayout:
    """The results layout of a run from its name (``em_run__<trainer>__<plans>__<configuration>``)."""
    parts = run[len(RUN_PREFIX):].split("__") if run.startswith(RUN_PREFIX) else []
    if len(parts) != 3:
        raise EMInputError(f"{run}: not the name of an `nnunetv2_em run` (em_run__<trainer>__<plans>__<config>). "
                           f"Fix: name a run listed by `nnunetv2_em status`.")
    return RunLayout(results_folder, dataset_name, *parts)


def _reader_writer(dataset_json: dict, example_image: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, example_image)()


def _label_table(dataset_json: dict) -> dict[int, str]:
    table = {}
    for name, value in dataset_json["labels"].items():
        if isinstance(value, int):
            table[value] = name
    return dict(sorted(table.items()))


def _colour(value: int, ignore_label: int | None) -> tuple[int, int, int]:
    return IGNORE_COLOUR if value == ignore_label else COLOURS[value % len(COLOURS)] if value else (0, 0, 0)


# ------------------------------------------------------------------------------------------------------ export
def _choose_run(versions: storage.DatasetLabelVersions, run: str | None, raw: str) -> str:
    runs = {name: rounds for name, rounds in versions.runs().items() if name != storage.REVIEW_RUN and rounds}
    if run is not None:
        if run not in runs:
            raise EMInputError(f"{versions.root}: no rounds of run {run} (runs: {sorted(runs) or 'none'}). Fix: name "
                               f"one with --run, or finish a round of `nnunetv2_em run` first.")
        return run
    active = versions.active()
    candidate = active["run"]
    if candidate == storage.REVIEW_RUN:
        candidate = storage.review_version_base(raw, active["round"]).get("run")
    if candidate in runs:
        return candidate
    if len(runs) == 1:
        return next(iter(runs))
    raise EMInputError(f"{versions.root}: {'several runs' if runs else 'no run'} kept ({sorted(runs)}). Fix: "
                       f"{'name one with --run' if runs else 'run `nnunetv2_em run` first'}.")


TOP, AUDIT, LISTED = "top", "audit", "listed"  # how a case was chosen for review; only AUDIT is a random sample


def select_cases(ranked: list[dict], eligible: set[str], *, top: int | None, budget: float | None,
                 cases: list[str] | None, already_reviewed: set[str], audit: int = 0,
                 seed=0) -> dict[str, str]:
    """The cases to export and how each was chosen, best first: the given ``cases`` (``listed``), else the top of
    the ranking (``top`` cases, or the ``budget`` share of the eligible cases, rounded up), leaving out cases
    reviewed before; then ``audit`` cases drawn at random (``seed``) from the eligible rest.

    Only the audit cases are a random sample of the dataset: the precision gate estimates from them alone, since
    top-ranked cases are where the E-step is least sure (on the benchmark they closed the gate, see docs/review.md).
    """
    if cases:
        unknown = [case for case in cases if case not in eligible]
        if unknown:
            raise EMInputError(f"--cases {', '.join(unknown[:5])}: not labelled cases of this round. Fix: pick cases "
                               f"from the round's cases.csv.")
        chosen = {case: LISTED for case in dict.fromkeys(cases)}
    elif top is None and budget is None and audit:
        chosen = {}
    else:
        if (top is None) == (budget is None):
            raise EMInputError("choose the cases: exactly one of --top N, --budget 5% or --cases ..., and/or "
                               "--audit N. Fix: e.g. --top 5 --audit 2.")
        count = top if top is not None else math.ceil(budget * len(eligible))
        if count < 1:
            raise EMInputError(f"{'--top' if top is not None else '--budget'}: selects no case. Fix: at least one.")
        order = [row["case"] for row in ranked if row["case"] in eligible and row["case"] not in already_reviewed]
        chosen = {case: TOP for case in order[:count]}
    if audit < 0:
        raise EMInputError(f"--audit {audit}: must be >= 0. Fix: e.g. --audit 2.")
    rest = sorted(eligible - set(chosen) - already_reviewed)
    if audit > len(rest):
        raise EMInputError(f"--audit {audit}: only {len(rest)} case(s) left to draw from. Fix: at most {len(rest)}.")
    for case in np.random.default_rng(seed).choice(rest, size=audit, replace=False).tolist() if audit else []:
        chosen[case] = AUDIT
    return chosen


RANK_KEYS = ("review_score", "rater_disagreement")


def ranked_by(rows: list[dict], key: str, *, source: str) -> list[dict]:
    """The round's case rows ordered by ``key`` (highest first, ties by case id): ``review_score`` (the E-step's
    expected errors) or ``rater_disagreement`` (the share of the voxels several raters annotated on which they
    differ; multi-rater datasets)."""
    if key not in RANK_KEYS:
        raise EMInputError(f"--rank-by {key}: unknown. Fix: one of {', '.join(RANK_KEYS)}.")
    if key == "rater_disagreement" and not any(key in row for row in rows):
        raise EMInputError(f"{source}: the round has no rater disagreement (the dataset has no em_raters.json, or "
                           f"the round was made without it). Fix: --rank-by review_score.")
    return sorted(rows, key=lambda row: (-float(row.get(key) or 0.0), row["case"]))


def _why(row: dict) -> str:
    parts = [f"{int(row.get('voxels_changed', 0))} voxels changed", f"{int(row.get('voxels_ignored', 0))} ignored"]
    added, removed = int(row.get("components_added", 0)), int(row.get("components_removed", 0))
    if added or removed:
        parts.append(f"components +{added}/-{removed}")
    return "; ".join(parts)


def itksnap_workspace(folder: str, layers: list[tuple[str, str, str]]) -> str:
    """XML of an ITK-SNAP workspace over files in ``folder``: ``layers`` = ``[(file name, role, nickname)]`` with
    roles ``MainRole`` (first), ``SegmentationRole``, ``OverlayRole``. ITK-SNAP finds moved files through the
    path of each layer relative to ``SaveLocation``, so the folder can be copied anywhere."""
    lines = ['<?xml version="1.0" encoding="UTF-8" ?>',
             "<!--ITK-SNAP (itksnap.org) Project File",
             "",
             "This file can be moved/copied along with the images that it references",
             "as long as the relative location of the images to the project file is ",
             "the same. Do not modify the SaveLocation entry, or this will not work.",
             "-->",
             "<!DOCTYPE registry [",
             "<!ELEMENT registry (entry*,folder*)>",
             "<!ELEMENT folder (entry*,folder*)>",
             "<!ELEMENT entry EMPTY>",
             "<!ATTLIST folder key CDATA #REQUIRED>",
             "<!ATTLIST entry key CDATA #REQUIRED>",
             "<!ATTLIST entry value CDATA #REQUIRED>",
             "]>",
             "<registry>",
             f'  <entry key="SaveLocation" value="{html.escape(folder)}" />',
             '  <entry key="Version" value="20190612" />',
             '  <folder key="Layers" >']
    for index, (name, role, nickname) in enumerate(layers):
        lines += [f'    <folder key="Layer[{index:03d}]" >',
                  f'      <entry key="AbsolutePath" value="{html.escape(os.path.join(folder, name))}" />',
                  f'      <entry key="Role" value="{role}" />',
                  '      <entry key="Tags" value="" />',
                  '      <folder key="LayerMetaData" >',
                  f'        <entry key="CustomNickName" value="{html.escape(nickname)}" />',
                  "      </folder>",
                  "    </folder>"]
    lines += ["  </folder>", "</registry>", ""]
    return "\n".join(lines)


SLICER_LOADER = '''"""Load this case into 3D Slicer: paste into its Python console
    exec(open(r"<path to this file>").read())
or start ``Slicer --python-script load_in_slicer.py``. Edit the "proposal" segmentation, then export it as a
labelmap and save it next to this file as REVIEWED_NAME (Segmentations module > Export to files, or right-click >
Export visible segments to binary labelmap, then File > Save)."""
import os

import slicer

here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
colours = slicer.util.loadColorTable(os.path.join(here, "labels_slicer.ctbl"))
IMAGES
slicer.util.loadVolume(os.path.join(here, "UNCERTAINTY"), {"name": "uncertainty", "show": False}) \\
    if os.path.isfile(os.path.join(here, "UNCERTAINTY")) else None
slicer.util.loadLabelVolume(os.path.join(here, "ORIGINAL"), {"name": "original", "colorNodeID": colours.GetID()})
slicer.util.loadSegmentation(os.path.join(here, "PROPOSAL"), {"name": "proposal", "colorNodeID": colours.GetID()})
'''


def slicer_loader(images: list[str], proposal: str, original: str, uncertainty: str, reviewed: str, *,
                  extra_labels: dict[str, str] | None = None) -> str:
    """A loader script for 3D Slicer over files next to it (paths relative to the script's folder);
    ``extra_labels`` ``{name: file}`` are loaded as label volumes, hidden (each rater's label, their disagreement)."""
    image_lines = "\n".join(f'slicer.util.loadVolume(os.path.join(here, "{name}"), {{"name": "image_{index:04d}"}})'
                            for index, name in enumerate(images))
    script = (SLICER_LOADER.replace("IMAGES", image_lines).replace("UNCERTAINTY", uncertainty)
              .replace("ORIGINAL", original).replace("PROPOSAL", proposal).replace("REVIEWED_NAME", reviewed))
    for name, file in (extra_labels or {}).items():
        script += (f'slicer.util.loadLabelVolume(os.path.join(here, "{file}"), {{"name": "{name}", "show": False, '
                   f'"colorNodeID": colours.GetID()}})\n')
    return script


def itksnap_label_descriptions(table: dict[int, str], ignore_label: int | None) -> str:
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL", "################################################"]
    for value, name in table.items():
        r, g, b = _colour(value, ignore_label)
        alpha, visible = (0, 0) if value == 0 else (1, 1)
        lines.append(f'{value:5d} {r:5d} {g:4d} {b:4d} {alpha:8d} {visible:2d} {visible:2d}    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_colour_table(table: dict[int, str], ignore_label: int | None) -> str:
    lines = ["# Color table file labels_slicer.ctbl", f"# {len(table)} values"]
    for value, name in table.items():
        r, g, b = _colour(value, ignore_label)
        lines.append(f"{value} {name.replace(' ', '_')} {r} {g} {b} {0 if value == 0 else 255}")
    return "\n".join(lines) + "\n"


def _write_float_like(reference_label: str, values: np.ndarray, path: str) -> bool:
    """Write a float map with the geometry of ``reference_label`` (SimpleITK formats only); False if not."""
    import SimpleITK as sitk

    reference = sitk.ReadImage(reference_label)
    if tuple(reversed(reference.GetSize())) != values.shape:
        return False
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(reference)
    sitk.WriteImage(image, path, useCompression=True)
    return True


@dataclass(frozen=True)
class RoundSource:
    """Where a round to review keeps what the export needs: a round of ``nnunetv2_em run`` or of an EMTrainer fold."""

    kind: str  # "run" or "trainer"
    name: str  # the run (em_run__...) or the trainer folder (<Trainer>__<Plans>__<configuration>)
    fold: int | None
    round: int
    round_folder: str  # results: cases.json, uncertainty/, review.json
    labels_folder: str  # the round's complete labelsTr
    dataset_json: str
    data_identifier: str
    plans: str
    configuration: str
    eligible: tuple  # labelled cases the round judged
    originals: dict  # {case: label file of the annotation the round started from}
    properties_folder: str  # <case>.pkl: the preprocessing properties of each case

    def proposal(self, case: str, ending: str) -> str:
        return os.path.join(self.labels_folder, case + ending)

    def uncertainty_file(self, case: str) -> str:
        return os.path.join(self.round_folder, "uncertainty", f"{case}.npz")


def run_round_source(raw: str, preprocessed: str, results: str, *, run: str | None,
                     round_index: int | None) -> RoundSource:
    versions = storage.dataset_versions(raw, preprocessed)
    if not versions.has_originals():
        raise EMInputError(f"{versions.root}: no label versions. Fix: run `nnunetv2_em run` for at least a round, "
                           f"or export an EMTrainer fold's round with --trainer.")
    run = _choose_run(versions, run, raw)
    rounds = versions.runs()[run]
    round_index = max(rounds) if round_index is None else round_index
    if round_index not in rounds:
        raise EMInputError(f"--round {round_index}: run {run} keeps rounds {rounds}. Fix: pick one of them.")
    manifest = versions.read_manifest(round_index, run)
    versions = storage.DatasetLabelVersions(raw, preprocessed, manifest["data_identifier"], versions.file_ending,
                                            run)
    layout = run_layout(results, os.path.basename(raw), run)
    eligible = sorted(case for case, entry in manifest["cases"].items()
                      if entry.get("provenance") == storage.REFINED)
    return RoundSource("run", run, None, round_index, layout.round_folder(round_index),
                       versions.labels_folder(round_index), os.path.join(versions.round_folder(round_index),
                                                                         "dataset.json"),
                       manifest["data_identifier"], layout.plans, layout.configuration, tuple(eligible),
                       {case: versions.original_label_path(case) for case in eligible},
                       versions.segmentation_folder(round_index))


def trainer_round_source(raw: str, preprocessed: str, results: str, *, trainer: str, fold: int, configuration: str,
                         plans: str, round_index: int | None) -> RoundSource:
    """A round of an EMTrainer fold (``fold_<f>/em/round_<r>/``): its judged (validation) cases, the annotation
    from nnU-Net's ``gt_segmentations``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = trainer_output_name(trainer, plans, configuration)
    layout = TrainerLayout.of(results, os.path.basename(raw), trainer, plans, configuration, fold)
    em_folder = layout.em_folder
    rounds = layout.finished_rounds()
    if not rounds:
        raise EMInputError(f"{em_folder}: no finished EM round. Fix: train the fold with an EMTrainer first "
                           f"(nnUNetv2_train ... -tr {trainer}).")
    round_index = max(rounds) if round_index is None else round_index
    if round_index not in rounds:
        raise EMInputError(f"--round {round_index}: {em_folder} has rounds {rounds}. Fix: pick one of them.")
    round_folder = layout.round_folder(round_index)
    with open(os.path.join(round_folder, "cases.json")) as handle:
        eligible = sorted(row["case"] for row in json.load(handle))
    with open(os.path.join(round_folder, "dataset.json")) as handle:
        ending = json.load(handle)["file_ending"]
    identifier = PlansManager(os.path.join(preprocessed, plans + ".json")).get_configuration(
        configuration).data_identifier
    return RoundSource("trainer", name, fold, round_index, round_folder, os.path.join(round_folder, "labelsTr"),
                       os.path.join(round_folder, "dataset.json"), identifier, plans, configuration, tuple(eligible),
                       {case: os.path.join(preprocessed, "gt_segmentations", case + ending) for case in eligible},
                       os.path.join(preprocessed, identifier))


def export_review(dataset: str, out: str, *, run: str | None = None, round_index: int | None = None,
                  top: int | None = None, budget: float | None = None, cases: list[str] | None = None,
                  audit: int = 0, seed: int = 0, trainer: str | None = None, fold: int = 0,
                  configuration: str | None = None, plans: str = "nnUNetPlans",
                  rank_by: str = "review_score") -> dict:
    """Write a review folder for the top cases of a round (see the module docstring): of a run of
    ``nnunetv2_em run`` (default), or of an EMTrainer fold (``trainer``, ``fold``, ``configuration``), the top
    ranked by ``rank_by`` (``RANK_KEYS``). The folder is built beside ``out`` and renamed into place when complete;
    ``out`` must not exist yet."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets


    raw, preprocessed, results = _dataset_folders(dataset)
    dataset_name = os.path.basename(raw)
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise EMInputError(f"{out}: exists already. Fix: export into a new folder.")
    storage.recover_activation(raw, preprocessed)
    if trainer is not None:
        if configuration is None:
            raise EMInputError("--trainer needs -c CONFIGURATION (and --fold). Fix: e.g. --trainer EMTrainer -c 2d "
                               "--fold 0.")
        source = trainer_round_source(raw, preprocessed, results, trainer=trainer, fold=fold,
                                      configuration=configuration, plans=plans, round_index=round_index)
    else:
        source = run_round_source(raw, preprocessed, results, run=run, round_index=round_index)
    run, round_index, identifier = source.name, source.round, source.data_identifier
    ranked_path = os.path.join(source.round_folder, "cases.json")
    if not os.path.isfile(ranked_path):
        raise EMInputError(f"{ranked_path}: missing (the run's results folder). Fix: set nnUNet_results to the "
                           f"folder the run wrote to.")
    with open(ranked_path) as handle:
        ranked = ranked_by(json.load(handle), rank_by, source=ranked_path)
    eligible = set(source.eligible)
    raw_dataset_json = checks.load_dataset_json(os.path.join(raw, "dataset.json"))
    ending = raw_dataset_json["file_ending"]
    reviewed_store = storage.ReviewedLabels(raw, preprocessed, ending)
    selection = select_cases(ranked, eligible, top=top, budget=budget, cases=cases,
                             already_reviewed=set(reviewed_store.records()), audit=audit, seed=[seed, round_index])
    chosen = list(selection)
    if not chosen:
        raise EMInputError(f"{ranked_path}: no case left to review (all reviewed already). Fix: name cases with "
                           f"--cases to review them again.")

    with open(source.dataset_json) as handle:
        dataset_json = label_conventions.with_ignore_label(json.load(handle))
    ignore_label = int(dataset_json["labels"]["ignore"])
    images = get_filenames_of_train_images_and_targets(raw, dataset_json)
    reader_writer = _reader_writer(dataset_json, images[chosen[0]]["images"][0])
    raters = multi_rater.load_raters(raw, raw_dataset_json, images)
    plans_manager = PlansManager(os.path.join(preprocessed, source.plans + ".json"))
    configuration_manager = plans_manager.get_configuration(source.configuration)
    rows_by_case = {row["case"]: row for row in ranked}
    table = _label_table(dataset_json)

    out = os.path.abspath(out)
    staging = os.path.join(os.path.dirname(out), f"{storage.TEMP_DIR_PREFIX}{uuid.uuid4().hex}")
    os.makedirs(staging)
    try:
        exported = {}
        for rank, case in enumerate(chosen, start=1):
            exported[case] = _export_case(staging, case, rank, selection[case], rows_by_case[case], out=out,
                                          source=source, images=images[case]["images"], ending=ending,
                                          reader_writer=reader_writer, ignore_label=ignore_label, table=table,
                                          plans_manager=plans_manager,
                                          configuration_manager=configuration_manager, raters=raters)
        storage.write_text(os.path.join(staging, "labels_itksnap.txt"),
                           itksnap_label_descriptions(table, ignore_label))
        storage.write_text(os.path.join(staging, "labels_slicer.ctbl"), slicer_colour_table(table, ignore_label))
        storage.write_text(os.path.join(staging, "review.csv"), review_sheet(
            [{"rank": entry["rank"], "case": case, "selection": entry["selection"],
              "review_score": entry["review_score"], "why": entry["why"], "status": "pending", "reviewer": "",
              "minutes": ""} for case, entry in exported.items()]))
        record = {"format": EXPORT_FORMAT, "dataset": dataset_name, "source": source.kind, "run": run,
                  "fold": source.fold, "round": round_index, "round_folder": source.round_folder,
                  "data_identifier": identifier, "plans": source.plans, "configuration": source.configuration,
                  "file_ending": ending, "labels": {str(k): v for k, v in table.items()}, "ignore_label": ignore_label,
                  "exported": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": exported}
        storage.write_json(os.path.join(staging, "export.json"), record)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _export_case(staging: str, case: str, rank: int, selection: str, row: dict, *, out: str, source: RoundSource,
                 images: list[str], ending: str, reader_writer, ignore_label: int, table: dict, plans_manager,
                 configuration_manager, raters=None) -> dict:
    """One case's review folder in ``staging`` (images, proposal, original, changes, uncertainty, each rater's label
    and where they disagree in a multi-rater dataset, the ITK-SNAP workspace and 3D Slicer loader, the label
    tables); returns its entry of ``export.json``."""
    from nnunetv2_em import nnunet_data

    folder = os.path.join(staging, case)
    os.makedirs(folder)
    image_names = []
    for index, image in enumerate(images):
        name = f"image_{index:04d}{ending}"
        shutil.copyfile(image, os.path.join(folder, name))
        image_names.append(name)
    proposal, original = f"proposal{ending}", f"original{ending}"
    shutil.copyfile(source.proposal(case, ending), os.path.join(folder, proposal))
    shutil.copyfile(source.originals[case], os.path.join(folder, original))
    proposed, properties = reader_writer.read_seg(os.path.join(folder, proposal))
    annotated, _ = reader_writer.read_seg(os.path.join(folder, original))
    changes = np.where(proposed[0] == ignore_label, 2, np.where(proposed[0] != annotated[0], 1, 0))
    reader_writer.write_seg(changes.astype(np.uint8), os.path.join(folder, f"changes{ending}"), properties)
    uncertainty = ""
    stored = source.uncertainty_file(case)
    if os.path.isfile(stored) and ending in SITK_ENDINGS:
        from batchgenerators.utilities.file_and_folder_operations import load_pickle

        values = np.load(stored)["uncertainty"].astype(np.float32) / 255.0
        case_properties = load_pickle(os.path.join(source.properties_folder, f"{case}.pkl"))
        raw_values = nnunet_data.preprocessed_map_to_raw_geometry(values, case_properties, plans_manager,
                                                                  configuration_manager)
        if _write_float_like(os.path.join(folder, proposal), raw_values,
                             os.path.join(folder, "uncertainty.nii.gz")):
            uncertainty = "uncertainty.nii.gz"
    rater_layers = _rater_layers(folder, case, raters, reader_writer, ending=ending, ignore_label=ignore_label,
                                 properties=properties)
    layers = [(image_names[0], "MainRole", "image"), (proposal, "SegmentationRole", "proposal"),
              (original, "SegmentationRole", "original")]
    layers += [(name, "OverlayRole", f"image_{i:04d}") for i, name in enumerate(image_names[1:], start=1)]
    if uncertainty:
        layers.append((uncertainty, "OverlayRole", "uncertainty"))
    layers += [(name, "SegmentationRole", nickname) for nickname, name in rater_layers.items()]
    storage.write_text(os.path.join(folder, f"{case}.itksnap"), itksnap_workspace(os.path.join(out, case), layers))
    storage.write_text(os.path.join(folder, "load_in_slicer.py"), slicer_loader(
        image_names, proposal, original, uncertainty, f"reviewed{ending}", extra_labels=rater_layers))
    storage.write_text(os.path.join(folder, "README.txt"), _case_readme(case, ending, row))
    # the label tables in each case folder too: one case folder is enough for a reviewer
    storage.write_text(os.path.join(folder, "labels_itksnap.txt"), itksnap_label_descriptions(table, ignore_label))
    storage.write_text(os.path.join(folder, "labels_slicer.ctbl"), slicer_colour_table(table, ignore_label))
    return {"rank": rank, "selection": selection, "review_score": row.get("review_score"), "why": _why(row),
            "images": image_names, "uncertainty": uncertainty, "rater_layers": rater_layers,
            "proposal_sha256": storage.sha256(os.path.join(folder, proposal)),
            "original_sha256": storage.sha256(os.path.join(folder, original)), "original_file": source.originals[case]}


def _rater_layers(folder: str, case: str, raters, reader_writer, *, ending: str, ignore_label: int,
                  properties: dict) -> dict[str, str]:
    """Each rater's label of ``case`` (``rater_<name><ending>``, copied) and, where two or more raters annotated it,
    ``rater_disagreement<ending>`` (1 where the raters who annotated a voxel do not all agree, else 0); ``{layer
    nickname: file name}``, empty for a dataset without raters or a case none of them annotated."""
    from nnunetv2_em.estep.raters import disagreement_map

    if raters is None or not raters.raters_of(case):
        return {}
    layers = {}
    for rater in raters.raters_of(case):
        name = f"rater_{rater}{ending}"
        shutil.copyfile(raters.files[rater][case], os.path.join(folder, name))
        layers[f"rater {rater}"] = name
    if len(raters.raters_of(case)) >= 2:
        ratings = multi_rater.read_ratings(raters, case, reader_writer, ignore_label=ignore_label)
        # the classes are the label values below the ignore label
        disagree = disagreement_map(ratings, num_classes=ignore_label)
        name = f"rater_disagreement{ending}"
        reader_writer.write_seg(disagree.astype(np.uint8), os.path.join(folder, name), properties)
        layers["rater disagreement"] = name
    return layers


def _case_readme(case: str, ending: str, row: dict) -> str:
    score = row.get("review_score", float("nan"))
    return (f"Case {case}: flagged for review ({_why(row)}; review score {score:.4g}).\n\n"
            f"Open {case}.itksnap in ITK-SNAP (File > Open Workspace), or run load_in_slicer.py in 3D Slicer.\n"
            f"Correct the layer 'proposal' (yellow = the model was unsure: decide these voxels) and save it here as\n"
            f"reviewed{ending}, on the image's grid with the label values of labels_itksnap.txt. If the proposal\n"
            f"is right as it is, write 'accepted' in the status column of ../review.csv instead. Note your name and\n"
            f"the minutes spent in review.csv. The label table: labels_itksnap.txt (ITK-SNAP: Segmentation > Import\n"
            f"Label Descriptions), labels_slicer.ctbl (3D Slicer, loaded by load_in_slicer.py).\n")


def review_sheet(rows: list[dict], extra_columns=()) -> str:
    buffer = io.StringIO()
    columns = [*REVIEW_COLUMNS, *[c for c in extra_columns if c not in REVIEW_COLUMNS]]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ import
def _read_sheet(path: str) -> dict[str, dict]:
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and "case" not in rows[0]:
        raise EMInputError(f"{path}: no 'case' column. Fix: keep the header row of the exported sheet.")
    sheet = {}
    for line, row in enumerate(rows, start=2):
        status = (row.get("status") or "pending").strip().lower()
        if status not in STATUSES:
            raise EMInputError(f"{path}, line {line}: status {row.get('status')!r}. Fix: one of {', '.join(STATUSES)}.")
        minutes = (row.get("minutes") or "").strip()
        try:
            minutes_value = float(minutes) if minutes else None
        except ValueError:
            raise EMInputError(f"{path}, line {line}: minutes {minutes!r} is not a number. Fix: e.g. 4.5, or leave "
                               f"it empty.") from None
        sheet[row["case"]] = {**row, "status": status, "minutes": minutes_value}
    return sheet


def _check_returned_label(path: str, image_path: str, reader_writer, allowed: set[int]) -> np.ndarray:
    """The returned label as ``(*spatial)`` integers, or one clear error naming the file and the fix."""
    checks.check_file_decodes(path)
    try:
        seg, seg_properties = reader_writer.read_seg(path)
    except Exception as error:  # noqa: BLE001 (any reader failure is bad input here)
        raise EMInputError(f"{path}: not a readable label image ({error}). Fix: save the label again as an image "
                           f"file of the dataset's format.") from None
    values = np.unique(seg)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise EMInputError(f"{path}: non-integer label values {fractional[:3].tolist()}. Fix: save the label as "
                           f"integers (a labelmap, not a probability or an interpolated image).")
    unexpected = sorted(set(values.astype(int).tolist()) - allowed)
    if unexpected:
        raise EMInputError(f"{path}: label values {unexpected} are not in the label table (allowed "
                           f"{sorted(allowed)}, see labels_itksnap.txt). Fix: relabel those voxels.")
    image, image_properties = reader_writer.read_images([image_path])
    checks.check_same_geometry(path, seg, seg_properties, image_path, image, image_properties)
    return np.asarray(seg[0]).astype(np.int32)


def import_review(folder: str, *, reviewer: str | None = None) -> dict:
    """Check every returned label of an export folder, then keep them as reviewed labels and activate a version
    with them (see the module docstring). Returns the import summary (also written to ``imported.json``)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    folder = os.path.abspath(folder)
    export, sheet = _read_export(folder)
    raw, preprocessed, results = _dataset_folders(export["dataset"])
    dataset_json = label_conventions.with_ignore_label(checks.load_dataset_json(os.path.join(raw, "dataset.json")))
    images = get_filenames_of_train_images_and_targets(raw, dataset_json)
    first = next(iter(export["cases"]))
    reader_writer = _reader_writer(dataset_json, os.path.join(folder, first, export["cases"][first]["images"][0]))
    allowed = {int(value) for value in export["labels"]} | {int(export["ignore_label"])}
    versions = storage.DatasetLabelVersions(raw, preprocessed, export["data_identifier"], export["file_ending"],
                                            export["run"] if export.get("source", "run") == "run" else None)
    returned, skipped = _returned_labels(folder, export, sheet, versions=versions, images=images, raw=raw,
                                         reader_writer=reader_writer, allowed=allowed)
    if not returned:
        return {"imported": {}, "skipped": skipped, "version": None}
    records = _review_records(folder, export, sheet, returned, allowed=allowed, reviewer=reviewer)
    kept, version = _keep_and_activate(export, returned, records, versions=versions, images=images,
                                       dataset_json=dataset_json, raw=raw, preprocessed=preprocessed)
    return _write_import_reports(folder, export, sheet, kept, skipped=skipped, version=version, results=results)


def _read_export(folder: str) -> tuple[dict, dict]:
    """An export's ``export.json`` and its review sheet, refusing labels returned for cases it does not hold."""
    export_path = os.path.join(folder, "export.json")
    if not os.path.isfile(export_path):
        raise EMInputError(f"{folder}: no export.json, not a folder written by `nnunetv2_em review export`. Fix: "
                           f"pass the exported folder.")
    with open(export_path) as handle:
        export = json.load(handle)
    ending = export["file_ending"]
    sheet = _read_sheet(os.path.join(folder, "review.csv"))
    unknown = sorted(case for case in sheet if case not in export["cases"])
    strays = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))
                    and name not in export["cases"] and os.path.isfile(os.path.join(folder, name, f"reviewed{ending}")))
    if unknown or strays:
        case = (unknown or strays)[0]
        raise EMInputError(f"{os.path.join(folder, case)}: case {case} is not in this export ({export_path}). Fix: "
                           f"return labels only for the exported cases (export the case first).")

    return export, sheet


def _returned_labels(folder: str, export: dict, sheet: dict, *, versions, images: dict, raw: str, reader_writer,
                     allowed: set[int]) -> tuple[dict, list[str]]:
    """``({case: (reviewed file, labels, proposal)}, skipped cases)``: each returned label checked against the
    export (its proposal untouched, its annotation unchanged since, its values and geometry)."""
    ending = export["file_ending"]
    returned, skipped = {}, []
    for case, entry in export["cases"].items():
        case_folder = os.path.join(folder, case)
        reviewed_file = os.path.join(case_folder, f"reviewed{ending}")
        proposal_file = os.path.join(case_folder, f"proposal{ending}")
        status = sheet.get(case, {}).get("status", "pending")
        if not os.path.isfile(reviewed_file):
            if os.path.isfile(proposal_file) and storage.sha256(proposal_file) != entry["proposal_sha256"]:
                raise EMInputError(f"{proposal_file}: edited in place. Fix: save the corrected label as "
                                   f"reviewed{ending} in the same folder (rename this file), then import again.")
            if status != "accepted":
                skipped.append(case)
                continue
            reviewed_file = proposal_file  # accepted as proposed
        if case not in images:
            raise EMInputError(f"{raw}/imagesTr: no image of {case}. Fix: put its images back, then import again.")
        original = entry.get("original_file") or versions.original_label_path(case)
        if not os.path.isfile(original) or storage.sha256(original) != entry["original_sha256"]:
            raise EMInputError(f"{original}: the annotation of {case} differs from the one this export was made "
                               f"from. Fix: export the case again from a current round.")
        labels = _check_returned_label(reviewed_file, os.path.join(case_folder, entry["images"][0]), reader_writer,
                                       allowed)
        proposal, _ = reader_writer.read_seg(proposal_file)
        returned[case] = (reviewed_file, labels, np.asarray(proposal[0]).astype(np.int32))
    return returned, skipped


def _review_records(folder: str, export: dict, sheet: dict, returned: dict, *, allowed: set[int],
                    reviewer: str | None) -> dict:
    """Per returned case: who reviewed it, when, in how many minutes, what it was, and the edit effort."""
    from nnunetv2_em.review_effort import edit_effort

    ending = export["file_ending"]
    classes = [value for value in sorted(allowed) if 0 < value != int(export["ignore_label"])]
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    records = {}
    for case, (reviewed_file, labels, proposal) in returned.items():
        row = sheet.get(case, {})
        effort = edit_effort(proposal, labels, classes=classes, ignore_label=int(export["ignore_label"]))
        records[case] = {"reviewer": (row.get("reviewer") or "").strip() or reviewer or os.environ.get("USER", ""),
                         "imported": now, "minutes": row.get("minutes"),
                         "status": "accepted" if reviewed_file.endswith(f"proposal{ending}") else "corrected",
                         "selection": export["cases"][case].get("selection", LISTED),
                         "proposal": {"source": export.get("source", "run"), "run": export["run"],
                                      "fold": export.get("fold"), "round": export["round"],
                                      "sha256": export["cases"][case]["proposal_sha256"]},
                         "export": folder, "effort": effort}

    return records


def _keep_and_activate(export: dict, returned: dict, records: dict, *, versions, images: dict, dataset_json: dict,
                       raw: str, preprocessed: str) -> tuple[dict, int | None]:
    """Keep the reviewed labels in the store (under the dataset's lock) and, when labelsTr holds a run's labels,
    activate a version with them in; returns the kept records and that version (or None)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ending = export["file_ending"]
    plans_manager = PlansManager(os.path.join(preprocessed, export["plans"] + ".json"))
    configuration_manager = plans_manager.get_configuration(export["configuration"])
    store = storage.ReviewedLabels(raw, preprocessed, ending)
    with storage.dataset_lock(raw, preprocessed):
        storage.recover_activation(raw, preprocessed)
        active = versions.active()
        if active["round"] and active["data_identifier"] not in (None, export["data_identifier"]):
            raise EMInputError(f"{raw}/labelsTr: holds a version of configuration data {active['data_identifier']}; "
                               f"this export is of {export['data_identifier']}. Fix: `nnunetv2_em restore -d "
                               f"{export['dataset']}` to a version of the exported run first.")
        kept = store.keep({case: (returned[case][0], records[case]) for case in returned})
        for case, record in kept.items():
            store.make_segmentation(case, images[case]["images"], plans_manager, configuration_manager,
                                    dataset_json, record=record)
        store.commit(kept)
        version = None
        if active["round"]:  # labelsTr holds a run's labels: switch to them with the reviewed ones in
            versions.run = active["run"]
            version = storage.stage_review_version(versions, store, sorted(kept))
            versions.run = storage.REVIEW_RUN
            storage.activate(versions, version, storage.REVIEW_RUN)
        # else labelsTr holds the originals (restored, or EMTrainer's dataset): they stay; the next round of
        # `nnunetv2_em run` and EMTrainer take the reviewed labels from the store

    return kept, version


def _write_import_reports(folder: str, export: dict, sheet: dict, kept: dict, *, skipped: list[str],
                          version: int | None, results: str) -> dict:
    """``imported.json`` in the export, the round's ``review.json`` (all imports so far) and the review sheet."""
    summary = {"imported": {case: {k: v for k, v in record.items() if k != "export"} for case, record in
                            kept.items()},
               "skipped": skipped,
               "version": None if version is None else {"run": storage.REVIEW_RUN, "round": version},
               "total_effort": {key: sum(record["effort"][key] for record in kept.values())
                                for key in ("voxels_edited", "added_path_length")},
               "total_minutes": sum(record["minutes"] or 0.0 for record in kept.values())}
    storage.write_json(os.path.join(folder, "imported.json"), summary)
    round_file = os.path.join(export.get("round_folder") or run_layout(results, export["dataset"], export["run"])
                              .round_folder(export["round"]), "review.json")
    previous = {"cases": {}}
    if os.path.isfile(round_file):
        with open(round_file) as handle:
            previous = json.load(handle)
    per_round = {**previous["cases"], **summary["imported"]}
    storage.write_json(round_file, {"cases": per_round, "total_effort": {
        key: sum(entry["effort"][key] for entry in per_round.values()) for key in ("voxels_edited",
                                                                                  "added_path_length")},
        "total_minutes": sum(entry["minutes"] or 0.0 for entry in per_round.values())})
    rows = []
    for case, entry in export["cases"].items():
        row = {**{key: sheet.get(case, {}).get(key, "") for key in REVIEW_COLUMNS}, "rank": entry["rank"],
               "case": case, "selection": entry.get("selection", LISTED), "review_score": entry["review_score"],
               "why": entry["why"]}
        if case in kept:
            row.update(status=kept[case]["status"], reviewer=kept[case]["reviewer"],
                       minutes=kept[case]["minutes"] if kept[case]["minutes"] is not None else "",
                       **{key: kept[case]["effort"][key] for key in EFFORT_COLUMNS})
        rows.append(row)
    storage.write_text(os.path.join(folder, "review.csv"), review_sheet(rows, EFFORT_COLUMNS))
    return summary
