"""A deterministic MPOpt run on CPU that can be SIGKILLed after a checkpoint and resumed (used by test_engine_resume).

    python tests/dist_resume_run.py OUTPUT_DIR [--kill-at-step N] [--resume]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from dist_fakes import FakeCost, StepClock  # noqa: E402
from mpopt_hf import MPOptArguments, MPOptTrainer  # noqa: E402
import small_cnn  # noqa: E402
from mpopt_hf.testing.tiny_models import example_batch  # noqa: E402
from trainer_utils import ListDataset, training_args  # noqa: E402

STEPS, SAVE_EVERY = 8, 4


def make_trainer(output_dir: str) -> MPOptTrainer:
    torch.set_num_threads(1)
    # small_cnn, not a tiny HF family: transformers 5.23 saves ViT/GPT-Neo checkpoints under legacy key names that
    # Trainer's resume does not map back (the blocks would reload as random weights), which would hide our part.
    torch.manual_seed(0)
    model = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    data = ListDataset(example_batch(model, 40))  # 5 steps per epoch: the resume lands mid-epoch
    evals = ListDataset(example_batch(model, 8, seed=1))
    args = training_args(output_dir, 8, steps=STEPS, save_strategy="steps", save_steps=SAVE_EVERY, learning_rate=5e-2)
    # trials of 3 steps: the race runs over steps 1-6, so the checkpoint at step 4 falls inside its second trial
    mpopt = MPOptArguments(micro_batch_sizes=[8, 4], freeze_rates=[0.0, 0.5], checkpoint_segments=[0], trial_steps=3,
                           search_share=None)
    return MPOptTrainer(
        model=model, args=args, train_dataset=data, eval_dataset=evals, mpopt_args=mpopt, cost_model=FakeCost(), clock=StepClock()
    )


class KillAt(TrainerCallback):
    """SIGKILL the process at the end of a step: no cleanup, no final save, like a lost device."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args()
    trainer = make_trainer(ns.output_dir)
    if ns.kill_at_step:
        trainer.add_callback(KillAt(ns.kill_at_step))
    trainer.train(resume_from_checkpoint=True if ns.resume else None)
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, os.path.join(ns.output_dir, "final.pt"))


if __name__ == "__main__":
    main()
