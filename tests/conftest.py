"""Small real models, built in code and written to tmp_path (no downloads, no committed binaries)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.proj(self.embed(x))))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return {"mlp": MLP, "cnn": ConvNet, "tied": TiedLM}[name]()


@pytest.fixture
def mlp() -> nn.Module:
    return make_model("mlp")


@pytest.fixture
def cnn() -> nn.Module:
    return make_model("cnn")


@pytest.fixture
def tied() -> nn.Module:
    return make_model("tied")


@pytest.fixture
def mlp_file(tmp_path: Path, mlp: nn.Module) -> Path:
    """A plain state_dict saved with torch.save."""
    path = tmp_path / "mlp.pt"
    torch.save(mlp.state_dict(), path)
    return path


@pytest.fixture
def checkpoint_file(tmp_path: Path, cnn: nn.Module) -> Path:
    """A training checkpoint: weights, optimizer state with momentum buffers, epoch."""
    opt = torch.optim.Adam(cnn.parameters())
    cnn(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pth"
    torch.save({"model_state_dict": cnn.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture
def tied_file(tmp_path: Path, tied: nn.Module) -> Path:
    path = tmp_path / "tied.pt"
    torch.save(tied.state_dict(), path)
    return path


@pytest.fixture
def session_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile (and so the app's per-session directories) at this test's tmp_path."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root
