"""The `mbtrain` command line: parses flags into a RunConfig and calls the library; no training logic here."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # typer vendors click since 0.29
from typer.core import TyperGroup

from mbtrain import __version__
from mbtrain.balance import BALANCERS
from mbtrain.balance.metabalance import STRATEGIES
from mbtrain.balance.mgda import NORMALIZATIONS
from mbtrain.config import RunConfig, from_run_record, parse_list, parse_pairs, read_toml, setting_sections
from mbtrain.elastic import torchrun_job
from mbtrain.errors import MbtrainError
from mbtrain.models import MODELS
from mbtrain.models.mlp import NORMS
from mbtrain.optim import TABLE_OPTIMIZERS
from mbtrain.tasks import TASK_TYPES, monitors
from mbtrain.tasks.regression import LOSSES, TRANSFORMS


class OneLineErrors(TyperGroup):
    """Usage errors (unknown flag, a number that is not one) as one `mbtrain: error:` line, like ours."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as exc:
            exc.show()
            code = exc.exit_code
        except ClickException as exc:
            context = getattr(exc, "ctx", None)
            hint = f" (see '{context.command_path} --help')" if context is not None else ""
            sys.stderr.write(f"mbtrain: error: {exc.format_message()}{hint}\n")
            code = exc.exit_code
        except typer.Abort:
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mbtrain",
    cls=OneLineErrors,
    help="Train, evaluate, export and serve multi-task recommendation models (shared-bottom, MMoE, PLE, ESMM; "
    "optionally over the labels' funnel) with optional MetaBalance or other loss balancing.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
DEFAULTS = RunConfig().flat()


def _show_version(asked: bool) -> None:
    if asked:
        console.print(f"mbtrain {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                   help="Print mbtrain's version and exit.")] = False) -> None:
    """Train, evaluate, export and serve multi-task recommendation models."""
# settings a resumed run may change
RESUMABLE = {"epochs", "patience", "threads", "device", "memory_budget", "tensorboard", "task_backward",
             "checkpoint_every"}
FIT_ONLY = {"data", "out", "overwrite", "resume", "config"}  # fit's parameters that are not settings


def _fail(message: str, code: int = 2) -> typer.Exit:
    sys.stderr.write(f"mbtrain: error: {message}\n")
    return typer.Exit(code)


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MbtrainError as exc:
            raise _fail(str(exc)) from None
        except OSError as exc:
            raise _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), 1) from None

    return wrapper


def _help(text: str, key: str) -> str:
    default = DEFAULTS[key]
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{text} (default: {shown})" if default not in (None, []) else text


TasksOpt = Annotated[str | None, typer.Option(help="Comma-separated label columns, main task first unless "
                                                   "--main-task says otherwise, e.g. click,purchase.")]
MainTaskOpt = Annotated[str | None, typer.Option(help="The task MetaBalance and early stopping serve.")]
CategoricalOpt = Annotated[str | None, typer.Option(help="Columns to treat as categorical (comma-separated).")]
NumericOpt = Annotated[str | None, typer.Option(help="Columns to treat as numeric (comma-separated).")]
ExcludeOpt = Annotated[str | None, typer.Option(help="Columns to ignore (comma-separated).")]
GroupByOpt = Annotated[str | None, typer.Option(help="Column of the group (user, session) that GAUC averages "
                                                    "AUC over, e.g. user_id.")]
MaxVocabOpt = Annotated[int | None, typer.Option(help="Each categorical column (and bag) keeps its N most frequent "
                                                    "values (ties by value); the rest map to 'unknown' (default: "
                                                    "no cap).")]
MaxBagOpt = Annotated[int | None, typer.Option(help="Bags (list columns) keep each row's last N elements "
                                                  "(default: 50).")]
TaskTypeOpt = Annotated[list[str] | None, typer.Option(
    help=f"TASK=TYPE, the type of a task's label: {' | '.join(TASK_TYPES)} (repeatable, or comma-separated; a task "
    "not named: binary for 0/1 or boolean labels, regression for other numbers).", show_default=False)]
WeightColumnOpt = Annotated[str | None, typer.Option(help="A column of non-negative row weights that weighs every "
                                                          "task's loss per row (not a feature).")]
ConfigOpt = Annotated[Path | None, typer.Option(help="TOML file with the same keys as the flags; flags win.")]


def _overrides(**flags: Any) -> dict[str, Any]:
    """Flag values keyed by setting name, lists parsed; None means the flag was not given. A command parameter
    that names no setting is a bug, never dropped in silence."""
    unknown = sorted(set(flags) - set(setting_sections()))
    if unknown:
        raise TypeError(f"the command's parameter {unknown[0]!r} is not a setting of RunConfig")
    lists = {"tasks": str, "categorical": str, "numeric": str, "exclude": str, "hidden": int, "tower": int}
    parsed = {}
    for key, value in flags.items():
        if key in lists and value is not None:
            value = parse_list(f"--{key.replace('_', '-')}", value, lists[key])
        if key == "task_weights" and value is not None:
            value = parse_pairs("--task-weights", value)
        if key in ("task_type", "target_transform") and value is not None:  # repeatable, each a list of pairs
            value = {k: v for each in value for k, v in parse_pairs(f"--{key.replace('_', '-')}", each, str).items()}
        parsed[key] = value
    return parsed


def _resolve(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults < TOML file < flags."""
    config = RunConfig()
    if config_file is not None:
        config = config.updated(read_toml(config_file))
    return config.updated(flags)


@app.command()
@reports_errors
def fit(
    data: Annotated[Path | None, typer.Argument(help="Training data: a CSV or Parquet file, or a directory or "
                                                     "glob of Parquet files.",
                                                show_default=False)] = None,
    tasks: TasksOpt = None,
    main_task: MainTaskOpt = None,
    model: Annotated[str | None, typer.Option(help=_help(f"{' | '.join(MODELS)}.", "model"))] = None,
    balance: Annotated[str | None, typer.Option(help=_help(f"{' | '.join(BALANCERS)}.", "balance"))] = None,
    balance_level: Annotated[str | None, typer.Option(help=_help(
        "Where a gradient balancer combines the tasks' gradients: parameters (each task's gradient of the shared "
        "parameters, one trunk backward per task) | representation (at the trunk's outputs, one trunk "
        "backward).", "balance_level"))] = None,
    relax_factor: Annotated[float | None, typer.Option(help=_help("MetaBalance relax factor r in [0, 1).",
                                                                 "relax_factor"))] = None,
    beta: Annotated[float | None, typer.Option(help=_help("MetaBalance moving-average factor in [0, 1).",
                                                          "beta"))] = None,
    strategy: Annotated[str | None, typer.Option(help=_help(f"MetaBalance: {' | '.join(STRATEGIES)}.",
                                                            "strategy"))] = None,
    task_weights: Annotated[str | None, typer.Option(help="Static loss weights before any balancer, e.g. "
                                                          "purchase=1,click=0.3 (default 1 each).")] = None,
    temperature: Annotated[float | None, typer.Option(help=_help("DWA's temperature T.", "temperature"))] = None,
    famo_lr: Annotated[float | None, typer.Option(help=_help("FAMO's learning rate for its task logits.",
                                                             "famo_lr"))] = None,
    famo_decay: Annotated[float | None, typer.Option(help=_help("FAMO's weight decay on its task logits.",
                                                                "famo_decay"))] = None,
    gradnorm_alpha: Annotated[float | None, typer.Option(help=_help("GradNorm's asymmetry α.",
                                                                    "gradnorm_alpha"))] = None,
    mgda_normalization: Annotated[str | None, typer.Option(help=_help(
        f"MGDA's gradient normalisation before the min-norm problem: {' | '.join(NORMALIZATIONS)}.",
        "mgda_normalization"))] = None,
    cagrad_c: Annotated[float | None, typer.Option(help=_help(
        "CAGrad's c in [0, 1): how far from the average gradient, in units of its norm.", "cagrad_c"))] = None,
    nash_update_weights_every: Annotated[int | None, typer.Option(help=_help(
        "Nash-MTL solves for its weights every N steps.", "nash_update_weights_every"))] = None,
    nash_max_norm: Annotated[float | None, typer.Option(help=_help(
        "Nash-MTL clips the combined shared gradient to this norm (0: no clipping).", "nash_max_norm"))] = None,
    db_mtl_beta: Annotated[float | None, typer.Option(help=_help("DB-MTL's moving-average factor β in [0, 1).",
                                                                 "db_mtl_beta"))] = None,
    db_mtl_beta_sigma: Annotated[float | None, typer.Option(help=_help(
        "DB-MTL's decay σ of that factor: β / step^σ.", "db_mtl_beta_sigma"))] = None,
    gradvac_beta: Annotated[float | None, typer.Option(help=_help(
        "GradVac's moving-average rate β in [0, 1) of its target cosines.", "gradvac_beta"))] = None,
    famo_same_batch: Annotated[bool | None, typer.Option("--famo-same-batch/--famo-next-batch",
                                                         help="FAMO's logit update from the batch scored again "
                                                              "after the step (the reference code; one more "
                                                              "forward) or from the next batch's losses "
                                                              "(default).")] = None,
    embed_dim: Annotated[int | None, typer.Option(help=_help("Embedding size per categorical column.",
                                                             "embed_dim"))] = None,
    hidden: Annotated[str | None, typer.Option(help=_help("Shared bottom / each expert's layer sizes.",
                                                          "hidden"))] = None,
    experts: Annotated[int | None, typer.Option(help=_help("MMoE's experts; PLE's shared experts per level.",
                                                           "experts"))] = None,
    task_experts: Annotated[int | None, typer.Option(help=_help("PLE's experts per task per level.",
                                                                "task_experts"))] = None,
    levels: Annotated[int | None, typer.Option(help=_help("PLE's extraction levels.", "levels"))] = None,
    funnel: Annotated[bool | None, typer.Option("--funnel/--no-funnel",
                                                help="ESMM's entire-space funnel: --tasks in order are stages (each "
                                                     "implies the one before), each tower predicts its stage given "
                                                     "the one before and each task's probability is the product "
                                                     "down the funnel (always on for --model esmm; --model aitm "
                                                     "is a funnel of its own).")] = None,
    tower: Annotated[str | None, typer.Option(help=_help("Tower hidden sizes (empty for none).", "tower"))] = None,
    dropout: Annotated[float | None, typer.Option(help=_help("Dropout in [0, 1).", "dropout"))] = None,
    norm: Annotated[str | None, typer.Option(help=_help(f"Hidden-layer normalisation: {' | '.join(NORMS)}.",
                                                        "norm"))] = None,
    pooling: Annotated[str | None, typer.Option(help=_help("How a bag's (list column's) element embeddings "
                                                           "become one: mean | sum.", "pooling"))] = None,
    calibrator_weight: Annotated[float | None, typer.Option(help=_help(
        "AITM's calibrator: weight of the penalty on a stage's probability above the stage before it.",
        "calibrator_weight"))] = None,
    epochs: Annotated[int | None, typer.Option(help=_help("Maximum epochs.", "epochs"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_help("Rows per step.", "batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate after warm-up (default: 0.01, scaled down "
                                                  "linearly for global batches under 1024 rows).")] = None,
    schedule: Annotated[str | None, typer.Option(help=_help("Learning rate after warm-up: constant | cosine "
                                                            "(down to 0 at the last epoch).", "schedule"))] = None,
    warmup: Annotated[float | None, typer.Option(help=_help("Epochs of linear learning-rate warm-up.",
                                                            "warmup"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_help("Adam weight decay.", "weight_decay"))] = None,
    table_optimizer: Annotated[str | None, typer.Option(help=_help(
        f"The embedding table's optimizer: {' | '.join(TABLE_OPTIMIZERS)} (adam moves every row each step; the "
        "others only the rows a batch touched, so a step's cost follows the batch, not the vocabulary).",
        "table_optimizer"))] = None,
    table_lr: Annotated[float | None, typer.Option(help="The embedding table's peak learning rate under lazy-adam or "
                                                        "rowwise-adagrad, on the same schedule (default: --lr's).")
                        ] = None,
    seed: Annotated[int | None, typer.Option(help=_help("Seed for split, init and shuffling.", "seed"))] = None,
    shuffle: Annotated[bool | None, typer.Option("--shuffle/--no-shuffle",
                                                 help=_help("Shuffle the training rows every epoch; off: file "
                                                            "order.", "shuffle"))] = None,
    valid: Annotated[Path | None, typer.Option(help="Validation file (else a held-out fraction).")] = None,
    valid_fraction: Annotated[float | None, typer.Option(help=_help("Held-out share when no --valid.",
                                                                    "valid_fraction"))] = None,
    patience: Annotated[int | None, typer.Option(help=_help("Epochs without main-task validation gain (in "
                                                            "--monitor) before stopping; 0 = off.",
                                                            "patience"))] = None,
    monitor: Annotated[str | None, typer.Option(help=f"Main-task validation metric that picks the best epoch: "
                                                     f"{' | '.join(monitors())} (default: auc for a binary main "
                                                     "task, rmse for a regression one).")] = None,
    task_type: TaskTypeOpt = None,
    target_transform: Annotated[list[str] | None, typer.Option(
        help=f"TASK=TRANSFORM, what a regression task learns: {' | '.join(TRANSFORMS)} (repeatable; default: log1p, "
        "then standardised, where its training labels have no negative value, else standardize); predictions "
        "come back in the column's units.", show_default=False)] = None,
    regression_loss: Annotated[str | None, typer.Option(help=_help(
        f"Every regression task's loss on its transformed target: {' | '.join(LOSSES)}.", "regression_loss"))] = None,
    missing_labels: Annotated[str | None, typer.Option(help=_help(
        "A missing (null) label: error | skip (the row counts for a task only where its label is present).",
        "missing_labels"))] = None,
    weight_column: WeightColumnOpt = None,
    group_by: GroupByOpt = None,
    tensorboard: Annotated[bool | None, typer.Option("--tensorboard/--no-tensorboard",
                                                     help=_help("Write TensorBoard event files under "
                                                                "RUN/tensorboard (pip install "
                                                                "'mbtrain[tensorboard]').",
                                                                "tensorboard"))] = None,
    categorical: CategoricalOpt = None,
    numeric: NumericOpt = None,
    exclude: ExcludeOpt = None,
    min_frequency: Annotated[int | None, typer.Option(help=_help("Categories seen fewer times in training map "
                                                                 "to 'unknown'.", "min_frequency"))] = None,
    max_vocab: MaxVocabOpt = None,
    max_bag: MaxBagOpt = None,
    memory_budget: Annotated[str | None, typer.Option(help=_help("Memory for the data (e.g. 8G); bigger Parquet "
                                                                 "data is streamed. auto = half of RAM.",
                                                                 "memory_budget"))] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<timestamp>).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out run (only once training ends).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the --out run from checkpoints/last.pt.")] = False,
    config: ConfigOpt = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: torch's choice).")] = None,
    device: Annotated[str | None, typer.Option(help=_help("auto (a GPU where there is one) | cpu | cuda.",
                                                          "device"))] = None,
    checkpoint_every: Annotated[str | None, typer.Option(
        help="Write checkpoints/last.pt inside an epoch too, to resume at the next batch: every N training steps "
        "(5000) or every duration of training (90s, 15m, 2h) (default: at each epoch's end only).")] = None,
    validate_every: Annotated[int | None, typer.Option(
        help="Validate every N training steps inside an epoch too: a history row, best.pt and --patience (which "
        "then counts validations) on a step schedule; --epochs 1 --validate-every 5000 is the one-pass recipe "
        "(default: at each epoch's end only).")] = None,
    task_backward: Annotated[str | None, typer.Option(help=_help(
        "loop | batched: a per-task-gradient balancer's backward passes task by task, or as one backward "
        "stacked over the tasks (the same gradients; faster on a GPU, not on a small CPU).", "task_backward"))] = None,
) -> None:
    """Train a multi-task model and write a run directory (checkpoints, history, metrics)."""
    settings = {key: value for key, value in locals().items() if key not in FIT_ONLY}  # every setting's flag
    settings["valid"] = str(valid) if valid else None
    flags = _overrides(**settings)
    from mbtrain.train import fit as fit_run

    if resume and overwrite:
        raise MbtrainError("--resume and --overwrite contradict each other: pick one")
    if resume:
        if out is None:
            raise MbtrainError("--resume needs --out, the run directory to continue")
        run_config, data = _resumed(out, config, flags, data)
    else:
        if data is None:
            raise MbtrainError("missing DATA: give the training file, e.g. mbtrain fit data.parquet --tasks a,b")
        run_config = _resolve(config, flags)
        out = out or Path("runs") / (torchrun_job() or datetime.now().strftime("%Y%m%d-%H%M%S"))  # ranks agree
    run_config.validate()
    try:
        fit_run(run_config, data, out, overwrite=overwrite, resume=resume, console=console)
    except KeyboardInterrupt as exc:
        raise _fail(str(exc) or "interrupted", 130) from None


def _resumed(out: Path, config_file: Path | None, flags: dict[str, Any],
             data: Path | None) -> tuple[RunConfig, Path]:
    """The saved run's settings, with only the RESUMABLE ones taken from flags and --config."""
    import json

    record = out / "config.json"
    if not record.is_file():
        raise MbtrainError(f"--resume: {out} is not an mbtrain run directory (no config.json)")
    try:
        run_config, saved_data = from_run_record(json.loads(record.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MbtrainError(f"--resume: {record} is corrupt ({type(exc).__name__}: {exc})") from None
    changes = read_toml(config_file) if config_file else {}
    changes.update({k: v for k, v in flags.items() if v is not None})
    ignored = sorted(set(changes) - RESUMABLE)
    if ignored:
        sys.stderr.write(f"mbtrain: warning: --resume keeps the run's saved settings; ignoring "
                         f"{', '.join('--' + k.replace('_', '-') for k in ignored)}\n")
    run_config = run_config.updated({k: v for k, v in changes.items() if k in RESUMABLE})
    return run_config, data or saved_data


@app.command()
@reports_errors
def inspect(
    data: Annotated[Path, typer.Argument(help="A CSV or Parquet file, or a directory or glob of Parquet files.",
                                         show_default=False)],
    tasks: TasksOpt = None,
    main_task: MainTaskOpt = None,
    categorical: CategoricalOpt = None,
    numeric: NumericOpt = None,
    exclude: ExcludeOpt = None,
    config: ConfigOpt = None,
    memory_budget: Annotated[str | None, typer.Option(help="As for fit: bigger Parquet data is streamed.")] = None,
    funnel: Annotated[bool | None, typer.Option("--funnel/--no-funnel",
                                                help="As for fit: --tasks in order are a funnel; also shows each "
                                                     "stage's rate given the one before, and rows that break "
                                                     "it.")] = None,
    max_vocab: MaxVocabOpt = None,
    min_frequency: Annotated[int | None, typer.Option(help="As for fit, with --max-vocab.")] = None,
    max_bag: MaxBagOpt = None,
    task_type: TaskTypeOpt = None,
    weight_column: WeightColumnOpt = None,
) -> None:
    """Show the role fit would give every column (label, categorical, numeric, excluded) and each task's type; no
    training."""
    from mbtrain.data.prepare import describe
    from mbtrain.models.funnel import conditional_probabilities
    from mbtrain.report import bag_lines, schema_table, table_text

    run_config = _resolve(config, _overrides(tasks=tasks, main_task=main_task, categorical=categorical,
                                             numeric=numeric, exclude=exclude, memory_budget=memory_budget,
                                             funnel=funnel, max_vocab=max_vocab, min_frequency=min_frequency,
                                             max_bag=max_bag, task_type=task_type, weight_column=weight_column))
    run_config.validate()
    seen = describe(run_config, data)
    schema = seen.schema
    console.print(schema_table(schema, f"{data}: {seen.rows:,} rows, {len(schema.columns)} columns"))
    for line in bag_lines(schema, run_config.data.max_bag):
        console.print(line, soft_wrap=True)
    for line in _task_lines(seen):
        console.print(line, soft_wrap=True)
    stages = run_config.funnel_tasks
    if stages is not None and seen.broken is None:
        given = conditional_probabilities(seen.sums.mean().float(), [schema.tasks.index(task) for task in stages])
        steps = ", ".join(f"{task} | {before} {float(given[schema.tasks.index(task)]):.2%}"
                          for before, task in zip(stages, stages[1:], strict=False))
        console.print(f"funnel {' → '.join(stages)}: {steps}", soft_wrap=True)
    for name, (values, rows) in seen.capped.items():
        if values and name in schema.bags:
            console.print(f"--max-vocab {run_config.data.max_vocab:,}: bag {name} drops {values:,} elements, whose "
                          f"{rows:,} occurrences map to unknown", soft_wrap=True)
        elif values:
            console.print(f"--max-vocab {run_config.data.max_vocab:,}: {name} drops {values:,} values, whose "
                          f"{rows:,} rows ({rows / seen.rows:.1%}) map to unknown", soft_wrap=True)
    console.print(f"{table_text(seen.table, run_config.model.embed_dim, run_config.train.table_optimizer)} "
                  "(vocabularies over every row here; fit's, over its training rows, may be a little smaller)",
                  soft_wrap=True)
    if seen.broken is not None:
        sys.stderr.write(f"mbtrain: warning: {seen.broken}; fit refuses them\n")


def _task_lines(seen: Any) -> list[str]:
    """Each task's type and why, its positive rate or mean, and the share of rows that have its label."""
    lines = []
    means, counts = seen.sums.mean().tolist(), seen.sums.rows.tolist()
    for i, (task, kind) in enumerate(zip(seen.schema.tasks, seen.types, strict=True)):
        classes = seen.states[i].get("classes")
        value = (f"positive rate {means[i]:.2%}" if kind == "binary" else f"mean {means[i]:.4g}" if classes is None
                 else f"{len(classes)} classes ({', '.join(map(str, classes[:8]))}{', …' if len(classes) > 8 else ''})")
        coverage = counts[i] / seen.rows if seen.rows else 0.0
        covered = "every row" if counts[i] == seen.rows else f"{coverage:.1%} of rows ({int(counts[i]):,})"
        main = " (main)" if i == 0 else ""
        lines.append(f"task {task}{main}: {kind} ({seen.type_reasons[task]}), {value}, labelled on {covered}")
    return lines


@app.command(name="eval")
@reports_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory, checkpoint or exported model.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="Labelled CSV or Parquet file.", show_default=False)],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the metrics as JSON here.")] = None,
    group_by: GroupByOpt = None,
    weighted_metrics: Annotated[bool, typer.Option(
        "--weighted-metrics", help="Weigh each row by the run's --weight-column (or --weight-column's): a row of "
        "weight w counts as w copies of it. Off: every row counts once.")] = False,
    weight_column: Annotated[str | None, typer.Option(
        help="With --weighted-metrics: the column of row weights (default: the one the run trained with).")] = None,
) -> None:
    """Each task's metrics on a labelled file, over the rows that have its label: a binary task's AUC, GAUC (with
    --group-by), PR AUC, log loss, NE and calibration; a regression task's RMSE, MAE, R² and XAUC (GXAUC with
    --group-by), in the column's units; a multiclass task's accuracy, log loss and macro AUC."""
    from mbtrain.checkpoint import check_writable, write_json
    from mbtrain.inference import evaluate as evaluate_file
    from mbtrain.inference import trained_weight_column
    from mbtrain.report import metrics_table

    if json_path is not None:
        check_writable(json_path, "--json")
    if weight_column is not None and not weighted_metrics:
        raise MbtrainError("--weight-column weighs the metrics only with --weighted-metrics")
    if weighted_metrics:
        weight_column = weight_column or trained_weight_column(run)
        if weight_column is None:
            raise MbtrainError(f"--weighted-metrics: {run} does not say which column holds the weights; name it with "
                               "--weight-column")
    metrics = evaluate_file(run, data, group_by, weight_column)
    for task, values in metrics["tasks"].items():
        if "auc" in values and values["auc"] is None:
            sys.stderr.write(f"mbtrain: warning: {data}: task {task!r} has a single class; its AUC is null\n")
    if json_path is not None:
        write_json(metrics, json_path, "--json")
    weighted = f", rows weighted by {weight_column}" if weight_column else ""
    console.print(metrics_table(metrics, f"{data} scored by {run}{weighted}"))


@app.command()
@reports_errors
def predict(
    model: Annotated[Path, typer.Argument(help="Run directory, checkpoint or exported model.", show_default=False)],
    data: Annotated[Path, typer.Argument(help="CSV or Parquet file to score.", show_default=False)],
    output: Annotated[Path, typer.Option(help="Where to write predictions (.csv or .parquet).")],
    keep: Annotated[str | None, typer.Option(help="Input columns to copy beside the predictions.")] = None,
    conditional: Annotated[bool, typer.Option(help="Funnel models: also a cond_<task> column per task, its "
                                                   "probability given the funnel stage before it.")] = False,
) -> None:
    """Write one pred_<task> probability column per task, rows in input order."""
    from mbtrain.data.io import check_table_output, write_table
    from mbtrain.inference import predict as predict_file

    check_table_output(output)
    predictions = predict_file(model, data, parse_list("--keep", keep) or [], conditional)
    write_table(predictions, output)
    console.print(f"wrote {predictions.height:,} rows × {predictions.width} columns to {output}")


@app.command()
@reports_errors
def export(
    run: Annotated[Path, typer.Argument(help="Run directory to export (its best checkpoint).", show_default=False)],
    output: Annotated[Path, typer.Option(help="The exported file, e.g. model.pt.")],
    format: Annotated[str, typer.Option(help="torchscript | onnx (pip install 'mbtrain[onnx]').")] = "torchscript",
) -> None:
    """Write one self-contained TorchScript (or ONNX) file with the preprocessing spec embedded as mbtrain.json."""
    from mbtrain.export import export as export_run

    result = export_run(run, output, format)
    console.print(f"exported {', '.join(result['tasks'])} to {output} ({result['format']}; checked on "
                  f"{result['checked_rows']} rows, max relative difference {result['max_difference']:.1e})")


@app.command()
@reports_errors
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run directories or globs, e.g. 'runs/*'.", show_default=False)],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the comparison as JSON here.")] = None,
    baseline: Annotated[str | None, typer.Option(help="KEY=VALUE, e.g. balance=none: every other row's "
                                                      "validation metrics against the runs with that setting, "
                                                      "paired by seed, with a 95 % interval.")] = None,
) -> None:
    """One table of runs side by side: the settings that differ, best-epoch metrics, seconds per epoch; runs
    that differ only in --seed are one row (mean ± std over n seeds)."""
    from mbtrain.checkpoint import check_writable, write_json
    from mbtrain.compare import compare_runs, comparison_table

    if json_path is not None:
        check_writable(json_path, "--json")
    comparison = compare_runs(runs, baseline)
    for line in comparison.skipped:
        sys.stderr.write(f"mbtrain: warning: {line}\n")
    if json_path is not None:
        write_json(comparison.to_dict(), json_path, "--json")
    console.print(comparison_table(comparison))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@reports_errors
def sweep(
    context: typer.Context,
    data: Annotated[Path | None, typer.Argument(help="Data as for fit: every seed splits it into training, "
                                                     "validation and test rows.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="The sweep folder: splits, runs/, sweep.json, sweep.png.")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds 0..N-1, each its own split of the rows (default: 5; "
                                                   "or --seed 0,1,2).")] = None,
    test: Annotated[Path | None, typer.Option(help="Test rows from this file (else a seeded --test-fraction).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Share of the rows held out for the test, per seed.")] = 0.2,
    split_time: Annotated[str | None, typer.Option(help="Hold out by time: the test rows are the latest by this "
                                                        "column, validation the ones before; one split every seed "
                                                        "shares.")] = None,
    split_group: Annotated[str | None, typer.Option(help="Hold out whole groups of this column (a user's rows in "
                                                         "one part), seeded per seed.")] = None,
    baseline: Annotated[str | None, typer.Option(help="The method the others are compared with (default: the "
                                                      "first of --balance).")] = None,
    jobs: Annotated[int, typer.Option(help="Fits at once; the CPU threads are shared between them.")] = 1,
    plan: Annotated[bool, typer.Option(help="Write SWEEP/plan.txt, one `mbtrain fit` command per run still to "
                                            "do, for your scheduler; then `--report SWEEP`.")] = False,
    report: Annotated[Path | None, typer.Option(help="Print the report of this sweep folder again (from what has "
                                                     "finished).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different sweep in --out.")] = False,
    trials: Annotated[int | None, typer.Option(help="Tune each method on N trials of Optuna's TPE (on the first "
                                                    "seed's rows; ranges such as --lr 0.001:0.03:log, else each "
                                                    "method's default space), then run its best on every seed. "
                                                    "Needs the tune extra.", show_default=False)] = None,
    storage: Annotated[str | None, typer.Option(help="Where --trials keeps its studies, shared by every process "
                                                     "given the same --out: a journal file's path, or a database "
                                                     "URL (sqlite:///..., postgresql://...). Default: "
                                                     "SWEEP/study.journal.", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Does balancing help on my data? Any fit flag may be a list (--balance none,metabalance --lr 0.01,0.003
    --seeds 5 ...): every method is tuned on validation, seed by seed, and only its chosen run's test rows count;
    methods are compared with the baseline paired by seed, with a 95 % interval."""
    from mbtrain.sweep.protocol import Holdout
    from mbtrain.sweep.recipe import report_again
    from mbtrain.sweep.recipe import sweep as run_sweep

    if report is not None:
        report_again(report, console)
        return
    if data is None or out is None:
        raise MbtrainError("mbtrain sweep needs DATA and --out (or --report SWEEP), e.g. mbtrain sweep data.parquet "
                           "--tasks click,purchase --balance none,metabalance --seeds 5 --out sweep")
    try:
        run_sweep(data, list(context.args), config, seeds, out, Holdout(test, test_fraction, split_time, split_group),
                  baseline, jobs, plan, overwrite, _switches(), console, trials, storage)
    except KeyboardInterrupt as exc:
        raise _fail(str(exc) or "interrupted", 130) from None


def _switches() -> dict[str, tuple[str, bool]]:
    """Every spelling of fit's on/off flags: (the setting, the value it sets)."""
    command = typer.main.get_command(app).commands["fit"]
    switches = {}
    for param in command.params:
        if getattr(param, "is_flag", False) and param.name not in FIT_ONLY:
            switches |= {opt: (param.name, True) for opt in param.opts}
            switches |= {opt: (param.name, False) for opt in param.secondary_opts}
    return switches


def main() -> None:
    app()
