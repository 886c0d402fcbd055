"""Read a dataset-backed task's rows with ``datasets.load_dataset``: packaged files, local files or the hub.

A task's ``source`` maps each split to one spec string:

* a local file ending in ``.json``, ``.jsonl`` or ``.parquet`` (optionally ``.gz``), e.g.
  ``"/data/my_gsm8k_test.jsonl"``;
* otherwise a Hugging Face hub dataset ``"owner/name"``, ``"owner/name:config"``, optionally ``"@hub_split"``
  (default: the split's own name), e.g. ``"openai/gsm8k:main@test"`` or ``"HuggingFaceH4/MATH-500"``.

A task's ``columns`` maps the fields it needs to the source's column names (``{"question": "problem"}``).
Every row must hold a non-empty string in each mapped column; anything else is a UserError naming the
source, the row (1-based, the line of a JSONL file) and the column.

Example gin bindings::

    gsm8k.source = {"train": "openai/gsm8k:main", "test": "/data/gsm8k_test_rephrased.jsonl"}
    gsm8k.columns = {"question": "problem", "answer": "solution"}
"""

from __future__ import annotations

from pathlib import Path

from rlzoo.errors import UserError

DATA_DIR = Path(__file__).parent / "data"  # the packaged datasets
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _file_builder(spec: str) -> str | None:
    """The ``datasets`` builder for a local file spec, or None for a hub dataset."""
    suffixes = Path(spec).suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def row_error(spec: str, row: int, column: str, what: str) -> UserError:
    """The error for a bad value in 0-based ``row`` of ``spec``."""
    return UserError(f"{spec}: row {row + 1}, column {column!r} {what}")


def resolve_source(task: str, source: dict[str, str] | None, default: dict[str, str], split: str) -> str:
    """The spec for ``split``: from ``source`` when given (a gin binding), else the packaged default."""
    specs = default if source is None else source
    if split not in specs:
        raise UserError(f"{task}.source has no entry for split {split!r}; it has {sorted(specs)}")
    return str(specs[split])


def load_rows(spec: str, split: str, columns: dict[str, str]) -> list[dict[str, str]]:
    """The rows of ``spec`` as dicts keyed by the task's field names (``columns``: field -> source column)."""
    import datasets  # heavy (pyarrow, pandas): only when a task reads data

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log lines repeat the exception we turn into one line
    builder = _file_builder(spec)
    try:
        if builder is not None:
            if not Path(spec).expanduser().is_file():
                raise UserError(f"data file {spec} does not exist (for split {split!r}); give an existing file")
            try:
                table = datasets.load_dataset(builder, data_files=str(Path(spec).expanduser()), split="train")
            except StopIteration:  # the json builder, on a file with no rows
                raise UserError(f"data file {spec} is empty (for split {split!r}); give a file with rows") from None
            except (OSError, EOFError) as e:  # a corrupt or cut .gz
                raise UserError(f"cannot read {spec}: {e}") from None
        else:
            name, _, hub_split = spec.partition("@")
            name, _, config = name.partition(":")
            table = datasets.load_dataset(name, config or None, split=hub_split or split)
    except (datasets.exceptions.DatasetNotFoundError, ConnectionError) as e:
        raise UserError(f"cannot load {spec!r} from the Hugging Face hub ({e}); give a local file instead") from e
    except datasets.exceptions.DatasetGenerationError as e:
        raise UserError(f"cannot read {spec}: {e.__cause__ or e}") from e

    missing = [column for column in columns.values() if column not in table.column_names]
    if missing:
        raise UserError(
            f"{spec} has no column {missing[0]!r} (it has {table.column_names}); map the task's fields "
            f"to its columns with <task>.columns"
        )
    rows = table.select_columns(sorted(set(columns.values()))).to_list()
    out = []
    for i, row in enumerate(rows):
        for column in columns.values():
            value = row[column]
            if value is None:
                raise row_error(spec, i, column, "is missing; every row needs a non-empty string there")
            if not isinstance(value, str):
                raise row_error(spec, i, column, f"is a {type(value).__name__}, not a string")
            if not value.strip():
                raise row_error(spec, i, column, "is empty; every row needs a non-empty string there")
        out.append({field: row[column] for field, column in columns.items()})
    return out
