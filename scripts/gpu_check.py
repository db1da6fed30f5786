"""GPU check for pruning: the CUDA-only tests, then CPU-vs-GPU bit equality and timings on a larger synthetic model.

Run on a CUDA machine from the repository root: ``python scripts/gpu_check.py``. Exits 1 on any failure.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruneapp.pruning import METHODS, PruneSettings, global_threshold, prune  # noqa: E402


def synthetic(params: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Mixed-dtype weights of about ``params`` elements, with a tied pair and a tensor full of ties."""
    gen = torch.Generator().manual_seed(seed)
    rows = max(8, int((params / 24) ** 0.5) // 8 * 8)
    weights: dict[str, torch.Tensor] = {}
    for i in range(20):
        dtype = (torch.float32, torch.float16, torch.bfloat16, torch.float32)[i % 4]
        weights[f"layer{i}.weight"] = torch.randn(rows, rows, generator=gen).to(dtype)
        weights[f"layer{i}.bias"] = torch.randn(rows, generator=gen)
    weights["conv.weight"] = torch.randn(rows // 4, 16, 3, 3, generator=gen)
    weights["ties.weight"] = torch.randint(-3, 4, (rows, rows), generator=gen).float() / 4
    weights["embed.weight"] = torch.randn(rows * 2, rows, generator=gen)
    weights["head.weight"] = weights["embed.weight"]
    return weights


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    )


def timed(weights: dict[str, torch.Tensor], settings: PruneSettings):
    if settings.device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = prune(weights, settings)
    return result, time.perf_counter() - start


def compare_devices(weights: dict[str, torch.Tensor]) -> bool:
    ok = True
    for method in METHODS:
        settings = PruneSettings(method=method, sparsity=0.8, seed=3)
        cpu, cpu_s = timed(weights, settings)
        gpu, gpu_s = timed(weights, PruneSettings(method=method, sparsity=0.8, seed=3, device="cuda"))
        same = cpu.threshold == gpu.threshold and cpu.warnings == gpu.warnings
        same = same and all(bits_equal(cpu.weights[k], gpu.weights[k]) for k in weights)
        same = same and gpu.weights["head.weight"] is gpu.weights["embed.weight"]
        ok &= same
        print(f"{method:14s} cpu {cpu_s:7.3f}s  cuda {gpu_s:7.3f}s  achieved {gpu.achieved_sparsity:.4f}  equal={same}")
    return ok


def check_threshold_against_kthvalue(weights: dict[str, torch.Tensor]) -> bool:
    """The radix threshold on the GPU against torch.kthvalue of the concatenated magnitudes (fp32 tensors)."""
    tensors = [t.cuda() for k, t in weights.items() if t.dtype == torch.float32 and t.dim() >= 2 and k != "head.weight"]
    threshold, k = global_threshold(tensors, 0.9)
    expected = torch.cat([t.reshape(-1) for t in tensors]).abs().kthvalue(k).values.item()
    print(f"threshold cuda {threshold!r}  kthvalue {expected!r}")
    return threshold == expected


def time_global_l1(params: int) -> None:
    """Wall time of global-l1 at 0.9 on about ``params`` fp32 weights, CPU against CUDA (after one warm-up each)."""
    weights = {f"w{i}": torch.randn(4096, 4096) for i in range(max(1, params // 4096**2))}
    seconds = {}
    for device in ("cpu", "cuda"):
        timed(weights, PruneSettings(sparsity=0.9, device=device))
        seconds[device] = timed(weights, PruneSettings(sparsity=0.9, device=device))[1]
    size = sum(t.numel() for t in weights.values()) / 1e6
    print(f"global-l1 on {size:.0f}M fp32 weights: cpu {seconds['cpu']:.3f}s, cuda {seconds['cuda']:.3f}s")


def run_gpu_tests() -> bool:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-m",
        "gpu",
        "tests/test_pruning.py",
        "-p",
        "no:cacheprovider",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:], sep="")
    return done.returncode == 0 and "skipped" not in done.stdout.splitlines()[-1]


def compare_cli(weights: dict[str, torch.Tensor]) -> bool:
    """``python -m pruneapp prune --device cuda`` against ``--device cpu``: every output reads back equal."""
    from pruneapp.formats import read_weights

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model.pt"
        torch.save(weights, model)
        for method in ("global-l1", "n:m"):
            outs = {}
            for device in ("cpu", "cuda"):
                outs[device] = Path(tmp) / f"{method.replace(':', '')}-{device}"
                command = [sys.executable, "-m", "pruneapp", "prune", str(model), "--method", method]
                command += ["--device", device, "--out", str(outs[device]), "--quiet"]
                start = time.perf_counter()
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                print(f"cli {method} {device}: exit {done.returncode} in {time.perf_counter() - start:.1f}s")
                ok &= done.returncode == 0
                if done.returncode:
                    print(done.stderr[-2000:])
            for path in sorted(outs["cpu"].glob("model.*")):
                a, b = read_weights(path), read_weights(outs["cuda"] / path.name)
                same = a.keys() == b.keys() and all(bits_equal(a[k], b[k]) for k in a)
                print(f"  {path.name}: cpu == cuda {same}")
                ok &= same
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch", torch.__version__)
        return 1
    print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
    results = {"pytest -m gpu": run_gpu_tests()}
    weights = synthetic(24_000_000)
    print(f"synthetic model: {sum(t.numel() for k, t in weights.items() if k != 'head.weight') / 1e6:.1f}M elements")
    results["cpu == cuda"] = compare_devices(weights)
    results["threshold == kthvalue"] = check_threshold_against_kthvalue(weights)
    results["cli cpu == cuda"] = compare_cli(synthetic(2_000_000))
    time_global_l1(100_000_000)
    for name, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
