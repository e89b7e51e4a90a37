"""Reviewed labels: the ground truth retraining learns from (docs/labels.md).

Pure database functions (no click, no HTTP): the CLI, the review service and the trainers
call them. ``review`` writes one label per decision, ``io`` imports and exports files,
``summary`` counts them and returns the sellers' weak labels apart, ``store`` holds the row
format, the split and supersession.
"""

from worker.labels.io import ImportReport, LabelFileError, export_labels, import_labels
from worker.labels.review import (
    add_box,
    confirm_tag,
    correct_box,
    delete_box,
    known_categories,
    label_history,
    record_flag_verdict,
    reject_tag,
    set_attribute,
    set_category,
)
from worker.labels.store import (
    HELDOUT,
    TRAIN,
    InvalidLabel,
    LabelError,
    LabelView,
    UnknownCategory,
    UnknownTarget,
    split_for,
)
from worker.labels.summary import LabelStats, WeakLabel, label_stats, weak_category_labels

__all__ = [
    "HELDOUT", "TRAIN", "ImportReport", "InvalidLabel", "LabelError", "LabelFileError", "LabelStats",
    "LabelView", "UnknownCategory", "UnknownTarget", "WeakLabel", "add_box", "confirm_tag",
    "correct_box", "delete_box", "export_labels", "import_labels", "known_categories",
    "label_history", "label_stats", "record_flag_verdict", "reject_tag", "set_attribute",
    "set_category", "split_for", "weak_category_labels",
]
