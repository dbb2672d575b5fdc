"""Evaluation: greedy answers of a model on a labelled Parquet file, scored by exact match after normalisation.

`evaluate.py` holds the whole contract (and is the ONLY module that reads the `answer` column); `commands.py` mounts
`vzero eval` on the project CLI. Import the submodules directly; this package imports nothing heavy.
"""
