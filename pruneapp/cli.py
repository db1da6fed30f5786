"""Command-line shell over the library: ``python -m pruneapp prune|inspect|unpack|bench``.

Only this module talks to the terminal. Errors from the library are caught once, in ``main``:
the last line on stderr is ``error: <message>`` and the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn, TextIO

import torch

from pruneapp import formats as fmt
from pruneapp import isolation, pipeline, pruning
from pruneapp.errors import OutputExistsError, PruneAppError, SettingsError
from pruneapp.limits import Limits, default_limits
from pruneapp.loading import LoadedModel
from pruneapp.report import Report
from pruneapp.units import human_bytes


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments end with the same ``error: ...`` line as every other failure."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


class StderrProgress:
    """Prints each stage once and then at most every ``interval`` seconds, so long work shows it is alive."""

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.stream, self.interval = stream or sys.stderr, interval
        self._stage, self._last = "", 0.0

    def __call__(self, message: str, fraction: float) -> None:
        stage = message.split(":", 1)[0]
        now = time.monotonic()
        if stage != self._stage or now - self._last >= self.interval:
            self._stage, self._last = stage, now
            print(f"[{fraction:4.0%}] {message}", file=self.stream, flush=True)


def parse_nm(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise SettingsError(f"--nm {text!r} is not a pattern like 2:4; give N:M with whole numbers.") from None
    return n, m


def format_report(report: Report, out_dir: Path) -> str:
    """A short table of what was written, for humans."""
    lines = [
        f"input   {report.input.path}  {human_bytes(report.input.bytes)}  ({report.input.structure})",
        f"sparsity target {report.sparsity_target:.2%}, achieved {report.sparsity_achieved:.2%}",
        f"torch.nn.utils.prune before prune.remove would save {human_bytes(report.torch_prune_bytes)}",
        f"outputs in {out_dir}:",
    ]
    for o in report.outputs:
        lines.append(f"  {o.format:<10} {o.path:<40} {human_bytes(o.bytes):>10}  {o.ratio:6.3f}x of input")
    best = report.smallest
    if best is not None:
        lines.append(f"smallest: {best.path} ({report.input.bytes / max(1, best.bytes):.1f}x smaller)")
    return "\n".join(lines)


def format_inspection(info: pipeline.Inspection) -> str:
    lines = [
        f"file        {info.path}  {human_bytes(info.file_bytes)}",
        f"kind        {info.kind} ({info.structure})",
        f"tensors     {info.n_tensors}, {info.n_params:,} parameters, {human_bytes(info.weights_bytes)} of weights",
        "dtypes      " + ", ".join(f"{k}: {v:,}" for k, v in info.dtypes.items()),
    ]
    for key, n in info.extra_bytes.items():
        lines.append(f"other entry {key!r}: {human_bytes(n)}")
    lines += [f"note        {n}" for n in info.notes]
    return "\n".join(lines)


def _cmd_prune(args: argparse.Namespace) -> int:
    settings = pruning.PruneSettings(
        method=args.method,
        sparsity=args.sparsity,
        nm=parse_nm(args.nm),
        norm=args.norm,
        seed=args.seed,
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        device=args.device,
    )
    report, out_dir = pipeline.prune_file(
        args.input,
        settings,
        out_dir=args.out,
        formats=fmt.parse_formats(args.formats),
        zstd_level=args.zstd_level,
        drop_extras=args.drop_extras,
        force=args.force,
        limits=default_limits(),
        progress=None if args.quiet else StderrProgress(),
        loader=_load_once,
    )
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.to_json() if args.json else format_report(report, out_dir))
    return 0


def _load_once(path: Path, limits: Limits) -> LoadedModel:
    """One isolated load, then the loading server goes: a one-shot command needs its memory back."""
    try:
        return isolation.load_isolated(path, limits)
    finally:
        isolation.shutdown()


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = pipeline.inspect_file(args.file, default_limits())
    print(json.dumps(asdict(info), indent=2) if args.json else format_inspection(info))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    src, dst = Path(args.file), Path(args.output)
    if dst.exists() and dst.resolve() == src.resolve():
        raise SettingsError(f"{dst} is the input file; choose another -o path.")
    if dst.is_dir():
        raise SettingsError(f"{dst} is a folder; give -o a file name such as {dst / 'model.pt'}.")
    if not dst.parent.is_dir():
        raise SettingsError(f"Folder {dst.parent} does not exist; create it or choose another -o path.")
    if dst.exists() and not args.force:
        raise OutputExistsError(f"{dst} already exists; pass --force to overwrite it.")
    weights = fmt.read_weights(src, default_limits())
    with fmt.atomic_path(dst) as tmp:
        torch.save(weights, tmp)
    print(f"wrote {dst} ({len(weights)} tensors, {human_bytes(dst.stat().st_size)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pruneapp", description="Prune PyTorch models into checkpoints that are really smaller.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prune", help="prune a model file and write its outputs and report.json")
    p.add_argument("input", help="model file: .pt/.pth/.bin/.ckpt, .safetensors, TorchScript, ...")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights to zero (default 0.9)")
    p.add_argument(
        "--method",
        choices=pruning.METHODS,
        default="global-l1",
        help=" ".join(f"{m}: {text}" for m, text in pruning.METHOD_HELP.items()),
    )
    p.add_argument("--nm", default="2:4", help="N:M pattern for --method n:m (default 2:4)")
    p.add_argument("--norm", type=int, choices=(1, 2), default=1, help="norm for ln-structured")
    p.add_argument("--seed", type=int, default=0, help="seed for random")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--include", nargs="+", default=[], metavar="GLOB", help="prune only tensors matching")
    p.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="never prune tensors matching")
    p.add_argument(
        "--formats",
        default=",".join(fmt.ALL_FORMATS),
        help=f"comma list of {', '.join(fmt.ALL_FORMATS)} (default: all), or auto: keep only the smallest",
    )
    p.add_argument("--zstd-level", type=int, default=fmt.DEFAULT_ZSTD_LEVEL)
    p.add_argument("--drop-extras", action="store_true", help="leave optimizer state and other entries out")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./pruned/<input stem>/)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--json", action="store_true", help="print report.json instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(run=_cmd_prune)

    p = sub.add_parser("inspect", help="describe a model file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("unpack", help="turn any pruneapp output into a plain state_dict .pt")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=_cmd_unpack)

    sub.add_parser("bench", help="measure speed, memory and sizes against torch (bench --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its arguments
        from pruneapp import bench

        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except PruneAppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, no permission, a path that vanished: the user's to fix
        where = f"{exc.filename}: " if exc.filename else ""
        hint = "check the path, its permissions and free disk space"
        print(f"error: {where}{exc.strerror or exc}; {hint}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
