"""The balancer registry: a balancer added from outside mbtrain runs through TOML, fit and resume; every fit flag
reaches the config; a balancer's setting is spelled in its own file and the CLI only; the docs' table is the
registry's."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.main import get_command

import mbtrain
import mbtrain.train
from mbtrain.balance import BALANCERS, PlainSum, Setup, register
from mbtrain.balance.registry import balancer_table, setting_fields
from mbtrain.checks import positive
from mbtrain.cli import FIT_ONLY, app
from mbtrain.config import RunConfig
from tests.helpers import run_cli

DOCS = Path(__file__).parent.parent / "docs" / "balancers.md"


@dataclass(frozen=True)
class FixedSettings:
    fixed_main_weight: float = 2.0

    def __post_init__(self) -> None:
        positive("--fixed-main-weight", self.fixed_main_weight)


class FixedWeights(PlainSum):
    """A toy balancer: the main task's loss times a fixed weight, plus the others."""

    method = "fixed weights (a test's toy)"
    settings_class = FixedSettings

    def __init__(self, params: list[torch.Tensor], reduce: Any, main_weight: float) -> None:
        super().__init__(params, reduce)
        self.main_weight = main_weight

    @classmethod
    def build(cls, setup: Setup, settings: FixedSettings) -> FixedWeights:
        return cls(setup.every, setup.reduce, settings.fixed_main_weight)

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.main_weight * losses[0] + sum(losses[1:])


@pytest.fixture
def fixed_weights() -> Iterator[None]:
    register("fixed")(FixedWeights)
    yield
    del BALANCERS["fixed"]


def _history(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_a_balancer_registered_from_outside_runs_through_toml_fit_and_resume(
        fixed_weights: None, data_dir: Path, tmp_path: Path) -> None:
    data = str(data_dir / "train.parquet")
    common = ["--tasks", "purchase,click", "--batch-size", "64", "--threads", "1", "--patience", "0"]
    toml = tmp_path / "fixed.toml"
    toml.write_text('balance = "fixed"\nfixed-main-weight = 3.0\nepochs = 2\n')
    resumed, straight, weighted = tmp_path / "resumed", tmp_path / "straight", tmp_path / "weighted"
    for args in ([data, *common, "--config", str(toml), "--out", str(resumed)],
                 ["--resume", "--out", str(resumed), "--epochs", "3"],
                 [data, *common, "--config", str(toml), "--epochs", "3", "--out", str(straight)],
                 [data, *common, "--task-weights", "purchase=3", "--epochs", "3", "--out", str(weighted)]):
        result = run_cli("fit", *args)
        assert result.exit_code == 0, result.output
    saved = json.loads((resumed / "config.json").read_text())["balance"]
    assert saved["balance"] == "fixed" and saved["fixed_main_weight"] == 3.0
    # 3·L_purchase + L_click is the plain sum under --task-weights purchase=3; resumed equals straight
    for run in (resumed, weighted):
        for ours, theirs in zip(_history(run), _history(straight), strict=True):
            assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-6)
            assert ours["valid"]["purchase"]["auc"] == pytest.approx(theirs["valid"]["purchase"]["auc"], abs=1e-9)
    toml.write_text("fixed_main_weight = -1\n")
    bad = run_cli("fit", data, *common, "--balance", "fixed", "--config", str(toml), "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "--fixed-main-weight must be positive: got -1" in bad.stderr


# a value for every setting flag of fit, none of them its default; the expected setting when it is parsed
FLAG_VALUES: dict[str, tuple[list[str], Any]] = {
    "tasks": (["--tasks", "click,purchase"], ["click", "purchase"]),
    "main_task": (["--main-task", "purchase"], "purchase"),
    "model": (["--model", "ple"], "ple"),
    "balance": (["--balance", "pcgrad"], "pcgrad"),
    "balance_level": (["--balance-level", "representation"], "representation"),
    "relax_factor": (["--relax-factor", "0.5"], 0.5),
    "beta": (["--beta", "0.8"], 0.8),
    "strategy": (["--strategy", "reduce"], "reduce"),
    "task_weights": (["--task-weights", "click=0.5"], {"click": 0.5}),
    "temperature": (["--temperature", "3"], 3.0),
    "famo_lr": (["--famo-lr", "0.05"], 0.05),
    "famo_decay": (["--famo-decay", "0.02"], 0.02),
    "gradnorm_alpha": (["--gradnorm-alpha", "0.5"], 0.5),
    "mgda_normalization": (["--mgda-normalization", "l2"], "l2"),
    "cagrad_c": (["--cagrad-c", "0.5"], 0.5),
    "nash_update_weights_every": (["--nash-update-weights-every", "2"], 2),
    "nash_max_norm": (["--nash-max-norm", "0"], 0.0),
    "famo_same_batch": (["--famo-same-batch"], True),
    "db_mtl_beta": (["--db-mtl-beta", "0.5"], 0.5),
    "db_mtl_beta_sigma": (["--db-mtl-beta-sigma", "0.5"], 0.5),
    "gradvac_beta": (["--gradvac-beta", "0.1"], 0.1),
    "embed_dim": (["--embed-dim", "5"], 5),
    "hidden": (["--hidden", "16,8"], [16, 8]),
    "experts": (["--experts", "3"], 3),
    "task_experts": (["--task-experts", "2"], 2),
    "levels": (["--levels", "3"], 3),
    "funnel": (["--funnel"], True),
    "tower": (["--tower", "4,2"], [4, 2]),
    "dropout": (["--dropout", "0.1"], 0.1),
    "norm": (["--norm", "layer"], "layer"),
    "pooling": (["--pooling", "sum"], "sum"),
    "calibrator_weight": (["--calibrator-weight", "0.3"], 0.3),
    "epochs": (["--epochs", "4"], 4),
    "batch_size": (["--batch-size", "32"], 32),
    "lr": (["--lr", "0.002"], 0.002),
    "schedule": (["--schedule", "cosine"], "cosine"),
    "warmup": (["--warmup", "1.5"], 1.5),
    "weight_decay": (["--weight-decay", "0.001"], 0.001),
    "seed": (["--seed", "7"], 7),
    "shuffle": (["--no-shuffle"], False),
    "valid": (["--valid", "v.csv"], "v.csv"),
    "valid_fraction": (["--valid-fraction", "0.25"], 0.25),
    "patience": (["--patience", "5"], 5),
    "monitor": (["--monitor", "gauc"], "gauc"),
    "group_by": (["--group-by", "user"], "user"),
    "task_type": (["--task-type", "purchase=binary", "--task-type", "click=regression"],
                  {"purchase": "binary", "click": "regression"}),
    "target_transform": (["--target-transform", "click=none"], {"click": "none"}),
    "regression_loss": (["--regression-loss", "huber"], "huber"),
    "missing_labels": (["--missing-labels", "skip"], "skip"),
    "weight_column": (["--weight-column", "w"], "w"),
    "checkpoint_every": (["--checkpoint-every", "500"], "500"),
    "validate_every": (["--validate-every", "250"], 250),
    "tensorboard": (["--tensorboard"], True),
    "categorical": (["--categorical", "hour"], ["hour"]),
    "numeric": (["--numeric", "price"], ["price"]),
    "exclude": (["--exclude", "row_id"], ["row_id"]),
    "min_frequency": (["--min-frequency", "3"], 3),
    "max_vocab": (["--max-vocab", "100"], 100),
    "max_bag": (["--max-bag", "10"], 10),
    "memory_budget": (["--memory-budget", "2G"], "2G"),
    "threads": (["--threads", "1"], 1),
    "device": (["--device", "cpu"], "cpu"),
    "task_backward": (["--task-backward", "batched"], "batched"),
    "table_optimizer": (["--table-optimizer", "rowwise-adagrad"], "rowwise-adagrad"),
    "table_lr": (["--table-lr", "0.05"], 0.05),
}


def test_every_fit_flag_reaches_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fit = get_command(app).commands["fit"]
    settings = {param.name for param in fit.params} - FIT_ONLY
    assert settings == set(FLAG_VALUES), "give every setting flag of fit a value in FLAG_VALUES"
    defaults = RunConfig().flat()
    received: list[RunConfig] = []
    monkeypatch.setattr(mbtrain.train, "fit", lambda config, *args, **kwargs: received.append(config))
    arguments = [argument for flag, _ in FLAG_VALUES.values() for argument in flag]
    result = run_cli("fit", "data.parquet", *arguments, "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    (config,) = received
    flat = config.flat()
    for name, (_, expected) in FLAG_VALUES.items():
        assert expected != defaults[name], f"{name}: pick a value other than the default"
        assert flat[name] == expected, name


def test_a_balancers_setting_is_spelled_in_its_file_and_the_cli_only() -> None:
    """Only the files of the balancers whose settings hold it (MultiBalance shares MetaBalance's) and cli.py."""
    package = Path(mbtrain.__file__).parent
    sources = {path: _identifiers(path) for path in package.rglob("*.py")}
    for name in setting_fields():
        owners = {Path(inspect.getsourcefile(kind)) for kind in BALANCERS.values()
                  if dataclasses.is_dataclass(kind.settings_class)
                  and name in {field.name for field in dataclasses.fields(kind.settings_class)}}
        spelled = {path for path, names in sources.items() if name in names}
        assert spelled == owners | {package / "cli.py"}, (name, sorted(map(str, spelled)))


def _identifiers(path: Path) -> set[str]:
    """The names a module's code uses, and its strings that are one name (keys such as state["beta"])."""
    found = set()
    with path.open() as source:
        for token in tokenize.generate_tokens(source.readline):
            if token.type == tokenize.NAME:
                found.add(token.string)
            elif token.type == tokenize.STRING and token.string.strip("'\"").isidentifier():
                found.add(token.string.strip("'\""))
    return found


def test_the_docs_balancer_table_is_the_registrys() -> None:
    text = DOCS.read_text()
    begin, end = "<!-- balancers:begin -->\n", "<!-- balancers:end -->"
    table = text[text.index(begin) + len(begin) : text.index(end)]
    if os.environ.get("MBTRAIN_WRITE_DOCS"):  # MBTRAIN_WRITE_DOCS=1 pytest tests/test_registry.py rewrites it
        DOCS.write_text(text.replace(table, balancer_table()))
        table = balancer_table()
    assert table == balancer_table(), "docs/balancers.md: rerun with MBTRAIN_WRITE_DOCS=1"


def test_every_task_types_metrics_are_monitors_with_one_direction() -> None:
    """A metric two types share (log loss) is better the same way in both; each type's default --monitor is one of
    its own metrics; every one of them passes --monitor's check."""
    from mbtrain.config import TrainConfig
    from mbtrain.tasks import TASK_TYPES, higher_is_better

    for kind in TASK_TYPES.values():
        assert kind.monitor in kind.directions, kind.name
        for metric, higher in kind.directions.items():
            assert higher_is_better(metric) == higher, (kind.name, metric)
            TrainConfig(monitor=metric).check(group_by="user")
