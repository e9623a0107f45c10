"""Bad input through the CLI: one clear `mbtrain: error:` line, a non-zero exit, no traceback, nothing lost.

Every failing command is checked by `assert_clean_error` (exactly one stderr line naming the file, column
or flag) and, where a run directory, checkpoint or output file already exists, by `untouched` (the bytes
and the file listing are the same before and after). The positive cases at the end pin down the inputs
that look odd but are fine: boolean / "true"/"false" labels, single-class validation or test files,
unseen categories and nulls in feature columns.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
from typer.testing import Result

from tests.helpers import make_frame, run_cli

FAST = ["--epochs", "1", "--batch-size", "64", "--hidden", "8", "--experts", "2", "--tower", "4",
        "--embed-dim", "4", "--threads", "1"]
TASKS = ["--tasks", "purchase,click"]


# ----------------------------------------------------------------------------------------------- helpers


def assert_clean_error(result: Result, *fragments: str) -> str:
    """Non-zero exit via SystemExit, exactly one `mbtrain: error:` line on stderr holding every fragment."""
    assert result.exit_code != 0, f"exit code 0 on bad input; output:\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"escaped {result.exception!r}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("mbtrain: error:"), line
    assert line.isprintable(), f"control characters in {line!r}"
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    return line


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file's bytes (and every folder) under `path`, hidden ones included; None when absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


@contextmanager
def untouched(*paths: Path) -> Iterator[None]:
    """Assert that the given files / folders (or their absence) are exactly the same after the block."""
    before = [snapshot(p) for p in paths]
    yield
    after = [snapshot(p) for p in paths]
    for path, old, new in zip(paths, before, after, strict=True):
        assert new == old, f"{path} was modified by a failed command"


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken and odd data files, keyed by a short name."""
    folder = tmp_path_factory.mktemp("bad")
    frame = make_frame(120, seed=2)
    files: dict[str, Path] = {}

    files["missing"] = folder / "nope.parquet"
    files["directory"] = folder / "a_folder"
    files["directory"].mkdir()
    noise = random.Random(0).randbytes(4096)
    files["binary"] = write_bytes(folder / "noise.bin", noise)
    files["binary_csv"] = write_bytes(folder / "noise.csv", bytes(b or 1 for b in noise))  # no NUL byte
    files["text_parquet"] = write_text(folder / "text.parquet", "user,click\nu1,1\n")
    real = folder / "real.parquet"
    frame.write_parquet(real)
    content = real.read_bytes()
    files["truncated"] = write_bytes(folder / "truncated.parquet", content[: len(content) // 2])
    files["empty_csv"] = write_bytes(folder / "empty.csv", b"")
    files["empty_parquet"] = write_bytes(folder / "empty.parquet", b"")
    files["header_only"] = write_text(folder / "header_only.csv", ",".join(frame.columns) + "\n")
    lines = frame.head(6).write_csv().splitlines()
    files["too_few"] = write_text(folder / "too_few.csv",
                                  "\n".join([*lines[:3], lines[3].rsplit(",", 1)[0], *lines[4:]]) + "\n")
    files["too_many"] = write_text(folder / "too_many.csv",
                                   "\n".join([*lines[:3], lines[3] + ",9", *lines[4:]]) + "\n")
    files["latin1"] = write_bytes(folder / "latin1.csv", "\n".join(lines).replace("u1", "caf\xe9", 1)
                                  .encode("latin-1") + b"\n")

    def labels(name: str, **columns: pl.Series | list) -> None:
        changed = frame.with_columns(**{k: pl.Series(k, v) if isinstance(v, list) else v
                                        for k, v in columns.items()})
        files[name] = folder / f"{name}.parquet"
        changed.write_parquet(files[name])

    rows = frame.height
    labels("label_012", purchase=[i % 3 for i in range(rows)])
    labels("label_null", purchase=[None if i == 7 else i % 2 for i in range(rows)])
    labels("label_text", purchase=["yes" if i % 2 else "no" for i in range(rows)])
    labels("label_half", purchase=[0.5 if i == 3 else float(i % 2) for i in range(rows)])
    labels("rating_text", rating=["high" if i % 2 else "low" for i in range(rows)])

    test = make_frame(200, seed=1)
    files["no_feature"] = folder / "no_feature.csv"
    test.drop("device").write_csv(files["no_feature"])
    files["no_label"] = folder / "no_label.csv"
    test.drop("click").write_csv(files["no_label"])
    files["numeric_text"] = folder / "numeric_text.csv"
    test.with_columns(rating=pl.lit("abc")).write_csv(files["numeric_text"])
    return files


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("export") / "model.pt"
    result = run_cli("export", str(trained_run), "--output", str(target))
    assert result.exit_code == 0, result.output
    return target


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


# ------------------------------------------------------------------------------------ unreadable data files

FILE_CASES = [
    pytest.param("missing", ("nope.parquet", "not found"), id="missing"),
    pytest.param("directory", ("a_folder", "directory"), id="directory"),
    pytest.param("binary", ("noise.bin",), id="binary"),
    pytest.param("binary_csv", ("noise.csv",), id="binary_csv"),
    pytest.param("text_parquet", ("text.parquet", "parquet"), id="text_parquet"),
    pytest.param("truncated", ("truncated.parquet", "parquet"), id="truncated"),
    pytest.param("empty_csv", ("empty.csv", "empty"), id="empty_csv"),
    pytest.param("empty_parquet", ("empty.parquet", "empty"), id="empty_parquet"),
    pytest.param("header_only", ("header_only.csv", "no rows"), id="header_only"),
    pytest.param("too_few", ("too_few.csv",), id="too_few"),
    pytest.param("too_many", ("too_many.csv",), id="too_many"),
    pytest.param("latin1", ("latin1.csv",), id="latin1"),
]


def _command(command: str, data: Path, run: Path, tmp_path: Path) -> list[str]:
    return {
        "fit": ["fit", str(data), *TASKS, *FAST, "--out", str(tmp_path / "new_run")],
        "inspect": ["inspect", str(data), *TASKS],
        "eval": ["eval", str(run), str(data), "--json", str(tmp_path / "metrics.json")],
        "predict": ["predict", str(run), str(data), "--output", str(tmp_path / "pred.csv")],
    }[command]


@pytest.mark.parametrize("command", ["fit", "inspect", "eval", "predict"])
@pytest.mark.parametrize("case, fragments", FILE_CASES)
def test_unreadable_data_file(case: str, fragments: tuple[str, ...], command: str, bad: dict[str, Path],
                              trained_run: Path, tmp_path: Path) -> None:
    with untouched(trained_run, bad[case], tmp_path):  # no run, output or partial file appears either
        result = run_cli(*_command(command, bad[case], trained_run, tmp_path))
    assert_clean_error(result, *fragments)


def test_fit_rejects_bad_valid_file(data_dir: Path, bad: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    for case, fragments in (("missing", ("nope.parquet",)), ("truncated", ("truncated.parquet",)),
                            ("no_feature", ("no_feature.csv", "device")),
                            ("label_null", ("label_null", "purchase"))):
        with untouched(out):
            result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, "--out", str(out),
                             "--valid", str(bad[case]))
        assert_clean_error(result, *fragments)


# ------------------------------------------------------------------------------------ columns and labels

BINARY = ("--task-type", "purchase=binary")
LABEL_CASES = [  # (file, flags, fragments of fit's line)
    pytest.param("label_012", BINARY, ("label_012.parquet", "'purchase'", "binary"), id="values_0_1_2"),
    pytest.param("label_null", (), ("label_null.parquet", "'purchase'", "missing", "--missing-labels skip"), id="null"),
    pytest.param("label_text", (), ("label_text.parquet", "'purchase'", "--task-type"), id="yes_no_text"),
    pytest.param("label_half", BINARY, ("label_half.parquet", "'purchase'", "0.5"), id="float_half"),
]


@pytest.mark.parametrize("case, flags, fragments", LABEL_CASES)
def test_fit_rejects_bad_labels(case: str, flags: tuple[str, ...], fragments: tuple[str, ...],
                                bad: dict[str, Path], tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(bad[case]), *TASKS, *FAST, *flags, "--out", str(tmp_path / "run"))
    assert_clean_error(result, *fragments)


@pytest.mark.parametrize("case, fragments", [("label_012", ("'purchase'", "binary")),
                                             ("label_text", ("'purchase'", "text")),
                                             ("label_half", ("'purchase'", "0.5"))])
def test_eval_rejects_labels_its_binary_task_cannot_take(case: str, fragments: tuple[str, ...],
                                                         bad: dict[str, Path], trained_run: Path,
                                                         tmp_path: Path) -> None:
    with untouched(trained_run, tmp_path):
        evaluated = run_cli("eval", str(trained_run), str(bad[case]), "--json", str(tmp_path / "m.json"))
    assert_clean_error(evaluated, bad[case].name, *fragments)


def test_inspect_names_a_label_of_no_type(bad: dict[str, Path]) -> None:
    assert_clean_error(run_cli("inspect", str(bad["label_text"]), *TASKS), "'purchase'", "--task-type")


def test_numeric_feature_holding_text_is_rejected(bad: dict[str, Path], tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(bad["rating_text"]), *TASKS, *FAST, "--numeric", "rating",
                         "--out", str(tmp_path / "run"))
    assert_clean_error(result, "rating_text.parquet", "'rating'", "--numeric")


def test_integers_beyond_int64_are_named(tmp_path: Path) -> None:
    """Unsigned ids past 2**63 cannot be compared as Int64: one line naming the column, before any training."""
    path = tmp_path / "hashed.parquet"
    frame = make_frame(120)
    frame.with_columns(pl.Series("hashed", [2**63 + i % 5 for i in range(120)], dtype=pl.UInt64)).write_parquet(path)
    with untouched(tmp_path):
        result = run_cli("fit", str(path), *TASKS, *FAST, "--out", str(tmp_path / "run"))
    assert_clean_error(result, "hashed.parquet", "'hashed'", "--exclude")


# --------------------------------------------------------------------------------------------- fit flags

FLAG_CASES = {
    "task_missing": (["--tasks", "purchase,nope"], ["'nope'", "--tasks", "train.parquet"]),
    "tasks_empty": (["--tasks", ","], ["--tasks"]),
    "task_duplicate": (["--tasks", "click,purchase,click"], ["--tasks", "click", "more than once"]),
    "main_task_outside": (["--main-task", "nope"], ["--main-task", "nope"]),
    "task_is_also_feature": (["--numeric", "click"], ["'click'"]),
    "categorical_missing": (["--categorical", "nope"], ["--categorical", "'nope'"]),
    "exclude_missing": (["--exclude", "nope"], ["--exclude", "'nope'"]),
    "two_roles": (["--categorical", "hour", "--numeric", "hour"], ["'hour'", "--numeric"]),
    "unknown_balance": (["--balance", "bogus"], ["--balance", "bogus"]),
    "unknown_model": (["--model", "bogus"], ["--model", "bogus"]),
    "unknown_strategy": (["--balance", "metabalance", "--strategy", "bogus"], ["--strategy", "bogus"]),
    "relax_factor_one": (["--relax-factor", "1.0"], ["--relax-factor", "1.0"]),
    "relax_factor_negative": (["--relax-factor", "-0.1"], ["--relax-factor", "-0.1"]),
    "beta_one": (["--beta", "1"], ["--beta"]),
    "lr_zero": (["--lr", "0"], ["--lr"]),
    "lr_negative": (["--lr", "-0.01"], ["--lr"]),
    "batch_size_zero": (["--batch-size", "0"], ["--batch-size"]),
    "epochs_zero": (["--epochs", "0"], ["--epochs"]),
    "dropout_one": (["--dropout", "1"], ["--dropout"]),
    "valid_fraction_zero": (["--valid-fraction", "0"], ["--valid-fraction"]),
    "valid_fraction_one": (["--valid-fraction", "1"], ["--valid-fraction"]),
    "hidden_not_int": (["--hidden", "8,x"], ["--hidden", "8,x"]),
    "hidden_zero": (["--hidden", "8,0"], ["--hidden"]),
    "experts_zero": (["--experts", "0"], ["--experts"]),
    "threads_zero": (["--threads", "0"], ["--threads"]),
    "metabalance_one_task": (["--tasks", "click", "--balance", "metabalance"], ["--balance", "metabalance"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_fit_rejects_bad_flags(case: str, data_dir: Path, tmp_path: Path) -> None:
    extra, fragments = FLAG_CASES[case]
    with untouched(tmp_path):  # rejected before any run directory is created
        result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, *extra,
                         "--out", str(tmp_path / "run"))
    assert_clean_error(result, *fragments)


def test_inspect_rejects_bad_task_flags(data_dir: Path) -> None:
    train = str(data_dir / "train.parquet")
    assert_clean_error(run_cli("inspect", train, "--tasks", "purchase,nope"), "'nope'", "--tasks")
    assert_clean_error(run_cli("inspect", train, "--tasks", "click,click"), "--tasks", "click")
    assert_clean_error(run_cli("inspect", train, *TASKS, "--main-task", "nope"), "--main-task", "nope")


def test_fit_without_data_or_tasks(data_dir: Path, tmp_path: Path) -> None:
    with untouched(tmp_path):
        assert_clean_error(run_cli("fit", *TASKS, "--out", str(tmp_path / "run")), "DATA")
        no_tasks = run_cli("fit", str(data_dir / "train.parquet"), "--out", str(tmp_path / "run"))
        assert_clean_error(no_tasks, "--tasks")


@pytest.mark.parametrize("extra, fragment", [
    pytest.param(["--epochs", "abc"], "--epochs", id="not_an_int"),
    pytest.param(["--bogus-flag"], "--bogus-flag", id="unknown_flag"),
])
def test_flag_parse_errors_are_one_line(extra: list[str], fragment: str, data_dir: Path,
                                        tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *extra,
                         "--out", str(tmp_path / "run"))
    assert_clean_error(result, fragment)


# ---------------------------------------------------------------------------------------- --config files

CONFIG_CASES = {
    "missing": (None, ["missing.toml", "not found"]),
    "invalid_toml": ("epochs = = 3\n", ["run.toml", "TOML"]),
    "not_utf8": (b"epochs = 1 # \xff\xfe\n", ["run.toml"]),
    "unknown_key": ('tasks = "purchase,click"\nepoch = 3\n', ["run.toml", "'epoch'"]),
    "wrong_type": ('tasks = "purchase,click"\nepochs = "three"\n', ["run.toml", "epochs", "three"]),
    "bool_for_int": ('tasks = "purchase,click"\nepochs = true\n', ["run.toml", "epochs"]),
    "list_of_text_for_ints": ('tasks = "purchase,click"\nhidden = "8,x"\n', ["run.toml", "hidden"]),
    "out_of_range": ('tasks = "purchase,click"\nlr = 0\n', ["--lr"]),
    "section_table": ('[train]\nepochs = 1\n', ["run.toml", "'train'"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_file(case: str, data_dir: Path, tmp_path: Path) -> None:
    content, fragments = CONFIG_CASES[case]
    config = tmp_path / ("missing.toml" if content is None else "run.toml")
    if isinstance(content, bytes):
        config.write_bytes(content)
    elif content is not None:
        config.write_text(content)
    with untouched(tmp_path):
        fitted = run_cli("fit", str(data_dir / "train.parquet"), "--config", str(config), "--epochs", "1",
                         "--out", str(tmp_path / "run"))
        inspected = run_cli("inspect", str(data_dir / "train.parquet"), "--config", str(config))
    assert_clean_error(fitted, *fragments)
    assert_clean_error(inspected, *fragments)


# ----------------------------------------------------------------------------- run directories: never lost


def test_fit_over_existing_run_needs_overwrite(run_copy: Path, data_dir: Path, tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, "--out", str(run_copy))
    assert_clean_error(result, "--overwrite", str(run_copy))


def test_fit_out_is_a_file(data_dir: Path, tmp_path: Path) -> None:
    target = write_text(tmp_path / "notes.txt", "keep me\n")
    with untouched(tmp_path):
        result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, "--out", str(target))
    assert_clean_error(result, "notes.txt")


def test_overwrite_with_bad_data_keeps_the_old_run(run_copy: Path, bad: dict[str, Path],
                                                   tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(bad["label_null"]), *TASKS, *FAST, "--out", str(run_copy), "--overwrite")
    assert_clean_error(result, "'purchase'", "missing")


def test_resume_on_a_directory_that_is_not_a_run(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    write_text(folder / "notes.txt", "not a run\n")
    with untouched(tmp_path):
        result = run_cli("fit", "--resume", "--out", str(folder), "--epochs", "2")
    assert_clean_error(result, "--resume", "plain")
    with untouched(tmp_path):
        result = run_cli("fit", "--resume", "--out", str(tmp_path / "absent"), "--epochs", "2")
    assert_clean_error(result, "--resume", "absent")


def test_resume_with_corrupt_config(run_copy: Path, tmp_path: Path) -> None:
    write_text(run_copy / "config.json", '{"data": {"tasks": ')
    with untouched(tmp_path):
        result = run_cli("fit", "--resume", "--out", str(run_copy), "--epochs", "4")
    assert_clean_error(result, "config.json")


def test_resume_with_corrupt_last_checkpoint(run_copy: Path, tmp_path: Path) -> None:
    write_bytes(run_copy / "checkpoints" / "last.pt", b"garbage" * 100)
    with untouched(tmp_path):
        result = run_cli("fit", "--resume", "--out", str(run_copy), "--epochs", "4")
    assert_clean_error(result, "last.pt")


def test_resume_and_overwrite_together(run_copy: Path, data_dir: Path, tmp_path: Path) -> None:
    with untouched(tmp_path):
        result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, "--resume", "--overwrite",
                         "--out", str(run_copy), "--epochs", "4")
    assert_clean_error(result, "--resume", "--overwrite")


def test_resume_without_out() -> None:
    assert_clean_error(run_cli("fit", "--resume", "--epochs", "2"), "--resume", "--out")


# ------------------------------------------------------------------------------------------ eval / predict


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_missing_feature_column(command: str, trained_run: Path, bad: dict[str, Path],
                                tmp_path: Path) -> None:
    output = write_text(tmp_path / "pred.csv", "old predictions\n")  # an existing output survives a failure
    args = ["--output", str(output)] if command == "predict" else ["--json", str(tmp_path / "m.json")]
    with untouched(trained_run, tmp_path):
        result = run_cli(command, str(trained_run), str(bad["no_feature"]), *args)
    assert_clean_error(result, "no_feature.csv", "'device'")


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_numeric_feature_holding_text_at_scoring(command: str, trained_run: Path, bad: dict[str, Path],
                                                 tmp_path: Path) -> None:
    args = ["--output", str(tmp_path / "p.csv")] if command == "predict" else []
    with untouched(trained_run, tmp_path):
        result = run_cli(command, str(trained_run), str(bad["numeric_text"]), *args)
    assert_clean_error(result, "numeric_text.csv", "'rating'")


def test_eval_missing_label_column(trained_run: Path, bad: dict[str, Path], tmp_path: Path) -> None:
    with untouched(trained_run, tmp_path):
        result = run_cli("eval", str(trained_run), str(bad["no_label"]), "--json", str(tmp_path / "m.json"))
    assert_clean_error(result, "no_label.csv", "'click'")


@pytest.mark.parametrize("name", ["no_such_run", "no_such_model.pt"])
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_model_that_does_not_exist(command: str, name: str, data_dir: Path, tmp_path: Path) -> None:
    args = {
        "eval": ["eval", str(tmp_path / name), str(data_dir / "test.csv")],
        "predict": ["predict", str(tmp_path / name), str(data_dir / "test.csv"),
                    "--output", str(tmp_path / "p.csv")],
        "export": ["export", str(tmp_path / name), "--output", str(tmp_path / "model.pt")],
    }[command]
    with untouched(tmp_path):
        result = run_cli(*args)
    assert_clean_error(result, name)


def test_a_directory_that_is_not_a_run(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    with untouched(tmp_path):
        assert_clean_error(run_cli("eval", str(folder), str(data_dir / "test.csv")), "plain")
        assert_clean_error(run_cli("export", str(folder), "--output", str(tmp_path / "m.pt")), "plain")


def _garbage_checkpoints(run: Path, how: str) -> None:
    for name in ("best.pt", "last.pt"):
        path = run / "checkpoints" / name
        content = path.read_bytes()
        if how == "garbage":
            path.write_bytes(random.Random(name).randbytes(len(content)))
        elif how == "truncated":
            path.write_bytes(content[: len(content) // 2])
        else:  # a valid torch file that is not an mbtrain checkpoint
            import torch

            torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "foreign"])
@pytest.mark.parametrize("command", ["eval", "predict", "export", "eval_checkpoint"])
def test_corrupt_checkpoint(command: str, how: str, run_copy: Path, data_dir: Path, tmp_path: Path) -> None:
    _garbage_checkpoints(run_copy, how)
    test = str(data_dir / "test.csv")
    args = {
        "eval": ["eval", str(run_copy), test, "--json", str(tmp_path / "m.json")],
        "predict": ["predict", str(run_copy), test, "--output", str(tmp_path / "p.csv")],
        "export": ["export", str(run_copy), "--output", str(tmp_path / "model.pt")],
        "eval_checkpoint": ["eval", str(run_copy / "checkpoints" / "last.pt"), test],
    }[command]
    with untouched(tmp_path):
        result = run_cli(*args)
    assert_clean_error(result, "last.pt" if command == "eval_checkpoint" else "best.pt")


@pytest.mark.parametrize("how", ["garbage", "truncated", "no_spec"])
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_corrupt_export(command: str, how: str, exported: Path, data_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model.pt"
    content = exported.read_bytes()
    if how == "garbage":
        broken.write_bytes(random.Random(1).randbytes(len(content)))
    elif how == "truncated":
        broken.write_bytes(content[: len(content) // 2])
    else:  # a real TorchScript archive whose embedded spec is damaged
        import zipfile

        with zipfile.ZipFile(exported) as source, zipfile.ZipFile(broken, "w") as target:
            for item in source.infolist():
                data = source.read(item)
                target.writestr(item, b"{not json" if item.filename.endswith("/extra/mbtrain.json") else data)
    args = ["--output", str(tmp_path / "p.csv")] if command == "predict" else []
    with untouched(tmp_path):
        result = run_cli(command, str(broken), str(data_dir / "test.csv"), *args)
    assert_clean_error(result, "model.pt")


# ------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("target, fragments", [
    ("pred.txt", ["--output", "pred.txt"]),
    ("pred", ["--output", "pred"]),
    ("missing_dir/pred.csv", ["--output", "missing_dir"]),
], ids=["txt", "no_extension", "missing_dir"])
def test_predict_output_rejected(target: str, fragments: list[str], trained_run: Path, data_dir: Path,
                                 tmp_path: Path) -> None:
    with untouched(trained_run, tmp_path):
        result = run_cli("predict", str(trained_run), str(data_dir / "test.csv"),
                         "--output", str(tmp_path / target))
    assert_clean_error(result, *fragments)


def test_predict_output_is_a_directory(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out.csv"
    folder.mkdir()
    with untouched(trained_run, tmp_path):
        result = run_cli("predict", str(trained_run), str(data_dir / "test.csv"), "--output", str(folder))
    assert_clean_error(result, "--output", str(folder))


def test_keep_names_a_missing_column(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    output = write_text(tmp_path / "pred.csv", "old predictions\n")
    with untouched(trained_run, tmp_path):
        result = run_cli("predict", str(trained_run), str(data_dir / "test.csv"), "--output", str(output),
                         "--keep", "row_id,nope")
    assert_clean_error(result, "--keep", "'nope'")


@pytest.mark.parametrize("args, fragments", [
    (["--output", "{tmp}/missing_dir/model.pt"], ["--output", "missing_dir"]),
    (["--output", "{tmp}"], ["--output", "directory"]),
    (["--output", "{tmp}/model.pt", "--format", "onnx2"], ["--format", "onnx2"]),
], ids=["missing_dir", "output_is_dir", "unknown_format"])
def test_export_rejects_bad_output(args: list[str], fragments: list[str], trained_run: Path,
                                   tmp_path: Path) -> None:
    with untouched(trained_run, tmp_path):
        result = run_cli("export", str(trained_run), *[a.format(tmp=tmp_path) for a in args])
    assert_clean_error(result, *fragments)


def test_eval_json_into_missing_directory(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "missing_dir" / "m.json"
    with untouched(trained_run, tmp_path):
        result = run_cli("eval", str(trained_run), str(data_dir / "test.csv"), "--json", str(target))
    assert_clean_error(result, str(target))


# --------------------------------------------------------------------------------- odd but valid: exit 0


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_boolean_and_text_labels_train(fmt: str, tmp_path: Path) -> None:
    frame = make_frame(200, seed=3)
    frame = frame.with_columns(
        purchase=pl.col("purchase").cast(pl.Boolean),
        click=pl.when(pl.col("click") == 1).then(pl.lit("true")).otherwise(pl.lit("false")),
    )
    data = tmp_path / f"bool.{fmt}"
    if fmt == "parquet":
        frame.write_parquet(data)
    else:
        frame.with_columns(click=pl.col("click").str.to_uppercase()).write_csv(data)  # TRUE / FALSE text
    out = tmp_path / "run"
    result = run_cli("fit", str(data), *TASKS, *FAST, "--out", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"purchase", "click"}
    assert 0 < metrics["tasks"]["click"]["positives"] < metrics["tasks"]["click"]["rows"]


def test_float_zero_one_labels_train(tmp_path: Path) -> None:
    data = tmp_path / "float.parquet"
    make_frame(200, seed=3).with_columns(pl.col("purchase", "click").cast(pl.Float64)).write_parquet(data)
    result = run_cli("fit", str(data), *TASKS, *FAST, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output


def test_single_class_validation_file(data_dir: Path, tmp_path: Path) -> None:
    valid = tmp_path / "valid.parquet"
    make_frame(80, seed=4).with_columns(purchase=pl.lit(0)).write_parquet(valid)
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, "--balance", "metabalance",
                     "--valid", str(valid), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mbtrain: warning:")]
    assert len(warnings) == 1 and "'purchase'" in warnings[0] and "valid.parquet" in warnings[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["purchase"]["auc"] is None
    assert metrics["tasks"]["purchase"]["positives"] == 0
    assert metrics["tasks"]["click"]["auc"] is not None


def test_eval_single_class_file_warns(trained_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "one_class.csv"
    make_frame(50, seed=5).with_columns(purchase=pl.lit(0)).write_csv(data)
    target = tmp_path / "m.json"
    with untouched(trained_run):
        result = run_cli("eval", str(trained_run), str(data), "--json", str(target))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mbtrain: warning:"), result.stderr
    assert "purchase" in lines[0] and "one_class.csv" in lines[0]
    metrics = json.loads(target.read_text())
    assert metrics["tasks"]["purchase"]["auc"] is None
    assert metrics["tasks"]["click"]["auc"] is not None
    assert '"auc": null' in target.read_text()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_unseen_categories_and_null_features_score(fmt: str, trained_run: Path, exported: Path,
                                                   tmp_path: Path) -> None:
    rows = 40
    frame = make_frame(rows, seed=6).with_columns(
        user=pl.Series([f"new_user_{i}" if i % 2 else None for i in range(rows)]),
        device=pl.Series([None if i % 3 == 0 else "smart-fridge" for i in range(rows)]),
        hour=pl.Series([None if i % 4 == 0 else 99 for i in range(rows)]),
        price=pl.lit(None, dtype=pl.Float64),
        rating=pl.Series([float("nan") if i % 5 == 0 else 3.0 for i in range(rows)]),
    )
    data = tmp_path / f"odd.{fmt}"
    frame.write_parquet(data) if fmt == "parquet" else frame.write_csv(data)
    with untouched(trained_run, exported):
        evaluated = run_cli("eval", str(trained_run), str(data))
        for source in (trained_run, exported):
            output = tmp_path / "pred.csv"
            predicted = run_cli("predict", str(source), str(data), "--output", str(output),
                                "--keep", "row_id")
            assert predicted.exit_code == 0, predicted.output
            predictions = pl.read_csv(output)
            assert predictions.height == rows
            assert predictions.null_count().row(0) == (0, 0, 0)
            assert predictions["pred_purchase"].is_between(0, 1, closed="none").all()
    assert evaluated.exit_code == 0, evaluated.output
    assert "Traceback" not in evaluated.output


@pytest.mark.parametrize("keep", ["row_id,row_id", "pred_click"])
def test_predict_keep_duplicates_and_collisions(keep: str, trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "p.csv"
    source = data_dir / "test.csv"
    if keep == "pred_click":
        source = tmp_path / "scored.csv"
        pl.read_csv(data_dir / "test.csv").with_columns(pred_click=pl.lit(0.5)).write_csv(source)
    result = run_cli("predict", str(trained_run), str(source), "--output", str(target), "--keep", keep)
    if keep == "pred_click":
        assert_clean_error(result, "--keep", "pred_click")
    else:
        assert result.exit_code == 0, result.output
        assert pl.read_csv(target).columns == ["row_id", "pred_purchase", "pred_click"]


def test_seed_out_of_range(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("fit", str(data_dir / "train.parquet"), *TASKS, *FAST, "--seed", str(2**40), "--out",
                     str(tmp_path / "run"))
    assert_clean_error(result, "--seed")
