"""Under torchrun: MPOptTrainer with knobs refuses TrainingArguments.fsdp at setup; run by test_sharding.py.

(transformers refuses ``fsdp`` in one process itself, so the refusal is only reachable with two.)"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from trainer_utils import ListDataset, training_args  # noqa: E402

from mpopt_hf import MemoryConfig, MPOptArguments, MPOptCallback, MPOptTrainer  # noqa: E402
from mpopt_hf.testing.tiny_models import build_tiny, example_batch  # noqa: E402

model = build_tiny("vit", dropout=0.0)
args = training_args(sys.argv[1], 4, fsdp=True, fsdp_config={"version": 2})
knobs = {"memory_config": {"memory_config": MemoryConfig(2, checkpoint_segments=2)},
         "callback": {"callbacks": [MPOptCallback(MPOptArguments())]}}  # an engine passed as a callback
for how, extra in knobs.items():
    try:
        MPOptTrainer(model=model, args=args, train_dataset=ListDataset(example_batch(model, 8)), **extra)
    except ValueError as err:  # one file per rank: two ranks' prints interleave on a shared stdout
        with open(os.path.join(sys.argv[1], f"refused_{how}_rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(str(err))
    else:
        raise SystemExit(f"MPOptTrainer accepted FSDP with knobs ({how})")
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
