"""Two CPU processes (gloo) where only rank 1 runs out of memory; run by tests/test_oom_dist.py through torchrun.

    torchrun --nproc_per_node 2 --master_port PORT tests/dist_oom_run.py OUTPUT_DIR
Each rank writes rank{r}.json: the configurations it ran, its out-of-memory events and a digest of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from dist_fakes import FakeCost, FakeOOM, StepClock  # noqa: E402
from mpopt_hf import MPOptArguments, MPOptTrainer  # noqa: E402
from mpopt_hf.testing.tiny_models import build_tiny, example_batch  # noqa: E402
from trainer_utils import ListDataset, training_args  # noqa: E402


class Ran(TrainerCallback):
    def __init__(self):
        self.trainer, self.configs = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.configs.append(self.trainer.memory_config.short())


def _digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    model = build_tiny("vit", num_layers=2, dropout=0.0)
    if rank == 1:
        FakeOOM(model, train_limit=2)  # only this rank's "device" is too small for micro-batches above 2
    data = ListDataset(example_batch(model, 64))
    evals = ListDataset(example_batch(model, 8, seed=1))
    args = training_args(out, 8, steps=4, ddp_backend="gloo", ddp_timeout=120)
    ran = Ran()
    trainer = MPOptTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=evals,
        callbacks=[ran],
        mpopt_args=MPOptArguments(micro_batch_sizes=[8, 4, 2], freeze_rates=[0.0], checkpoint_segments=[0], trial_steps=2,
                                    search_share=None),
        cost_model=FakeCost(),
        clock=StepClock(),
    )
    ran.trainer = trainer
    initial = _digest(model)
    trainer.train()
    result = {
        "configs": ran.configs,
        "oom_events": [[step, c.short()] for step, c in trainer.oom_events],
        "initial_weights": initial,
        "weights": _digest(trainer.model),
        "global_step": trainer.state.global_step,
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    # Tear gloo down before interpreter exit: its threads aborting at exit ("terminate called without an active
    # exception") would turn a finished run into a SIGABRT.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
