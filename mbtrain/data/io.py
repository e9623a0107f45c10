"""Read a CSV or Parquet file into a polars DataFrame, turning every way it can fail into one clear line."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from mbtrain.errors import MbtrainError

PARQUET_MAGIC = b"PAR1"


def read_table(path: str | Path) -> pl.DataFrame:
    """The whole file as a DataFrame; Parquet is recognised by its magic bytes, anything else must be CSV."""
    path = Path(path)
    if not path.exists():
        raise MbtrainError(f"{path}: file not found")
    if path.is_dir():
        raise MbtrainError(f"{path}: is a directory, expected a CSV or Parquet file")
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head:
        raise MbtrainError(f"{path}: file is empty")
    if head.startswith(PARQUET_MAGIC):
        frame = _read_parquet(path)
    elif path.suffix.lower() in (".parquet", ".pq"):
        raise MbtrainError(f"{path}: not a Parquet file (no Parquet header)")
    elif b"\x00" in head:
        raise MbtrainError(f"{path}: not a Parquet or CSV file (binary content)")
    else:
        frame = _read_csv(path)
    if frame.height == 0:
        raise MbtrainError(f"{path}: has a header but no rows")
    return frame


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for corrupt files; all mean the same here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MbtrainError(f"{path}: unreadable Parquet file, truncated or corrupt ({reason})") from None


def _read_csv(path: Path) -> pl.DataFrame:
    """pyarrow's reader, because it rejects rows with too few or too many fields instead of padding them."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0]
        if "Empty CSV file" in reason:
            raise MbtrainError(f"{path}: file is empty") from None
        raise MbtrainError(f"{path}: malformed CSV ({reason})") from None
    return pl.from_arrow(table)


def write_table(frame: pl.DataFrame, path: str | Path) -> None:
    """Write CSV or Parquet by the file's extension, atomically (temp file, then rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise MbtrainError(f"--output {path}: use a .csv or .parquet file name")
    if not path.parent.exists():
        raise MbtrainError(f"--output {path}: directory {path.parent} does not exist")
    temporary = path.with_name(f".{path.name}.tmp")
    if suffix == ".csv":
        frame.write_csv(temporary)
    else:
        frame.write_parquet(temporary)
    temporary.replace(path)
