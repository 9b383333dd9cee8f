"""What only a GPU shows: the allocator's peak under the knobs, fp16 with accelerate's loss scaler."""

import pytest
import torch

from mpopt_hf import MemoryConfig, MPOptTrainer
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, training_args

pytestmark = pytest.mark.gpu


def _peak_of_one_step(model, batch, cfg):
    from mpopt_hf.model.knobs import apply_memory_config, autocast_context
    from mpopt_hf.training.microbatch import micro_batch_shares, split_batch

    apply_memory_config(model, cfg)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    micro = split_batch(batch, cfg.micro_batch_size)
    for mb, share in zip(micro, micro_batch_shares(micro)):
        with autocast_context(cfg, "cuda"):
            loss = model(**mb).loss * share
        loss.backward()
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated() - before


def test_each_knob_lowers_the_cuda_peak():
    model = build_tiny("gpt_neo", num_layers=8).cuda().train()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in example_batch(model, 64).items()}
    base = _peak_of_one_step(model, batch, MemoryConfig(64))
    for cfg in (
        MemoryConfig(8),
        MemoryConfig(64, freeze_rate=0.5),
        MemoryConfig(64, checkpoint_segments=8),
        MemoryConfig(64, precision="bf16"),
    ):
        assert _peak_of_one_step(model, batch, cfg) < base, cfg


def test_fp16_trains_with_the_loss_scaler(tmp_path):
    model = build_tiny("vit")
    data = ListDataset(example_batch(model, 32))
    args = training_args(tmp_path, 16, steps=4, use_cpu=False, fp16=True)
    trainer = MPOptTrainer(model=model, args=args, train_dataset=data, memory_config=MemoryConfig(4, precision="fp16"))
    trainer.train()
    assert trainer.accelerator.scaler is not None
    assert trainer.state.global_step == 4
    with pytest.raises(ValueError, match="every configuration must use precision='fp16'"):
        trainer.set_memory_config(MemoryConfig(4, precision="bf16"))
