"""Training data: loading and validation of questions, the Phase 1 / Phase 2 split, and prompts.

``load_rows`` / ``load_from_config`` -> :class:`LoadedData` of :class:`Question`;
``split_phases`` -> disjoint (phase1, phase2); ``prompts`` builds x, the revision and teacher
contexts and the SRT examples on token ids. Importing this package does not import `datasets`
or `transformers`; the loaders import `datasets` when a file or Hub source needs it.
"""

from sdzero_mcore.data.loading import DATA_FORMATS, LoadedData, load_from_config, load_rows
from sdzero_mcore.data.questions import (
    FIELD_PRESETS,
    DataError,
    FieldMapping,
    FieldPreset,
    Question,
    normalise_tests,
    question_text_id,
)
from sdzero_mcore.data.split import dedupe_by_id, split_phases

__all__ = [
    "DATA_FORMATS",
    "DataError",
    "FIELD_PRESETS",
    "FieldMapping",
    "FieldPreset",
    "LoadedData",
    "Question",
    "dedupe_by_id",
    "load_from_config",
    "load_rows",
    "normalise_tests",
    "question_text_id",
    "split_phases",
]
