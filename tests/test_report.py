from __future__ import annotations

import json
from pathlib import Path

from pruneapp.pruning import TensorStats
from pruneapp.report import Histogram, InputInfo, OutputSize, Report


def make_report() -> Report:
    return Report(
        input=InputInfo(path="m.pt", bytes=1000, kind="torch-zip", structure="state_dict", weights_bytes=900),
        settings={"method": "global-l1", "sparsity": 0.9},
        sparsity_target=0.9,
        sparsity_achieved=0.9,
        outputs=[
            OutputSize("dense", "m.pruned.pt", 1000, 1.0, 0.1, 0.1),
            OutputSize("csr.zst", "m.csr.pt.zst", 150, 0.15, 0.1, 0.1),
        ],
        torch_prune_bytes=1900,
        tensors=[TensorStats("w", (10, 20), "float32", 200, 0, 180, True)],
        histogram=Histogram(edges=[-3.0, -2.0, -1.0], counts=[150, 50], zeros=0, threshold=0.01),
    )


def test_json_has_the_documented_schema_and_round_trips(tmp_path: Path) -> None:
    report = make_report()
    report.write_json(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["input"]["path"] == "m.pt" and data["input"]["bytes"] == 1000
    assert data["outputs"][1] == {
        "format": "csr.zst",
        "path": "m.csr.pt.zst",
        "bytes": 150,
        "ratio": 0.15,
        "encode_seconds": 0.1,
        "decode_seconds": 0.1,
        "notes": [],
    }
    assert data["sparsity"] == {"target": 0.9, "achieved": 0.9}
    assert data["torch_prune_before_remove_bytes"] == 1900
    assert data["tensors"][0]["shape"] == [10, 20]
    assert Report.from_dict(data) == report


def test_smallest_is_the_output_with_fewest_bytes() -> None:
    assert make_report().smallest.format == "csr.zst"
