"""Export a trained run as one self-contained file; TorchScript today, behind one function for other formats.

TorchScript is deprecated upstream in favour of torch.export, but it is still the one format that
loads with plain `torch.jit.load`, batch size free, where mbtrain is not installed; its deprecation
warnings are silenced here, and `export()` dispatches on a format name so another can sit beside it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from mbtrain.checkpoint import check_writable, load_checkpoint, run_checkpoint, write_atomic
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
    check_writable(output, "--output")
    state = load_checkpoint(run_checkpoint(run))
    model, spec = model_from_checkpoint(state)
    return exporters[fmt](Probabilities(model).eval(), spec, state["sample"], output)


def _torchscript(module: Probabilities, spec: ModelSpec, sample: dict[str, torch.Tensor],
                 output: Path) -> dict[str, Any]:
    eager = predict_probabilities(module, sample["categorical"], sample["numeric"])
    check: dict[str, Any] = {}

    def write_checked(temporary: Path) -> None:
        """Save, reload from disk, and refuse the file unless it reproduces the eager model on real rows."""
        with warnings.catch_warnings():  # TorchScript's deprecation notice; see the module docstring
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(module)
            torch.jit.save(scripted, str(temporary), _extra_files={SPEC_FILE: json.dumps(spec.to_dict())})
        reloaded, _ = load_torchscript(temporary)
        with torch.inference_mode():  # through the exported contract: bags as their own tensor
            exported = reloaded(*contract_inputs(spec, sample["categorical"], sample["numeric"]))
        check["difference"] = float((eager - exported).abs().max()) if eager.numel() else 0.0
        if not check["difference"] <= TOLERANCE:
            raise MbtrainError(f"--output {output}: exported model disagrees with the trained one "
                               f"(max difference {check['difference']:.2e}); nothing written")

    write_atomic(output, write_checked, "--output")
    return {"format": "torchscript", "output": str(output), "checked_rows": int(eager.shape[0]),
            "max_abs_difference": check["difference"], "tasks": spec.tasks}


def contract_inputs(spec: ModelSpec, categorical: torch.Tensor, numeric: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exported model's inputs (scoring.INPUTS_DOC) from mbtrain's encoded ones: the bags' slots that follow
    the categorical columns as their own [B, K, L] tensor."""
    bags = len(spec.encoders.bags)
    if not bags:
        return categorical, numeric
    columns = len(spec.encoders.categorical)
    return categorical[:, :columns], numeric, categorical[:, columns:].reshape(categorical.shape[0], bags, -1)


def load_torchscript(path: Path) -> tuple[torch.jit.ScriptModule, ModelSpec]:
    extra = {SPEC_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        spec = ModelSpec.from_dict(json.loads(extra[SPEC_FILE]))
    except Exception as exc:  # damaged archives raise RuntimeError, missing spec JSONDecodeError, ...
        raise MbtrainError(f"{path}: corrupt or not an mbtrain export ({type(exc).__name__})") from None
    return module.eval(), spec
