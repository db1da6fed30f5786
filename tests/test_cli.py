from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruneapp.cli import main
from pruneapp.formats import ALL_FORMATS, read_weights


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_outputs_and_report(tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "prune", mlp_file, "--sparsity", "0.9", "--out", tmp_path / "o")
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert len(report["outputs"]) == len(ALL_FORMATS)
    assert {"path", "bytes"} <= report["input"].keys()
    assert report["sparsity"]["target"] == 0.9
    assert report["torch_prune_before_remove_bytes"] > report["input"]["bytes"]
    for o in report["outputs"]:
        assert (tmp_path / "o" / o["path"]).stat().st_size == o["bytes"]
    assert "smallest" in out
    assert "[  0%] load: mlp.pt" in err
    assert "warning: 'fc2.weight' was pruned to 100%" in err


def test_formats_option_limits_the_outputs(tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    code, _, err = run(capsys, "prune", mlp_file, "--formats", "dense,csr", "--out", out, "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["mlp.csr.pt", "mlp.pruned.pt", "report.json"]
    assert all(line.startswith("warning: ") for line in err.splitlines())


def test_nm_sparsity_is_implied_by_the_pattern(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "prune", mlp_file, "--method", "n:m", "--nm", "2:4", "--out", tmp_path, "--json")
    assert code == 0, err
    assert json.loads(out)["sparsity"]["achieved"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.5"], "sparsity"),
        (["--method", "magic"], "invalid choice"),
        (["--nm", "two:four"], "--nm"),
        (["--formats", "dense,gif"], "gif"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    try:
        code, _, err = run(capsys, "prune", mlp_file, "--out", tmp_path / "o", *args)
    except SystemExit as exc:  # argparse's own errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in err


def test_bad_input_file_exits_2_and_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_text("these are not weights\n")
    code, _, err = run(capsys, "prune", bad, "--out", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert bad.read_text() == "these are not weights\n"


def test_existing_outputs_need_force(tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "prune", mlp_file, "--out", tmp_path, "--formats", "dense")[0] == 0
    code, _, err = run(capsys, "prune", mlp_file, "--out", tmp_path, "--formats", "dense")
    assert code == 2 and "--force" in err.strip().splitlines()[-1]
    assert run(capsys, "prune", mlp_file, "--out", tmp_path, "--formats", "dense", "--force")[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without this GPU")
def test_unavailable_device_is_a_clear_error(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "prune", mlp_file, "--device", "cuda:7", "--out", tmp_path)
    assert code == 2 and "cuda" in err.strip().splitlines()[-1]


def test_inspect_json(checkpoint_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "inspect", checkpoint_file, "--json")
    info = json.loads(out)
    assert code == 0 and info["structure"] == "checkpoint" and "optimizer" in info["extra_bytes"]


def test_unpack_turns_each_output_into_a_plain_state_dict(
    tmp_path: Path, checkpoint_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "prune", checkpoint_file, "--out", tmp_path / "o", "--quiet")[0] == 0
    expected = read_weights(tmp_path / "o" / "ckpt.pruned.pt")
    for path in (tmp_path / "o").glob("ckpt.*"):
        target = tmp_path / f"{path.name}.unpacked.pt"
        assert run(capsys, "unpack", path, "-o", target)[0] == 0
        got = torch.load(target, weights_only=True)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_unpack_never_overwrites_its_input(tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = mlp_file.read_bytes()
    code, _, err = run(capsys, "unpack", mlp_file, "-o", mlp_file, "--force")
    assert code == 2 and "input" in err
    assert mlp_file.read_bytes() == before


def test_module_entry_point_runs_as_users_run_it(tmp_path: Path, mlp_file: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pruneapp", "prune", str(mlp_file), "--out", str(tmp_path), "--formats", "csr.zst"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mlp.csr.pt.zst").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "pruneapp", "inspect", str(tmp_path / "missing.pt")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in bad.stderr


def test_auto_keeps_only_the_smallest_output(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "prune", mlp_file, "--formats", "auto", "--out", tmp_path / "o", "--json")
    assert code == 0, err
    report = json.loads(out)
    (kept,) = report["outputs"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted([kept["path"], "report.json"])
    assert (tmp_path / "o" / kept["path"]).stat().st_size == kept["bytes"]
    everything = json.loads(run(capsys, "prune", mlp_file, "--out", tmp_path / "all", "--json")[1])
    assert kept["bytes"] == min(o["bytes"] for o in everything["outputs"])


def test_settings_are_checked_before_the_output_folder_is_made(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for args in (["--zstd-level", "99"], ["--method", "n:m", "--nm", "3:2"], ["--sparsity", "1.0"]):
        code, _, err = run(capsys, "prune", mlp_file, "--out", tmp_path / "o", *args)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")
        assert not (tmp_path / "o").exists()


def test_unwritable_output_is_an_error_line_not_a_traceback(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "prune", mlp_file, "--out", blocker / "sub")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")
    for target in (tmp_path, tmp_path / "missing" / "x.pt"):
        code, _, err = run(capsys, "unpack", mlp_file, "-o", target, "--force")
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ")
    assert not list(tmp_path.glob("*.tmp"))


def test_an_input_named_report_json_is_never_overwritten(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "report.json"
    victim.write_bytes(mlp_file.read_bytes())
    code, _, err = run(capsys, "prune", victim, "--out", tmp_path, "--force", "--formats", "dense")
    assert code == 2 and "input" in err.strip().splitlines()[-1]
    assert victim.read_bytes() == mlp_file.read_bytes()


def test_nm_report_records_the_sparsity_its_pattern_implies(
    tmp_path: Path, mlp_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "prune", mlp_file, "--method", "n:m", "--sparsity", "0.9", "--out", tmp_path, "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["sparsity"] == 0.5 and "n:m at 50%" in err
