"""torchrun's restarts (`--max-restarts`): when a rank dies, torchrun's elastic agent stops the others and starts
the whole group again with the same command line, expecting the script to carry on from its last checkpoint by
itself. A restarted fit finds the run directory its own torchrun job was writing (config.json records the job's
id, TORCHELASTIC_RUN_ID, which torchrun keeps across restarts and draws afresh for each `--standalone` job) and
resumes it; a directory another job wrote stays the error it always was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

JOB_KEY = "torchrun_job"  # config.json's record of the torchrun job that wrote the run


def torchrun_job() -> str | None:
    """The torchrun job this process belongs to; None outside torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restarted() -> bool:
    """Whether torchrun started this process again after a failure in its group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def staging_dir(out: Path) -> Path:
    """Where a fit that replaces an existing run (--overwrite) writes until it ends."""
    return out.parent / f".{out.name}.partial"


def own_run(out: Path, overwrite: bool) -> Path | None:
    """Under a restart, the directory this torchrun job's earlier attempt was writing: --out, or with --overwrite
    its staging directory; None when not restarted or when neither is this job's."""
    if not restarted():
        return None
    for folder in (staging_dir(out), out) if overwrite else (out,):
        try:
            saved = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and saved.get(JOB_KEY) == torchrun_job():
            return folder
    return None
