"""`mbtrain sweep --trials N`: each method's own search, N trials on the first seed's training and validation rows,
sampled by Optuna's TPE and cut short by its median pruner at each validation (a pruned or failed trial spends
the budget like any other). Each method's best trial is then the configuration its seed runs use (recipe.py).

One Optuna study per method, in a storage that several processes share: a journal file (by default SWEEP/
study.journal; a path on a shared filesystem for several machines) or a database URL. Every process takes trials
until each method has its N (Optuna numbers a study's trials atomically: a trial numbered N or more is surplus,
marked so and never run), and claims.py says which process runs which trial, so that each runs once; a trial whose
process died is taken over and resumed from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from mbtrain.balance.registry import BALANCERS, setting_fields, setting_names
from mbtrain.config import RunConfig, differing, peak_lr
from mbtrain.errors import MbtrainError, first_line
from mbtrain.space import Range, default_space, plain, space_text
from mbtrain.sweep.claims import Claims
from mbtrain.sweep.grid import LEVEL, Grid

if TYPE_CHECKING:
    import optuna

INSTALL = "pip install 'mbtrain[tune]'"
JOURNAL = "study.journal"
TRIALS = "trials"
SURPLUS = "surplus"
SETTINGS = "settings"  # a trial's user attribute: the settings its fit ran with
VALID = "valid"  # and its best main-task validation metric, as --monitor reads (the study's value is higher-better)
GRACE = 60.0  # seconds a running trial may go unclaimed (just asked for) before it counts as abandoned
POLL = 0.5  # seconds between looks at trials other processes are running
LR_SPAN = (10.0, 3.0)  # the default learning-rate range: the default divided by the first, times the second
WEIGHTS = Range(0.05, 1.0, log=True)  # the default range of each auxiliary task's weight (the main task's is 1)

Space = dict[str, Range | tuple[Any, ...]]  # parameter name (a setting, or task_weights.TASK) -> range or choices


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise MbtrainError(f"--trials and --storage need Optuna, the tune extra: {INSTALL}") from None


def search_space(grid: Grid, method: str) -> Space:
    """What the method's trials sample: the ranges and lists given for settings that apply to it, and, for the
    settings given nothing, the default space (docs/sweep.md): the learning rate around its default, each auxiliary
    task's weight (unless the method ignores task weights) and the balancer's own settings (their `tuned` ranges)."""
    balancer = grid.balancer(method)
    kind = BALANCERS[balancer]
    own = {*setting_names(balancer), *([LEVEL] if len(kind.levels) > 1 else [])}
    others = {*setting_fields(), LEVEL}  # other balancers' settings are not this method's to search

    def applies(name: str) -> bool:
        return name in own or name not in others

    lists = {name: values for name, values in {**grid.lists, **grid.variants.get(method, {})}.items()
             if name != "balance"}
    given = {*grid.fixed, *lists, *(name.partition(".")[0] for name in grid.ranges)}
    fixed = RunConfig().updated(grid.fixed)
    space: Space = {}
    if "lr" not in given:
        default = peak_lr(fixed.train)
        space["lr"] = Range(default / LR_SPAN[0], default * LR_SPAN[1], log=True)
    if "task_weights" not in given and not kind.task_weights_ignored:
        space |= {f"task_weights.{task}": WEIGHTS for task in fixed.ordered_tasks[1:]}
    space |= {name: searched for name, searched in default_space(kind.settings_class).items() if name not in given}
    space |= {name: tuple(values) for name, values in lists.items() if len(values) > 1 and applies(name)}
    weights_ignored = bool(kind.task_weights_ignored)
    space |= {name: searched for name, searched in grid.ranges.items()
              if applies(name.partition(".")[0]) and not (name.startswith("task_weights.") and weights_ignored)}
    # the settings every method may share first (the learning rate, then the others), the task weights (which some
    # methods ignore) next, the method's own last: trial k of every method then draws the shared ones alike (TPE's
    # random start-up draws are taken in the order suggested)
    order = sorted(space, key=lambda name: (name.partition(".")[0] in own, name != "lr",
                                            name.startswith("task_weights.")))
    return {name: space[name] for name in order}


def space_line(space: Space) -> str:
    """One line: `lr 0.001:0.03:log, relax_factor 0.3:0.95, strategy both|reduce|enlarge`."""
    return ", ".join(f"{name} {space_text(searched)}" for name, searched in space.items())


def sample(trial: optuna.trial.Trial, space: Space, grid: Grid) -> dict[str, Any]:
    """The trial's settings (a trial taken over gets back the values it was first given)."""
    values: dict[str, Any] = {}
    for name, searched in space.items():
        if isinstance(searched, Range) and searched.integer:
            values[name] = trial.suggest_int(name, int(searched.low), int(searched.high), log=searched.log)
        elif isinstance(searched, Range):
            values[name] = trial.suggest_float(name, searched.low, searched.high, log=searched.log)
        else:
            labels = [plain(choice) for choice in searched]
            values[name] = searched[labels.index(trial.suggest_categorical(name, labels))]
    return _settings(values, grid)


def corners(space: Space, grid: Grid) -> list[dict[str, Any]]:
    """Settings at the ends of every range (all low, all high) and with each choice of every list: what the sweep
    checks before it starts, so that a value a setting cannot take is one line, not N failed trials."""
    def end(searched: Range, at: float) -> float | int:
        return int(at) if searched.integer else at

    low = {name: end(s, s.low) if isinstance(s, Range) else s[0] for name, s in space.items()}
    high = {name: end(s, s.high) if isinstance(s, Range) else s[-1] for name, s in space.items()}
    chosen = [{**low, name: choice} for name, s in space.items() if not isinstance(s, Range) for choice in s]
    return [_settings(values, grid) for values in (low, high, *chosen)]


def _settings(values: dict[str, Any], grid: Grid) -> dict[str, Any]:
    """Parameters as run settings: task_weights.TASK values gathered into task_weights (over the fixed ones)."""
    settings: dict[str, Any] = {}
    for name, value in values.items():
        setting, _, task = name.partition(".")
        if task:
            settings.setdefault(setting, dict(grid.fixed.get(setting, {})))[task] = value
        else:
            settings[setting] = value
    return settings


def open_storage(storage: str | None, out: Path) -> Any:
    """The Optuna storage --storage names: a URL (`://`) is a database, anything else a journal file (None:
    OUT/study.journal); one error line naming --storage where it cannot open."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if storage and "://" in storage:
        try:
            return optuna.storages.RDBStorage(storage)
        except Exception as exc:  # noqa: BLE001 (a bad URL or a missing driver: SQLAlchemy's errors vary)
            raise MbtrainError(f"--storage {storage}: {first_line(exc)}") from None
    path = _file(Path(storage) if storage else out / JOURNAL)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    except OSError as exc:
        raise MbtrainError(f"--storage {path}: {exc.strerror or exc}") from None


def check_storage(storage: str) -> None:
    """One error line for a --storage that cannot open, without making anything: a database is opened (and
    closed), a journal file's folder must be one this process can write in (or make)."""
    sqlite = storage.startswith("sqlite:///")  # a file too: checked as a journal's, not made here
    if "://" in storage and not sqlite:
        open_storage(storage, Path())
        return
    path = _file(Path(storage.removeprefix("sqlite:///")))
    above = next(parent for parent in path.absolute().parents if parent.exists())
    if not above.is_dir() or not os.access(above, os.W_OK):
        raise MbtrainError(f"--storage {path}: {above} is not a folder this process can write in")


def _file(path: Path) -> Path:
    """A storage file's path, or one error line where it names a folder."""
    if path.is_dir():
        raise MbtrainError(f"--storage {path}: is a folder; give a journal file's path or a database URL")
    return path


@dataclass
class Search:
    """Everything a process taking trials needs (--jobs workers get a copy)."""

    out: Path  # the sweep folder
    storage: str | None  # --storage: a journal file's path or a database URL (None: SWEEP/study.journal)
    key: str  # the sweep folder's id (recipe.py): its studies' names, so that sweeps sharing a database never mix
    grid: dict[str, Any]  # Grid.to_dict()
    train: Path  # the first seed's training rows
    valid: Path  # and its validation rows
    seed: int  # the first seed
    spent: dict[str, float] = field(default_factory=lambda: {"tuning_s": 0.0, "fits_s": 0.0})

    @classmethod
    def of(cls, out: Path, storage: str | None, sweep_id: str, grid: Grid, train: Path, valid: Path) -> Search:
        return cls(out, storage, sweep_id, grid.to_dict(), train, valid, grid.seeds[0])

    @property
    def where(self) -> str:
        """Where the studies are kept, as the lines and budget.json name it."""
        return self.storage or str(self.out / JOURNAL)

    @property
    def budget(self) -> int:
        return int(self.grid["trials"])

    def studies(self) -> dict[str, optuna.Study]:
        """Each method's study, made by the first process to ask (seeded TPE, median pruner)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = open_storage(self.storage, self.out)
        # validations count from 1: the earliest a trial is pruned is at its second, not on its first epoch's noise
        pruner = optuna.pruners.MedianPruner(n_startup_trials=max(3, self.budget // 4), n_warmup_steps=2)
        return {method: optuna.create_study(storage=storage, study_name=f"mbtrain-{self.key}-{method}",
                                            direction="maximize", pruner=pruner, load_if_exists=True,
                                            sampler=self.sampler(0))
                for method in self.grid["methods"]}

    def sampler(self, number: int) -> Any:
        """TPE seeded by the sweep's first seed and the trial's number: reproducible in one process, and never the
        same draws in two (which a sampler seeded alike in each would give)."""
        import optuna

        return optuna.samplers.TPESampler(seed=self.seed * 100_003 + number, n_startup_trials=self.startup)

    @property
    def startup(self) -> int:
        """TPE's random trials before it models the others: Optuna's 10, or a third of a smaller budget (at
        least 2), so that a budget of 8 is searched by TPE too, not at random only."""
        return min(10, max(2, self.budget // 3))


def take_trials(search: Search, console: Console) -> Search:
    """Run trials, method by method in the sweep's order, until every method's budget is spent and no other
    process is still running one of its trials; returns `search` with what the tuning and the fits took."""
    grid = Grid(**search.grid)
    claims = Claims.of(search.out)
    started = time.perf_counter()
    studies = search.studies()
    waited, said = 0.0, False
    while True:
        for method in grid.methods:
            trial = _next_trial(studies[method], search, claims, method)
            if trial is not None:
                _run_trial(studies[method], trial, method, grid, search, claims, console)
                break
        else:
            if all(_finished(studies[method], search.budget) for method in grid.methods):
                break
            if not said:
                console.print("waiting for the trials other processes are running", highlight=False)
                said = True
            time.sleep(POLL)
            waited += POLL
    search.spent["tuning_s"] = time.perf_counter() - started - search.spent["fits_s"] - waited
    return search


def _trial_name(method: str, number: int) -> str:
    return f"trial-{method}-{number}"


def _next_trial(study: optuna.Study, search: Search, claims: Claims, method: str) -> optuna.trial.Trial | None:
    """A trial of `method` for this process: one whose process died (taken over), else a new one while the
    budget lasts; None when neither."""
    import optuna

    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.number >= search.budget or SURPLUS in frozen.user_attrs:
            continue
        name = _trial_name(method, frozen.number)
        young = frozen.datetime_start is not None and time.time() - frozen.datetime_start.timestamp() < GRACE
        if (claims.seen(name) or not young) and claims.take(name):
            if _frozen(study, frozen.number).state == optuna.trial.TrialState.RUNNING:
                study.sampler = search.sampler(frozen.number)  # what it had not drawn yet, drawn as it would have been
                return optuna.trial.Trial(study, frozen._trial_id)
            claims.release(name)  # it ended between the look and the claim
    if _asked(study) >= search.budget:
        return None
    trial = study.ask()
    if trial.number >= search.budget:  # another process took the last one first
        trial.set_user_attr(SURPLUS, True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return None
    study.sampler = search.sampler(trial.number)  # sampling happens at suggest time, after this
    if not claims.take(_trial_name(method, trial.number)):  # taken over already (clocks apart by GRACE): theirs
        return None
    return trial


def _frozen(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    """The trial numbered `number` as the storage holds it now."""
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def _asked(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False))


def _finished(study: optuna.Study, budget: int) -> bool:
    """Whether each of the method's `budget` trials has ended (completed, pruned or failed)."""
    return sum(t.number < budget and t.state.is_finished() for t in study.get_trials(deepcopy=False)) >= budget


def _run_trial(study: optuna.Study, trial: optuna.trial.Trial, method: str, grid: Grid, search: Search,
               claims: Claims, console: Console) -> None:
    """Fit the trial on the first seed's rows, reporting each validation to the pruner (by its ordinal, so that
    trials of other batch sizes compare); tell Optuna how it ended."""
    import optuna

    from mbtrain.train import fit, monitor_score

    settings = sample(trial, search_space(grid, method), grid)
    trial.set_user_attr(SETTINGS, settings)
    folder = trial_folder(search.out, method, trial.number)
    config = grid.config(method, settings, search.seed).updated({"valid": str(search.valid)})
    reported = _frozen(study, trial.number).intermediate_values
    pruned: list[int] = []
    ordinal = [len(reported)]  # a resumed trial's validations so far

    def heard(entry: dict[str, Any], score: float) -> bool:
        """Each validation's main-task score to the pruner."""
        ordinal[0] += 1
        if ordinal[0] not in reported and math.isfinite(score):
            trial.report(score, ordinal[0])
        if trial.should_prune():
            pruned.append(entry["step"])
            return True
        return False

    resume = _resumable(folder, config, search.train)
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)  # unstarted, or not this trial's (a study begun afresh)
    fitting = time.perf_counter()
    name, failure = _trial_name(method, trial.number), None
    try:
        metrics = fit(config, search.train, folder, resume=resume, console=Console(quiet=True), on_validation=heard)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 (a trial that fails is a result of the search, not its end)
        failure = f"{type(exc).__name__}: {first_line(exc)}"
    search.spent["fits_s"] += time.perf_counter() - fitting
    heading = f"trial {trial.number + 1}/{search.budget} of {method}"
    if not claims.holds(name):  # another process took it over while this one stood still: its result counts
        console.print(f"{heading}: taken over by another process; this one's result is dropped", markup=False)
        return
    if failure is not None:
        trial.set_user_attr("error", failure)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        outcome = f"failed: {failure}"
    elif pruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        outcome = f"pruned at step {pruned[0]:,}"
    else:
        score = monitor_score(metrics["tasks"][metrics["main_task"]], metrics["monitor"])
        value = metrics["tasks"][metrics["main_task"]].get(metrics["monitor"])
        trial.set_user_attr(VALID, value)
        study.tell(trial, score if math.isfinite(score) else None,
                   state=None if math.isfinite(score) else optuna.trial.TrialState.FAIL)
        outcome = f"{metrics['monitor']} {value:.4f} on validation" if value is not None else "no score"
    claims.release(name)
    console.print(f"{heading}: {outcome} ({settings_text(settings)})", soft_wrap=True, markup=False)


def _resumable(folder: Path, config: RunConfig, data: Path) -> bool:
    """Whether the trial's folder holds a checkpoint of this very trial (its settings and rows) to resume."""
    try:
        record = json.loads((folder / "config.json").read_text())
        return (folder / "checkpoints" / "last.pt").is_file() and not differing(record, config, data)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def trial_folder(out: Path, method: str, number: int) -> Path:
    return out / TRIALS / method / f"{number:03d}"


def settings_text(settings: dict[str, Any]) -> str:
    """`lr 0.003162, task_weights.click 0.2, strategy both`: settings as the report and the trial lines show them."""
    parts = []
    for name, value in settings.items():
        if isinstance(value, dict):
            parts += [f"{name}.{task} {_number(v)}" for task, v in value.items()]
        else:
            parts.append(f"{name} {_number(value)}")
    return ", ".join(parts)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def outcome(search: Search) -> dict[str, Any]:
    """The budget's account, per method: trials completed, pruned and failed, the best trial (its number,
    validation metric and settings; None if none completed) and the best metric after each trial in the order
    asked (None before the first completed one): what sweep.json and the picture's budget panel show."""
    import optuna

    state = optuna.trial.TrialState
    methods = {}
    for method, study in search.studies().items():
        trials = sorted((t for t in study.get_trials(deepcopy=False) if t.number < search.budget),
                        key=lambda t: t.number)
        counted = {name: sum(t.state == kind for t in trials)
                   for name, kind in (("completed", state.COMPLETE), ("pruned", state.PRUNED),
                                      ("failed", state.FAIL), ("running", state.RUNNING))}
        best, curve = None, []
        for t in trials:
            if t.state == state.COMPLETE and (best is None or t.value > best.value):
                best = t
            curve.append(None if best is None else best.user_attrs.get(VALID))
        methods[method] = {**counted, "curve": curve, "best_trial": None if best is None else best.number,
                           "best_value": None if best is None else best.user_attrs.get(VALID),
                           "settings": None if best is None else best.user_attrs.get(SETTINGS, {}),
                           "space": space_line(search_space(Grid(**search.grid), method))}
    return {"trials": search.budget, "storage": search.where, "methods": methods}
