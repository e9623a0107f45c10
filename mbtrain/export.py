"""Export a trained run as one self-contained file; TorchScript today, behind one function for other formats."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from mbtrain.checkpoint import load_checkpoint, run_checkpoint
from mbtrain.errors import MbtrainError
from mbtrain.models.scoring import ModelSpec, Probabilities, ScoringModel, predict_probabilities

SPEC_FILE = "mbtrain.json"
TOLERANCE = 1e-5


def model_from_checkpoint(state: dict[str, Any]) -> tuple[ScoringModel, ModelSpec]:
    spec = ModelSpec.from_dict(state["spec"])
    model = spec.build()
    model.load_state_dict(state["model"])
    return model.eval(), spec


def export(run: Path, output: Path, fmt: str = "torchscript") -> dict[str, Any]:
    """Write the run's best model to `output`, reload it and check it against the eager model on real rows."""
    exporters = {"torchscript": _torchscript}
    if fmt not in exporters:
        raise MbtrainError(f"--format {fmt!r} is not supported: choose one of {', '.join(exporters)}")
    if output.is_dir():
        raise MbtrainError(f"--output {output}: is a directory, give a file name such as model.pt")
    if not output.parent.exists():
        raise MbtrainError(f"--output {output}: directory {output.parent} does not exist")
    state = load_checkpoint(run_checkpoint(run))
    model, spec = model_from_checkpoint(state)
    return exporters[fmt](Probabilities(model).eval(), spec, state["sample"], output)


def _torchscript(module: Probabilities, spec: ModelSpec, sample: dict[str, torch.Tensor],
                 output: Path) -> dict[str, Any]:
    scripted = torch.jit.script(module)
    temporary = output.with_name(f".{output.name}.tmp{os.getpid()}")
    torch.jit.save(scripted, str(temporary), _extra_files={SPEC_FILE: json.dumps(spec.to_dict())})
    try:
        reloaded, _ = load_torchscript(temporary)
        eager = predict_probabilities(module, sample["categorical"], sample["numeric"])
        exported = predict_probabilities(reloaded, sample["categorical"], sample["numeric"])
        difference = float((eager - exported).abs().max()) if eager.numel() else 0.0
        if not difference <= TOLERANCE:
            raise MbtrainError(f"--output {output}: exported model disagrees with the trained one "
                               f"(max difference {difference:.2e}); nothing written")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, output)
    return {"format": "torchscript", "output": str(output), "checked_rows": int(eager.shape[0]),
            "max_abs_difference": difference, "tasks": spec.tasks}


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, ModelSpec]:
    extra = {SPEC_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        spec = ModelSpec.from_dict(json.loads(extra[SPEC_FILE]))
    except Exception as exc:  # damaged archives raise RuntimeError, missing spec JSONDecodeError, ...
        raise MbtrainError(f"{path}: corrupt or not an mbtrain export ({type(exc).__name__})") from None
    return module.eval(), spec
