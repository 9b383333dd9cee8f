"""Micro-batching under DDP (two gloo CPU processes) updates the weights like one process on the global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import torchrun_two
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("dist_microbatch.py")


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.parametrize("family", ["vit", "gpt_neo"])  # GPT-Neo: decoder-only, padded token labels
def test_two_processes_match_one(tmp_path, family):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(SCRIPT), "--out", str(one), "--micro-batch-size", "8", "--model", family], tmp_path)
    _run(torchrun_two(SCRIPT, "--out", two, "--micro-batch-size", "3", "--model", family), tmp_path)
    reference, distributed = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    start = __import__("mpopt_hf.testing.tiny_models", fromlist=["build_tiny"]).build_tiny(family, dropout=0.0).state_dict()
    assert reference.keys() == distributed.keys()
    assert any(not torch.equal(reference[k], start[k]) for k in reference)  # training moved the weights
    for key in reference:
        assert torch.allclose(reference[key], distributed[key], atol=1e-6), key
