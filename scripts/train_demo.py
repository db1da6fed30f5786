"""Train the bundled demo model (DigitsCNN on scikit-learn's 8x8 digits) and write it and its test set to assets/.

Deterministic (fixed seeds, one CPU thread) and quick (well under a minute). Needs scikit-learn, which ships the
data set (no download). Run from the repository root: ``.venv/bin/python scripts/train_demo.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruneapp.demo import DEMO_MODEL_PATH, DEMO_TESTSET_PATH, DigitsCNN, evaluate  # noqa: E402

SEED = 0
TEST_SIZE = 360
EPOCHS = 40
BATCH = 64


def load_split() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Stratified train/test split of the 1797 digits; pixels 0..16 scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=TEST_SIZE, random_state=SEED, stratify=digits.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return (
        {"inputs": x[train_idx].contiguous(), "labels": y[train_idx].contiguous()},
        {"inputs": x[test_idx].contiguous(), "labels": y[test_idx].contiguous()},
    )


def train(train_set: dict[str, torch.Tensor]) -> DigitsCNN:
    """Adam with a cosine schedule and light weight decay."""
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    generator = torch.Generator().manual_seed(SEED)
    n = len(train_set["labels"])
    for _ in range(EPOCHS):
        model.train()
        for batch in torch.randperm(n, generator=generator).split(BATCH):
            loss = torch.nn.functional.cross_entropy(model(train_set["inputs"][batch]), train_set["labels"][batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_PATH)
    parser.add_argument("--testset", type=Path, default=DEMO_TESTSET_PATH)
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    train_set, test_set = load_split()
    weights = {k: v.detach().clone() for k, v in train(train_set).state_dict().items()}
    args.model.parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights, args.model)
    torch.save(test_set, args.testset)
    params = sum(t.numel() for t in weights.values())
    print(f"trained in {time.perf_counter() - start:.1f} s: {params} parameters")
    print(f"test accuracy {evaluate(weights, test_set):.4f} on {TEST_SIZE} held-out images")
    print(f"{args.model}: {args.model.stat().st_size} bytes; {args.testset}: {args.testset.stat().st_size} bytes")


if __name__ == "__main__":
    main()
