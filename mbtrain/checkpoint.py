"""Atomic writes (temp file, then rename); what a checkpoint holds, written and read here only; loading of
checkpoints, runs and exports with clear errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mbtrain.errors import MbtrainError, first_line
from mbtrain.models.scoring import ModelSpec, ScoringModel

CHECKPOINT_FORMAT = "mbtrain-checkpoint/1"
TEMPORARY = ".tmp"  # write_atomic's temp file: .NAME.tmpPID beside NAME


def check_writable(path: Path, flag: str = "output") -> None:
    """Fail before any work when `path` cannot be written as a file."""
    if path.is_dir():
        raise MbtrainError(f"{flag} {path}: is a directory, give a file name")
    if not path.parent.is_dir():
        raise MbtrainError(f"{flag} {path}: directory {path.parent} does not exist")


def write_atomic(path: Path, write: Callable[[Path], None], flag: str = "output") -> None:
    """Call `write` on a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    check_writable(path, flag)
    temporary = path.with_name(f".{path.name}{TEMPORARY}{os.getpid()}")
    try:
        write(temporary)
        with temporary.open("rb") as written:  # on disk before it takes the name: a crash leaves old or new
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        raise MbtrainError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
    finally:
        temporary.unlink(missing_ok=True)


def drop_temporaries(folder: Path) -> None:
    """The temp files in `folder` of writes a killed process never finished."""
    for temporary in folder.glob(f".*{TEMPORARY}*"):
        temporary.unlink(missing_ok=True)


def copy_atomic(source: Path, path: Path) -> None:
    """`source`'s bytes as `path`, atomically: best.pt from the last.pt just written, without pickling again."""
    write_atomic(path, lambda temporary: shutil.copyfile(source, temporary))


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda temporary: torch.save({"format": CHECKPOINT_FORMAT, **state}, temporary))


def write_json(data: Any, path: Path, flag: str = "output") -> None:
    write_atomic(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"), flag)


def write_text(path: Path, text: str, flag: str = "output") -> None:
    write_atomic(path, lambda temporary: temporary.write_text(text), flag)


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    write_atomic(path, lambda temporary: temporary.write_text("".join(json.dumps(row) + "\n" for row in rows)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by save_checkpoint; weights_only loading, so a checkpoint cannot run code."""
    if not path.is_file():
        raise MbtrainError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged archive; all mean the same here
        raise MbtrainError(f"{path}: corrupt or unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MbtrainError(f"{path}: not an mbtrain checkpoint")
    return state


RESUME = ("spec", "model", "optimizer", "balancer", "epoch", "best", "bad_epochs", "rng")  # what resuming reads


@dataclass
class Checkpoint:
    """What checkpoints/{last,best}.pt hold: the run's settings and model spec (to rebuild the model and feed it
    raw rows), the model's, optimizer's and balancer's states and where training stood (to resume), the RNG
    state (to resume exactly) and a few validation rows (export's self-check). Its keys are a contract: runs
    written by earlier releases resume, evaluate and export from them."""

    config: dict[str, Any]  # RunConfig.to_dict()
    spec: dict[str, Any]  # ModelSpec.to_dict()
    model: dict[str, Any]
    optimizer: dict[str, Any]
    balancer: dict[str, Any]
    epoch: int  # the last finished epoch
    best: dict[str, Any] | None  # the best epoch so far: {"epoch", "score", "metrics"}
    bad_epochs: int  # epochs since the best one, for early stopping
    streamed: bool | None  # whether the data was streamed (None: not recorded, before 0.1): a resumed run keeps its
    # path, and so its validation rows
    rng: torch.Tensor
    sample: dict[str, torch.Tensor] | None  # {"categorical", "numeric"}: a few validation rows
    cuda_rng: torch.Tensor | None = None  # on a GPU
    position: dict[str, Any] | None = None  # a mid-epoch checkpoint's place in epoch `epoch` + 1 (train.Position)
    rank_rngs: list[dict[str, torch.Tensor]] | None = None  # under torchrun: each rank's {"cpu"[, "cuda"]} RNG state
    # (`rng` and `cuda_rng` are rank 0's), so that each rank's dropout resumes where it stood

    def save(self, path: Path) -> None:
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        if state["cuda_rng"] is None:
            del state["cuda_rng"]
        save_checkpoint(state, path)

    @classmethod
    def load(cls, path: Path, needs: tuple[str, ...] = ("spec", "model")) -> Checkpoint:
        """The checkpoint at `path`, refused in one line when it lacks one of `needs` (scoring needs the spec and
        the model, export the sample too, resuming the training state: RESUME); what it lacks besides is None."""
        state = load_checkpoint(path)
        missing = [name for name in needs if name not in state]
        if missing:
            raise MbtrainError(f"{path}: not a complete mbtrain checkpoint (no {missing[0]!r})")
        return cls(**{field.name: state.get(field.name) for field in dataclasses.fields(cls)})

    def model_spec(self, path: Path) -> ModelSpec:
        """The spec to rebuild the model and encode rows for it; `path` names the file in errors."""
        try:
            return ModelSpec.from_dict(self.spec)
        except (KeyError, ValueError, TypeError) as exc:
            raise MbtrainError(f"{path}: checkpoint holds no readable model spec ({type(exc).__name__})") from None

    def scoring_model(self, path: Path) -> tuple[ScoringModel, ModelSpec]:
        """The model in eval mode, and its spec; `path` names the file in errors."""
        spec = self.model_spec(path)
        model = spec.build()
        try:
            model.load_state_dict(self.model)
        except (RuntimeError, KeyError) as exc:
            raise MbtrainError(f"{path}: its weights do not fit its model spec ({first_line(exc)})") from None
        return model.eval(), spec


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The checkpoint file of a run directory (best, else last)."""
    if not run.exists():
        raise MbtrainError(f"{run}: run directory not found")
    if not run.is_dir():
        raise MbtrainError(f"{run}: not a run directory")
    for name in (which, "last"):
        candidate = run / "checkpoints" / f"{name}.pt"
        if candidate.is_file():
            return candidate
    raise MbtrainError(f"{run}: not an mbtrain run (no checkpoints/{which}.pt)")


def is_export(path: Path) -> bool:
    """TorchScript archives made by `mbtrain export` carry the extra file mbtrain.json."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/extra/mbtrain.json") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
