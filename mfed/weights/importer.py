"""`mfed import-weights`: a pretrained state dict as a federation's round-0 global model.

The checkpoint is a safetensors file (read by mfed's strict codec) or a torch checkpoint read
with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers:
importing never runs code from the file. The model it fills is described like the resources
that will use it (the FederationRound's federation, method and encoder, the SiteTasks' tasks
and decoders), so `check_base` in the operator accepts it for `initialModel.uri`.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mfed.artifacts.manifest import GlobalManifest
from mfed.artifacts.tensorfile import TensorFileError, decode_tensors, sha256_hex
from mfed.fields import FieldError, Fields
from mfed.methods import Method, plan_method
from mfed.spec import ArchSpec, InitSpec, SharingPolicy, SpecError, TaskGroupSpec, TaskSpec
from mfed.weights.mapping import MappingReport, Rule, map_weights


class WeightsError(ValueError):
    """The checkpoint cannot be read or does not fit the model; the message lists why."""


@dataclass(frozen=True)
class ModelConfig:
    """The model a checkpoint fills, in the words of the resources that will train it."""

    federation: str
    method: Method
    encoder: ArchSpec
    sharing: SharingPolicy
    groups: tuple[TaskGroupSpec, ...]

    @classmethod
    def parse(cls, data: object) -> ModelConfig:
        """`{federation, method?, encoder: {name, params, sharing}, tasks: [{task, decoder}]}`:
        `encoder` as in the FederationRound's spec.encoder, each task as in a SiteTask's spec."""
        try:
            f = Fields(data, "")
            f.reject_unknown(["federation", "method", "encoder", "tasks"])
            encoder = f.obj("encoder")
            encoder.reject_unknown(["name", "params", "sharing"])
            try:
                method = Method.parse(f.str("method", "m-fed"))
            except ValueError as exc:
                raise FieldError("method", str(exc)) from None
            tasks = f.raw("tasks")
            if not isinstance(tasks, list) or not tasks:
                raise FieldError(
                    "tasks", "must list the task groups: [{task: {name, type, params}, decoder: {name, params}}]"
                )
            groups = []
            for i, item in enumerate(tasks):
                g = Fields(item, f"tasks[{i}]")
                g.reject_unknown(["task", "decoder"])
                groups.append(
                    TaskGroupSpec(task=TaskSpec.parse(g.obj("task")), decoder=ArchSpec.parse(g.obj("decoder")))
                )
            return cls(
                federation=f.str("federation"),
                method=method,
                encoder=ArchSpec(name=encoder.str("name"), params=encoder.mapping("params")),
                sharing=SharingPolicy.parse(encoder.obj("sharing", required=False)),
                groups=tuple(groups),
            )
        except FieldError as exc:
            raise WeightsError(f"model config: {exc}") from None

    def init_spec(self, *, seed: int, output: str) -> InitSpec:
        """The InitSpec the operator would write for a round of this method (same sharing)."""
        try:
            return InitSpec(
                federation=self.federation,
                encoder=self.encoder,
                groups=self.groups,
                sharing=plan_method(self.method, sharing=self.sharing).sharing,
                seed=seed,
                output=output,
            )
        except SpecError as exc:
            raise WeightsError(f"model config: {exc}") from None


def _to_numpy(value: Any, key: str) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise WeightsError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
    tensor = value.detach().to("cpu")
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.to(torch.float32)  # float16/bfloat16 widen exactly
    return tensor.numpy().copy()


def _walk(obj: Any, key: str | None) -> Any:
    for part in filter(None, (key or "").split("/")):
        if not isinstance(obj, Mapping) or part not in obj:
            keys = ", ".join(sorted(map(str, obj))) if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"--key {key!r}: no entry {part!r} in the checkpoint (it has: {keys})")
        obj = obj[part]
    return obj


def read_torch_checkpoint(data: bytes, key: str | None) -> dict[str, np.ndarray]:
    import torch

    try:
        # weights_only=True: tensors, numbers, strings and plain containers only; never a class
        # or a callable from the file, so a checkpoint cannot run code here.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"torch.load(weights_only=True) refused the checkpoint ({first}): it holds objects other than "
            "tensors and plain containers. Save `model.state_dict()` instead, or convert it to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightsError(f"not a readable torch checkpoint: {type(exc).__name__}: {exc}") from None
    obj = _walk(obj, key)
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"the checkpoint{f' entry {key!r}' if key else ''} is a {type(obj).__name__}, not a state dict"
        )
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise WeightsError(
            f"the checkpoint{f' entry {key!r}' if key else ''} is not a flat state dict: {', '.join(not_tensors[:8])} "
            "are not tensors; pick the state dict inside it with --key (e.g. --key state_dict)"
        )
    return {str(k): _to_numpy(v, str(k)) for k, v in obj.items()}


def read_checkpoint(data: bytes, name: str, key: str | None = None) -> dict[str, np.ndarray]:
    """The state dict in `data`: safetensors when the name ends in .safetensors, else torch."""
    if name.endswith(".safetensors"):
        if key:
            raise WeightsError("--key selects an entry of a torch checkpoint; a safetensors file is one flat dict")
        try:
            return {k: np.array(v) for k, v in decode_tensors(data).tensors.items()}
        except TensorFileError as exc:
            raise WeightsError(f"{name} is not a safetensors file mfed reads: {exc}") from None
    return read_torch_checkpoint(data, key)


@dataclass(frozen=True)
class Imported:
    model_bytes: bytes
    manifest: GlobalManifest
    report: MappingReport


def import_weights(
    spec: InitSpec, state: Mapping[str, np.ndarray], rules: Sequence[Rule], *, source: str, source_sha256: str
) -> Imported:
    """The round-0 global model of `spec` with the mapped checkpoint's tensors in place of the
    seeded ones. Raises WeightsError with the full report when anything does not fit."""
    from mfed.rounds.initial import assemble_global, initial_parts

    parts = initial_parts(spec)
    targets = {key: value.shape for key, value in parts.encoder.items()}
    for task, decoder in parts.decoders.items():
        targets.update({f"tasks.{task}.{key}": value.shape for key, value in decoder.items()})
    values, report = map_weights(state, targets, rules)
    if not report.ok:
        raise WeightsError("the checkpoint does not fit the model:\n" + report.render())
    encoder = {k: values.get(k, v) for k, v in parts.encoder.items()}
    decoders = {
        task: {k: values.get(f"tasks.{task}.{k}", v) for k, v in decoder.items()}
        for task, decoder in parts.decoders.items()
    }
    model_bytes, manifest = assemble_global(
        spec,
        replace(parts, encoder=encoder, decoders=decoders),
        {
            "initSeed": spec.seed,
            "importedFrom": source,
            "importedSha256": source_sha256,
            "importedTensors": len(values),
        },
    )
    return Imported(model_bytes=model_bytes, manifest=manifest, report=report)


def checkpoint_digest(data: bytes) -> str:
    return sha256_hex(data)
