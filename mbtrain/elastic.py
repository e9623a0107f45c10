"""torchrun's restarts (`--max-restarts`): when a rank dies, torchrun's elastic agent stops the others and starts
the whole group again with the same command line, expecting the script to carry on from its last checkpoint by
itself. A fit finds the run directory its own torchrun job was writing (config.json records the job's id,
TORCHELASTIC_RUN_ID, which torchrun keeps across restarts and draws afresh for each `--standalone` job) and
resumes it; a directory another job wrote stays the error it always was. Rank 0 decides, before this attempt
writes anything, and every rank follows (train.fit).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from mbtrain.config import RunConfig, differing
from mbtrain.errors import MbtrainError

JOB_KEY = "torchrun_job"  # config.json's record of the torchrun job that wrote the run


def torchrun_job() -> str | None:
    """The torchrun job this process belongs to; None outside torchrun, or where the job has no id of its own
    (torchrun's static rendezvous names every job "none")."""
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if job in (None, "", "none") else job


def staging_dir(out: Path) -> Path:
    """Where a fit that replaces an existing run (--overwrite) writes until it ends."""
    return out.parent / f".{out.name}.partial"


@dataclass
class Continuation:
    """How a fit goes on from what its own job left: resume (from the staging directory where `staged`), or
    start over (`overwrite`); `note` says so."""

    resume: bool
    overwrite: bool
    staged: bool
    note: str | None = None


def continuation(out: Path, overwrite: bool, config: RunConfig, data: Path) -> Continuation:
    """What this job's earlier attempt left in --out (or, with --overwrite, its staging directory): a checkpoint of
    the same settings and data to resume, or a run without one to start over; nothing of this job's: the fit as
    asked. A run of this job with other settings is one error line."""
    job = torchrun_job()
    if job is None:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            raise MbtrainError(f"torchrun restarted this fit, but its job has no id to find its run {out} by: start "
                               "torchrun with --standalone or --rdzv-id to have it carry on by itself")
        return Continuation(False, overwrite, False)
    for folder in (staging_dir(out), out) if overwrite else (out,):
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(saved, dict) or saved.get(JOB_KEY) != job:
            continue
        if not (folder / "checkpoints" / "last.pt").is_file():
            return Continuation(False, True, False, f"torchrun restarted this fit before its first checkpoint: "
                                                    f"starting {out} over")
        _check_same_run(folder, saved, config, data)
        return Continuation(True, False, folder != out,
                            f"torchrun restarted this fit: resuming {folder} from its last checkpoint")
    return Continuation(False, overwrite, False)


def _check_same_run(folder: Path, saved: dict, config: RunConfig, data: Path) -> None:
    """The settings and data the run was written with are this fit's, or one error line naming the first that
    differs."""
    record = folder / "config.json"
    try:
        found = differing(saved, config, data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MbtrainError(f"{record}: corrupt ({type(exc).__name__}: {exc})") from None
    if found:
        raise MbtrainError(f"{folder}: torchrun restarted this fit, but the run there was written with another "
                           f"{found[0]}; give another --out")
