"""Datasets: the Parquet schema, row validation and quarantine, the training stream, synthetic data and imports.

Start with `schema` (the columns), `validate` (reason codes), `stream.PromptStream` (what the driver reads).
"""

from vzero.data.quarantine import QuarantineWriter
from vzero.data.schema import REQUIRED_COLUMNS, SCHEMA, TRAIN_COLUMNS, DataFileError, DatasetWriter, open_dataset
from vzero.data.stream import NotEnoughPromptsError, PromptStream
from vzero.data.validate import check_duplicate, validate_row

__all__ = [
    "REQUIRED_COLUMNS",
    "SCHEMA",
    "TRAIN_COLUMNS",
    "DataFileError",
    "DatasetWriter",
    "NotEnoughPromptsError",
    "PromptStream",
    "QuarantineWriter",
    "check_duplicate",
    "open_dataset",
    "validate_row",
]
