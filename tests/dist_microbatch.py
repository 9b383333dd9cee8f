"""Train a tiny model (ViT, or GPT-Neo with padded token labels) with MPOptTrainer micro-batching, optionally
with the LoRA knob's adapters (injected at the first step, after DDP wrapped the model); run by
test_distributed.py, alone or under torchrun.

Each of the two epochs is one optimizer step over the same 8 samples, so one process with a batch of 8 and
two processes with 4 each see the same global batch.
"""

import argparse
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from trainer_utils import ListDataset, training_args  # noqa: E402

from mpopt_hf import MemoryConfig, MPOptTrainer  # noqa: E402
from mpopt_hf.model.lora import adapter_parameters  # noqa: E402
from mpopt_hf.testing.tiny_models import build_tiny, example_batch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--micro-batch-size", type=int, required=True)
parser.add_argument("--model", default="vit", choices=["vit", "gpt_neo"])
parser.add_argument("--lora-rank", type=int, default=0)
cli = parser.parse_args()

world = int(os.environ.get("WORLD_SIZE", "1"))
model = build_tiny(cli.model, dropout=0.0)
# a parameter no rank uses keeps no gradient, as under DDP, so the optimizer leaves it alone
model.register_parameter("unused_by_every_rank", torch.nn.Parameter(torch.ones(3)))
batch = example_batch(model, 8)
if cli.model == "gpt_neo":  # padded token labels, a different count per sample: the ranks' token counts differ
    for i in range(8):
        batch["labels"][i, batch["labels"].shape[1] - 2 * i:] = -100
data = ListDataset(batch)
args = training_args(cli.out, 8 // world, steps=-1, num_train_epochs=2, optim="sgd", weight_decay=0.0)


class UnusedHasNoGradient(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        assert model.unused_by_every_rank.grad is None
        adapters = adapter_parameters(model)  # the LoRA knob's, while they train (merged when training ends)
        assert bool(adapters) == (cli.lora_rank > 0) and all(p.grad is not None for p in adapters)


trainer = MPOptTrainer(
    model=model, args=args, train_dataset=data, memory_config=MemoryConfig(cli.micro_batch_size, checkpoint_segments=2, lora_rank=cli.lora_rank),
    callbacks=[UnusedHasNoGradient()],
)
trainer.train()
assert trainer.state.global_step == 2, trainer.state.global_step
assert trainer.args.world_size == world, (trainer.args.world_size, world)
if trainer.is_world_process_zero():
    # clones: GPT-Neo ties its embedding and head, which safetensors refuses to save as one storage
    save_file({k: v.detach().clone().contiguous() for k, v in trainer.model.state_dict().items()},
              os.path.join(cli.out, "weights.safetensors"))
# Tear gloo down before interpreter exit: its threads aborting at exit ("terminate called without an active
# exception") would turn a finished run into a SIGABRT.
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
