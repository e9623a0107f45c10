"""Export a trained run as one self-contained file, TorchScript (the default) or ONNX, and load such files.

TorchScript is deprecated upstream in favour of torch.export, but it is still the one format that
loads with plain `torch.jit.load`, batch size free, where mbtrain is not installed; its deprecation
warnings are silenced here. ONNX goes through torch.export (`torch.onnx.export(dynamo=True)`), with the
batch size (and a bags tensor's length) left dynamic and the spec in the model's metadata; it needs the
optional extra `mbtrain[onnx]` (onnx, onnxscript, onnxruntime). Either file is reloaded and checked against
the trained model on real validation rows before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mbtrain.checkpoint import Checkpoint, check_writable, run_checkpoint, write_atomic
from mbtrain.errors import MbtrainError, first_line
from mbtrain.models.scoring import ModelSpec, Predictions, predict_rows

SPEC_FILE = "mbtrain.json"
TOLERANCE = 1e-5  # relative, with a floor of 1: a probability's absolute, a regression in milliseconds' relative


def export(run: Path, output: Path, fmt: str = "torchscript") -> dict[str, Any]:
    """Write the run's best model to `output`, reload it and check it against the eager model on real rows."""
    exporters = {"torchscript": _torchscript, "onnx": _onnx}
    if fmt not in exporters:
        raise MbtrainError(f"--format {fmt!r} is not supported: choose one of {', '.join(exporters)}")
    if fmt == "onnx":
        require_onnx()
    check_writable(output, "--output")
    path = run_checkpoint(run)
    checkpoint = Checkpoint.load(path, needs=("spec", "model", "sample"))
    model, spec = checkpoint.scoring_model(path)
    return exporters[fmt](Predictions(model, spec.task_set).eval(), spec, checkpoint.sample, output)


def _torchscript(module: Predictions, spec: ModelSpec, sample: dict[str, torch.Tensor],
                 output: Path) -> dict[str, Any]:
    eager = predict_rows(module, sample["categorical"], sample["numeric"])
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
        check["difference"] = _difference(output, [(eager, exported)])

    write_atomic(output, write_checked, "--output")
    return {"format": "torchscript", "output": str(output), "checked_rows": int(eager.shape[0]),
            "max_difference": check["difference"], "tasks": spec.tasks}


def _onnx(module: Predictions, spec: ModelSpec, sample: dict[str, torch.Tensor], output: Path) -> dict[str, Any]:
    """The batch size and the bags' length stay dynamic: traced on at least 2 rows and 2 slots (torch.export
    fixes a dimension it sees as 1), checked at the traced length and at a longer one."""
    import onnx

    if not output.name.lower().endswith(".onnx"):
        raise MbtrainError(f"--output {output}: an ONNX export's name must end in .onnx (predict and eval tell the "
                           "formats apart by it)")
    rows = sample["categorical"].shape[0]
    repeat = (torch.arange(max(rows, 2)) % max(rows, 1)) if rows else torch.arange(0)
    inputs = contract_inputs(spec, sample["categorical"][repeat], sample["numeric"][repeat])
    if len(inputs) == 3:
        inputs = (*inputs[:2], F.pad(inputs[2], (0, max(0, 2 - inputs[2].shape[2])), value=-1))
    names = ["categorical", "numeric", "bags"][: len(inputs)]
    batch = torch.export.Dim("batch")
    shapes = {"categorical": {0: batch}, "numeric": {0: batch}, "bags": {0: batch, 2: torch.export.Dim("slots")}}
    checked = [inputs] if len(inputs) == 2 else [inputs, (*inputs[:2], F.pad(inputs[2], (0, 3), value=-1))]
    with torch.inference_mode():
        eager = [module(*each) for each in checked]
    check: dict[str, Any] = {}

    def write_checked(temporary: Path) -> None:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx"):
                warnings.simplefilter("ignore")  # the exporter's progress lines, warnings and log lines
                program = torch.onnx.export(module, inputs, dynamo=True, input_names=names,
                                            output_names=["probabilities"],
                                            dynamic_shapes={name: shapes[name] for name in names})
        except Exception as exc:  # torch.export's and the ONNX translation's many error types
            raise MbtrainError(f"--output {output}: the ONNX exporter failed ({type(exc).__name__}: "
                               f"{first_line(exc)})") from None
        model = program.model_proto
        onnx.helper.set_model_props(model, {SPEC_FILE: json.dumps(spec.to_dict())})
        onnx.save(model, str(temporary))
        session, _ = load_onnx(temporary)
        check["difference"] = _difference(output, [(want, session(*each))
                                                   for each, want in zip(checked, eager, strict=True)])

    write_atomic(output, write_checked, "--output")
    return {"format": "onnx", "output": str(output), "checked_rows": rows,
            "max_difference": check["difference"], "tasks": spec.tasks}


def _difference(output: Path, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest difference between the trained model's and the exported file's outputs, relative to the output's
    size where that is above 1 (a regression in the column's units); past TOLERANCE the file is refused (and
    write_atomic leaves nothing behind)."""
    difference = max((float(((ours - theirs).abs() / ours.abs().clamp(min=1.0)).max()) if ours.numel() else 0.0
                      for ours, theirs in outputs), default=0.0)
    if not difference <= TOLERANCE:
        raise MbtrainError(f"--output {output}: exported model disagrees with the trained one (max difference "
                           f"{difference:.2e}); nothing written")
    return difference


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """The named logger's records below ERROR dropped meanwhile."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def require_onnx() -> None:
    """One clear line where the optional ONNX extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MbtrainError(f"ONNX needs the optional extra: pip install 'mbtrain[onnx]' ({exc.name} is not "
                           "installed)") from None


class OnnxScorer(torch.nn.Module):
    """An exported ONNX model behind the (categorical, numeric) -> probabilities call that eval and predict make,
    run by onnxruntime on the CPU; bags follow the categorical columns as mbtrain encodes them."""

    def __init__(self, session: Any, spec: ModelSpec) -> None:
        super().__init__()
        self.session = session
        self.spec = spec
        self.names = [node.name for node in session.get_inputs()]

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor, *bags: torch.Tensor) -> torch.Tensor:
        inputs = (categorical, numeric, *bags) if bags else contract_inputs(self.spec, categorical, numeric)
        feeds = {name: tensor.contiguous().numpy() for name, tensor in zip(self.names, inputs, strict=True)}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def load_onnx(path: Path) -> tuple[OnnxScorer, ModelSpec]:
    require_onnx()
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        spec = ModelSpec.from_dict(json.loads(session.get_modelmeta().custom_metadata_map[SPEC_FILE]))
    except Exception as exc:  # onnxruntime's own errors, a missing spec (KeyError), ...
        raise MbtrainError(f"{path}: corrupt or not an mbtrain ONNX export ({type(exc).__name__})") from None
    return OnnxScorer(session, spec), spec


def contract_inputs(spec: ModelSpec, categorical: torch.Tensor, numeric: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exported model's inputs (scoring.INPUTS_DOC) from mbtrain's encoded ones: the bags' slots that follow
    the categorical columns as their own [B, K, L] tensor."""
    bags = len(spec.encoders.bags)
    if not bags:
        return categorical, numeric
    columns = len(spec.encoders.categorical)
    width = (categorical.shape[1] - columns) // bags
    return categorical[:, :columns], numeric, categorical[:, columns:].reshape(categorical.shape[0], bags, width)


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
