"""Under torchrun: MPOptTrainer with knobs refuses TrainingArguments.fsdp at setup; run by test_sharding.py.

(transformers refuses ``fsdp`` in one process itself, so the refusal is only reachable with two.)"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from trainer_utils import ListDataset, training_args  # noqa: E402

from mpopt_hf import MemoryConfig, MPOptTrainer  # noqa: E402
from mpopt_hf.tiny_models import build_tiny, example_batch  # noqa: E402

model = build_tiny("vit", dropout=0.0)
args = training_args(sys.argv[1], 4, fsdp=True, fsdp_config={"version": 2})
try:
    MPOptTrainer(model=model, args=args, train_dataset=ListDataset(example_batch(model, 8)),
                 memory_config=MemoryConfig(2, checkpoint_segments=2))
except ValueError as err:
    print("REFUSED:", err)
else:
    raise SystemExit("MPOptTrainer accepted FSDP with knobs")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
