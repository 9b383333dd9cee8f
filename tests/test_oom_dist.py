"""Two gloo processes, only rank 1 runs out of memory: both switch together, nothing hangs, weights stay equal."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from processes import torchrun_two

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_only_rank1_oom_both_ranks_switch_together(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = torchrun_two(os.path.join(HERE, "dist_oom_run.py"), tmp_path)
    proc = subprocess.run(cmd, env=env, timeout=240, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["global_step"] == r1["global_step"] == 4
    # both ranks backed off together, although only rank 1 raised: 8 -> 4 -> 2 at step 0
    assert r0["oom_events"] == r1["oom_events"] == [[0, "mb8/f0.00/ckpt0/fp32"], [0, "mb4/f0.00/ckpt0/fp32"]]
    assert r0["configs"] == r1["configs"] == ["mb2/f0.00/ckpt0/fp32"] * 4
    assert r0["initial_weights"] == r1["initial_weights"] != r0["weights"]  # trained, from the same start
    assert r0["weights"] == r1["weights"]
