"""The shift is real: a tiny CNN trained on clean digits loses accuracy under most
CIFAR-10-C corruptions at severity 5 (figures for all corruptions: bench/corruption_speed.py --shift)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vision
from vision.arrow import to_arrays


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cnn() -> nn.Module:
    """Three conv-BN-ReLU-pool stages (8/16/32 channels) and a linear head: ~8k parameters."""
    stages = []
    for c_in, c_out in ((3, 8), (8, 16), (16, 32)):
        stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stages, nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x, y = map(torch.from_numpy, to_arrays(vision.load("digits", split="train")))
    net = tiny_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for b in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    return net.eval()


def test_corruptions_hurt_a_clean_model(trained):
    x, y = map(torch.from_numpy, to_arrays(vision.load("digits", split="test")))

    def accuracy(images: torch.Tensor) -> float:
        with torch.no_grad():
            return (trained(images).argmax(1) == y).float().mean().item()

    clean = accuracy(x)
    drops = {c: clean - accuracy(vision.corrupt(x, c, 5, seed=0)) for c in vision.CORRUPTIONS}
    hurt = sorted(c for c, d in drops.items() if d >= 0.03)
    assert clean >= 0.9, f"the clean model should be good first, got {clean:.3f}"
    assert len(hurt) >= 8, f"only {hurt} cost >= 3 points of {clean:.3f}; drops: {drops}"
