"""What a pruning run produced, measured on disk: the data the CLI prints and the app plots."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruneapp.pruning import TensorStats

SCHEMA_VERSION = 1


@dataclass
class InputInfo:
    path: str
    bytes: int
    kind: str  # loading.KINDS
    structure: str  # state_dict | checkpoint | safetensors | pickled-module | torchscript
    weights_bytes: int  # bytes of the weight tensors (tied storage counted once)
    extra_bytes: dict[str, int] = field(default_factory=dict)  # non-weight entries
    notes: list[str] = field(default_factory=list)


@dataclass
class OutputSize:
    format: str
    path: str  # relative to the report's directory
    bytes: int
    ratio: float  # bytes / input bytes
    encode_seconds: float
    decode_seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Histogram:
    """Histogram of log10 |w| over the prunable weights before pruning (zeros counted apart)."""

    edges: list[float]
    counts: list[int]
    zeros: int
    threshold: float | None  # magnitude below which weights were pruned (global-l1)


@dataclass
class Report:
    input: InputInfo
    settings: dict[str, Any]
    sparsity_target: float
    sparsity_achieved: float
    outputs: list[OutputSize]
    torch_prune_bytes: int  # file torch.nn.utils.prune saves before prune.remove (orig + mask)
    tensors: list[TensorStats]
    histogram: Histogram
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # load, prune, encode, measure

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {
            "schema": SCHEMA_VERSION,
            "input": d["input"],
            "settings": d["settings"],
            "sparsity": {"target": self.sparsity_target, "achieved": self.sparsity_achieved},
            "outputs": d["outputs"],
            "torch_prune_before_remove_bytes": self.torch_prune_bytes,
            "tensors": d["tensors"],
            "histogram": d["histogram"],
            "warnings": self.warnings,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        tensors = []
        for t in d["tensors"]:
            tensors.append(TensorStats(**{**t, "shape": tuple(t["shape"])}))
        return cls(
            input=InputInfo(**d["input"]),
            settings=d["settings"],
            sparsity_target=d["sparsity"]["target"],
            sparsity_achieved=d["sparsity"]["achieved"],
            outputs=[OutputSize(**o) for o in d["outputs"]],
            torch_prune_bytes=d["torch_prune_before_remove_bytes"],
            tensors=tensors,
            histogram=Histogram(**d["histogram"]),
            warnings=d.get("warnings", []),
            seconds=d.get("seconds", {}),
        )

    @property
    def smallest(self) -> OutputSize | None:
        return min(self.outputs, key=lambda o: o.bytes, default=None)
