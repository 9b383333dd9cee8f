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


# GPT-Neo: decoder-only, padded token labels; LoRA: adapters made after DDP wrapped the model, reduced by the
# trainer's own all-reduce, initialised alike on every rank (their seed is the run's, not the global generator)
@pytest.mark.parametrize("family,lora_rank", [("vit", 0), ("gpt_neo", 0), ("vit", 4)])
def test_two_processes_match_one(tmp_path, family, lora_rank):
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--model", family, "--lora-rank", str(lora_rank)]
    _run([sys.executable, str(SCRIPT), "--out", str(one), "--micro-batch-size", "8", *flags], tmp_path)
    _run(torchrun_two(SCRIPT, "--out", two, "--micro-batch-size", "3", *flags), tmp_path)
    reference, distributed = load_file(one / "weights.safetensors"), load_file(two / "weights.safetensors")
    start = __import__("mpopt_hf.testing.tiny_models", fromlist=["build_tiny"]).build_tiny(family, dropout=0.0).state_dict()
    assert reference.keys() == distributed.keys()
    assert not any("lora_" in k for k in reference)  # training ended: adapters merged into the weights
    assert any(not torch.equal(reference[k], start[k]) for k in reference if k in start)  # it trained
    for key in reference:
        assert torch.allclose(reference[key], distributed[key], atol=1e-6), key
