"""Read a CSV or Parquet file into a polars DataFrame, turning every way it can fail into one clear line."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from mbtrain.checkpoint import check_writable, write_atomic
from mbtrain.data.coded import CodedFrame, is_text
from mbtrain.errors import MbtrainError, first_line

PARQUET_MAGIC = b"PAR1"
LARGE_TEXT = pa.dictionary(pa.int32(), pa.large_string())


def read_table(path: str | Path) -> pl.DataFrame:
    """The whole file as a DataFrame; Parquet is recognised by its magic bytes, anything else must be CSV."""
    path = Path(path)
    frame = read_parquet([path]) if _is_parquet(path) else _read_csv(path)
    _require_rows(frame.height, path)
    return frame


def read_coded(paths: Sequence[Path], plain: Collection[str] = ()) -> CodedFrame:
    """One CSV or Parquet file, or several Parquet files with the same columns (stream.row_groups checks them),
    as a CodedFrame. Parquet text columns (all but `plain`) are read by pyarrow as the dictionaries the files
    store, so coding them costs no hashing of the strings polars would decode (docs/benchmarks.md)."""
    paths = [Path(path) for path in paths]
    if len(paths) == 1 and not _is_parquet(paths[0]):
        return CodedFrame(read_table(paths[0]))
    try:
        schema = pq.read_schema(paths[0])
        text = [field.name for field in schema if is_text(field.type) and field.name not in plain]
        chunks: dict[str, list[pa.Array]] = {name: [] for name in text}
        for path in paths if text else ():
            with pq.ParquetFile(path, read_dictionary=text) as reader:
                table = reader.read(columns=text)
            for name in text:  # one value type for every file's dictionaries (string or large_string)
                chunks[name] += [chunk.cast(LARGE_TEXT) for chunk in table.column(name).chunks]
    except Exception as exc:  # as in read_parquet
        raise _damaged(paths[0], exc) from None
    frame = read_parquet(paths, [name for name in schema.names if name not in text])
    dictionaries = {name: pa.chunked_array(pieces, LARGE_TEXT) for name, pieces in chunks.items()}
    coded = CodedFrame(frame, dictionaries, order=schema.names)
    _require_rows(coded.height, paths[0])
    return coded


def _is_parquet(path: Path) -> bool:
    """True for a Parquet file, False for (what must be) CSV; a missing, empty or binary file fails here."""
    if not path.exists():
        raise MbtrainError(f"{path}: file not found")
    if path.is_dir():
        raise MbtrainError(f"{path}: is a directory, expected a CSV or Parquet file")
    with path.open("rb") as handle:
        head = handle.read(4096)
    if not head:
        raise MbtrainError(f"{path}: file is empty")
    if head.startswith(PARQUET_MAGIC):
        return True
    if path.suffix.lower() in (".parquet", ".pq"):
        raise MbtrainError(f"{path}: not a Parquet file (no Parquet header)")
    if b"\x00" in head:
        raise MbtrainError(f"{path}: not a Parquet or CSV file (binary content)")
    return False


def _require_rows(rows: int, path: Path) -> None:
    if rows == 0:
        raise MbtrainError(f"{path}: has a header but no rows")


def read_parquet(paths: Sequence[Path], columns: list[str] | None = None) -> pl.DataFrame:
    """Parquet files as one DataFrame, in file order (several must have the same columns: stream.row_groups)."""
    paths = list(paths)
    try:  # glob=False: a file named data[1].parquet is not a pattern
        return pl.read_parquet(paths if len(paths) > 1 else paths[0], columns=columns, glob=False,
                               hive_partitioning=False)
    except Exception as exc:  # polars raises several types for corrupt files; all mean the same here
        raise _damaged(paths[0], exc) from None


def _damaged(path: Path, exc: Exception) -> MbtrainError:
    return MbtrainError(f"{path}: unreadable Parquet file, truncated or corrupt ({first_line(exc)})")


def _read_csv(path: Path) -> pl.DataFrame:
    """pyarrow's reader, because it rejects rows with too few or too many fields instead of padding them."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        if "Empty CSV file" in str(exc):
            raise MbtrainError(f"{path}: file is empty") from None
        raise MbtrainError(f"{path}: malformed CSV ({first_line(exc)})") from None
    for column in table.schema:
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            raise MbtrainError(f"{path}: column {column.name!r} is not valid UTF-8 text; save the file as UTF-8")
    return pl.from_arrow(table)


def check_table_output(path: Path) -> None:
    """Fail before scoring when --output cannot take a table."""
    check_writable(path, "--output")
    if path.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise MbtrainError(f"--output {path}: use a .csv or .parquet file name")


def write_table(frame: pl.DataFrame, path: Path) -> None:
    """Write CSV or Parquet by the file's extension, atomically (temp file, then rename)."""
    check_table_output(path)
    csv = path.suffix.lower() == ".csv"
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    if csv and nested:
        raise MbtrainError(f"--output {path}: CSV cannot hold the list column {nested[0]!r}; write .parquet, or "
                           "leave it out of --keep")
    write_atomic(path, lambda temporary: frame.write_csv(temporary) if csv else frame.write_parquet(temporary),
                 "--output")
