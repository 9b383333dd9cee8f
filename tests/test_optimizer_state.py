"""The optimizer-state knob (``MemoryConfig.optimizer_state='8bit'``, bitsandbytes' blockwise 8-bit AdamW): the
bytes it saves against the memory model's prediction, that a switch converts the moments instead of resetting
them, that the 32-bit form is torch's AdamW, and the errors that say what to do."""

from __future__ import annotations

import copy

import pytest
import torch

from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.space import enumerate_configs
from mpopt_hf.training.optimizer_state import QMAP_BYTES, is_switchable, set_state_bits, state_bits, state_bytes, switchable_adamw
from mpopt_hf.profiler import build_memory_model, measure, predict_step
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from trainer_utils import ListDataset, run_steps, training_args

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
BATCH = 8


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))


def _train(optimizer_for, steps: int, switches: dict[int, str] | None = None):
    model = _mlp()
    optimizer = optimizer_for(model)
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10
    losses = []
    for step in range(steps):
        if switches and step in switches:
            set_state_bits(optimizer, switches[step])
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, optimizer, losses


def _torch_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def test_the_32_bit_form_is_torch_adamw():
    """Until a configuration asks for 8 bits the update is AdamW's: the weights after 6 steps match torch's."""
    reference, _, _ = _train(_torch_adamw, 6)
    model, optimizer, _ = _train(lambda m: switchable_adamw(_torch_adamw(m)), 6)
    assert is_switchable(optimizer) and state_bits(optimizer) == "fp32"
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_switch_converts_the_moments_and_back():
    """To 8 bits at step 3 and back at step 6: the moments are quantized and dequantized, not reset, so the loss
    curve goes on as the fp32 run's (a reset would restart Adam's bias correction from scratch)."""
    _, reference_opt, reference = _train(lambda m: switchable_adamw(_torch_adamw(m)), 9)
    model, optimizer, losses = _train(lambda m: switchable_adamw(_torch_adamw(m)), 9, {3: "8bit", 6: "fp32"})
    assert losses[:4] == reference[:4]
    assert losses == pytest.approx(reference, rel=0.02)
    big = model[0].weight  # 8192 elements: over bitsandbytes' 4096-element floor, so its moments went 8-bit
    assert optimizer.state[big]["state1"].dtype == torch.float32 and "absmax1" not in optimizer.state[big]
    assert optimizer.state[big]["step"] == 9

    model, optimizer, _ = _train(lambda m: switchable_adamw(_torch_adamw(m)), 4, {3: "8bit"})
    moments = optimizer.state[model[0].weight]
    assert moments["state1"].dtype == moments["state2"].dtype == torch.uint8
    assert optimizer.state[model[0].bias]["state1"].dtype == torch.float32  # 128 elements: kept in 32 bits


def test_converting_keeps_the_moments_to_8_bit_rounding():
    _, optimizer, _ = _train(lambda m: switchable_adamw(_torch_adamw(m)), 3)
    p = optimizer.param_groups[0]["params"][0]
    exp_avg, exp_avg_sq = (optimizer.state[p][k].clone() for k in ("state1", "state2"))
    assert set_state_bits(optimizer, "8bit") == 1  # the 64x128 weight; the 128x10 one and the biases are under 4096
    assert set_state_bits(optimizer, "8bit") == 0  # already there
    set_state_bits(optimizer, "fp32")
    for before, after in ((exp_avg, optimizer.state[p]["state1"]), (exp_avg_sq, optimizer.state[p]["state2"])):
        scale = before.abs().max()
        assert (after - before).abs().max() <= 0.02 * scale  # the dynamic 8-bit map's error, blockwise
        assert not torch.equal(after, before) and after.abs().sum() > 0


@pytest.fixture(scope="module")
def gpt_neo():
    torch.set_num_threads(1)
    model = build_tiny("gpt_neo", num_layers=4)
    batch = example_batch(model, BATCH)
    optimizer = switchable_adamw(torch.optim.AdamW(model.parameters(), lr=1e-3))
    return model, batch, optimizer, build_memory_model(model, batch, optimizer, ("fp32",))


@pytest.mark.parametrize("config", [MemoryConfig(BATCH, optimizer_state="8bit"),
                                    MemoryConfig(4, 0.5, 1, optimizer_state="8bit"),
                                    MemoryConfig(BATCH, 0.25, optimizer_state="8bit")], ids=MemoryConfig.short)
def test_the_state_bytes_are_predicted_exactly(gpt_neo, config):
    """MemTracker's optimizer-state bytes of a real 8-bit step equal the memory model's (shapes only: exact), and the
    fake step's; the measured peak drops from the fp32 one by what the model predicts."""
    model, batch, optimizer, memory_model = gpt_neo
    real = measure(model, batch, config, optimizer, steps=1)
    fp32 = measure(model, batch, config.replace(optimizer_state="fp32"), optimizer, steps=1)
    predicted = memory_model.predict(config, BATCH)
    assert real.optimizer_state == predicted.optimizer_state == predict_step(model, batch, config, optimizer).optimizer_state
    assert real.optimizer_state < 0.6 * fp32.optimizer_state
    saved = fp32.tracked_peak_bytes - real.tracked_peak_bytes
    assert saved == pytest.approx(memory_model.predict(config.replace(optimizer_state="fp32"), BATCH).peak_bytes
                                  - predicted.peak_bytes, rel=0.01)
    assert state_bits(optimizer) == "fp32" and not optimizer.state  # measure puts everything back


def test_state_bytes_formula():
    assert state_bytes(4095, "8bit") == 8 * 4095  # under the floor: 32-bit moments
    assert state_bytes(4096, "8bit") == 2 * 4096 + 8 * 16 and state_bytes(4097, "8bit") == 2 * 4097 + 8 * 17
    assert state_bytes(4096, "fp32") == 8 * 4096 and QMAP_BYTES == 2048


def test_the_trainer_builds_and_switches_the_optimizer(tmp_path):
    """A memory_config with 8-bit state: MPOptTrainer builds bitsandbytes' AdamW from Trainer's own groups (weight
    decay off for biases and norms, as Trainer groups them) and its moments are 8-bit after training."""
    model = build_tiny("vit", num_layers=2)
    args = training_args(tmp_path, 8, steps=3)
    trainer, _ = run_steps(MPOptTrainer, model, ListDataset(example_batch(model, 16)), args,
                           memory_config=MemoryConfig(4, optimizer_state="8bit"))
    inner = trainer.optimizer.optimizer
    assert is_switchable(inner) and state_bits(inner) == "8bit"
    assert sorted(g["weight_decay"] for g in inner.param_groups) == [0.0, 0.1]
    dtypes = {(p.numel() >= 4096, st["state1"].dtype) for p, st in inner.state.items()}
    assert dtypes == {(True, torch.uint8), (False, torch.float32)}
    assert MPOptTrainer(model=model, args=args, train_dataset=ListDataset(example_batch(model, 16)),
                        mpopt_args=MPOptArguments(optimizer_states=["fp32", "8bit"])).low_bit_optimizer


def test_clear_errors(tmp_path):
    model = build_tiny("vit", num_layers=2)
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8), train_dataset=ListDataset(example_batch(model, 8)),
                           memory_config=MemoryConfig(4))
    with pytest.raises(ValueError, match=r"optimizer_state='8bit' needs the optimizer built for it.*optimizer_states"):
        trainer.set_memory_config(MemoryConfig(4, optimizer_state="8bit"))
    with pytest.raises(ValueError, match=r"optimizer_state='8bit' needs torch's AdamW.*got SGD"):
        switchable_adamw(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"optimizer_state='8bit' needs the optimizer built for it"):
        set_state_bits(torch.optim.AdamW(model.parameters()), "8bit")
    assert set_state_bits(torch.optim.AdamW(model.parameters()), "fp32") == 0  # no knob: nothing to do
    with pytest.raises(ValueError, match=r"MemoryConfig\.optimizer_state must be one of \['fp32', '8bit'\]"):
        MemoryConfig(4, optimizer_state="4bit")
    with pytest.raises(ValueError, match=r"MPOptArguments\.optimizer_states holds \['int8'\]"):
        MPOptArguments(optimizer_states=["int8"])


def test_labels_and_the_search_space():
    config = MemoryConfig.parse("mb8/ckpt2/bf16/opt8")
    assert config.optimizer_state == "8bit" and config.short() == "mb8/f0.00/ckpt2/bf16/opt8"
    assert MemoryConfig.parse(config.short()) == config and MemoryConfig(8).short() == "mb8/f0.00/ckpt0/fp32"
    default = enumerate_configs([8, 4], [0.0], [0], ["fp32"], 2)
    both = enumerate_configs([8, 4], [0.0], [0], ["fp32"], 2, optimizer_states=["fp32", "8bit"])
    assert len(both) == 2 * len(default) and {c.optimizer_state for c in default} == {"fp32"}


def test_the_engine_chooses_8_bit_state_when_only_it_fits(tmp_path):
    """The knob chosen jointly with the others: on a budget between the 8-bit and the fp32 peak (margin included)
    of the same micro-batch, the engine runs the 8-bit configuration and the optimizer's moments are 8-bit."""
    from dist_fakes import StepClock

    def data(model, n=32):
        return ListDataset(example_batch(model, n))

    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    space = dict(micro_batch_sizes=[16], freeze_rates=[0.0], checkpoint_segments=[0], optimizer_states=["fp32", "8bit"],
                 trial_steps=1, search_share=None, cost_predictor="fake")
    probe = MPOptTrainer(model=model, args=training_args(tmp_path, 16, steps=1), train_dataset=data(model),
                         eval_dataset=data(model, 8), mpopt_args=MPOptArguments(memory_budget_mib=1e6, **space),
                         clock=StepClock())
    probe.train()
    costs = probe.mpopt_callback.cost_model
    fp32, eight = costs.peak_mib(MemoryConfig(16)), costs.peak_mib(MemoryConfig(16, optimizer_state="8bit"))
    assert eight < fp32
    trainer = MPOptTrainer(model=build_tiny("gpt_neo", num_layers=4, dropout=0.0),
                           args=training_args(tmp_path, 16, steps=3), train_dataset=data(model),
                           eval_dataset=data(model, 8), clock=StepClock(),
                           mpopt_args=MPOptArguments(memory_budget_mib=(fp32 + eight) / 2 / (1 - 0.05), **space))
    trainer.train()
    used = {MemoryConfig.from_dict(d.config) for d in trainer.mpopt_callback.engine.decisions}
    assert used == {MemoryConfig(16, optimizer_state="8bit")}
    inner = trainer.optimizer.optimizer
    assert state_bits(inner) == "8bit"
    assert {st["state1"].dtype for p, st in inner.state.items() if p.numel() >= 4096} == {torch.uint8}


class _Wide(torch.nn.Module):
    """Wide linear blocks on a batch of 2: the optimizer step, not the activations, makes the peak."""

    def __init__(self, width: int = 512) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(16, width)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(3))
        self.head = torch.nn.Linear(width, 4)

    def forward(self, x, labels):
        h = self.stem(x)
        for layer in self.layers:
            h = h + torch.relu(layer(h))
        return torch.nn.functional.cross_entropy(self.head(h), labels)


def test_the_8_bit_step_temporaries_are_predicted():
    """bitsandbytes' CPU kernel dequantizes a tensor's moments to fp32 inside one op: MemTracker cannot see those
    bytes, the allocator can. The memory model probes them per element and adds them for the largest 8-bit tensor,
    so its peak is the allocator's where the optimizer step is the peak."""
    net = _Wide()
    batch = {"x": torch.randn(2, 16), "labels": torch.tensor([0, 1])}
    optimizer = switchable_adamw(torch.optim.AdamW(net.parameters(), lr=1e-3))
    memory_model = build_memory_model(net, batch, optimizer, ("fp32",))
    config = MemoryConfig(2, optimizer_state="8bit")
    predicted = memory_model.predict(config, 2)
    real = measure(net, batch, config, optimizer, steps=1)
    largest = 512 * 512
    assert predicted.phase == "optimizer step" and memory_model.structure.optimizer.low_bit_per_element > 0
    assert real.peak_bytes - real.tracked_peak_bytes > 2 * largest  # the kernel's fp32 copies, unseen by MemTracker
    assert predicted.peak_bytes == pytest.approx(real.peak_bytes, rel=0.03)


def test_a_users_own_8_bit_optimizer_is_left_alone(tmp_path):
    """``optim="adamw_bnb_8bit"`` is the user's choice, with Trainer's own rules: an fp32 configuration of the
    knobs must not turn its moments into 32 bits."""
    model = build_tiny("gpt_neo", num_layers=2)
    args = training_args(tmp_path, 8, steps=2, optim="adamw_bnb_8bit")
    trainer, _ = run_steps(MPOptTrainer, model, ListDataset(example_batch(model, 16)), args,
                           memory_config=MemoryConfig(4))
    inner = trainer.optimizer.optimizer
    assert not is_switchable(inner) and inner.args.optim_bits == 8
    assert torch.uint8 in {st["state1"].dtype for st in inner.state.values()}


def test_an_engine_callback_listing_8_bit_state_gets_the_optimizer_for_it(tmp_path):
    """The online loop hands each task's trainer its engine as a callback, not as mpopt_args."""
    from mpopt_hf import MPOptCallback

    model = build_tiny("vit", num_layers=2)
    callback = MPOptCallback(MPOptArguments(optimizer_states=["fp32", "8bit"]))
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8), train_dataset=ListDataset(example_batch(model, 8)),
                           callbacks=[callback])
    assert trainer.low_bit_optimizer
    trainer.set_memory_config(MemoryConfig(4, optimizer_state="8bit"))  # accepted: the optimizer will be built for it


def test_the_measurement_copy_takes_8_bit_moments_off_the_device_and_back(tmp_path):
    """bitsandbytes nests its 8-bit moments in a dict of the state dict: the isolation copy must still name (and
    spill) every tensor, and put the moments back exactly."""
    from mpopt_hf.profiler.isolation import StateCopy

    model, optimizer, _ = _train(lambda m: switchable_adamw(_torch_adamw(m)), 2, {1: "8bit"})
    before = {id(p): {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in optimizer.state.items()}
    copy = StateCopy(model, optimizer, spill_dir=str(tmp_path))

    def tensors(value):
        if isinstance(value, dict):
            return [t for v in value.values() for t in tensors(v)]
        return [value] if torch.is_tensor(value) else []

    assert tensors(copy.optimizer["state"]) == []  # every tensor is a name in the spill file
    x = torch.randn(4, 64)
    model(x).sum().backward()
    optimizer.step()  # the measured steps change the moments
    copy.restore(model, optimizer)
    for p, st in optimizer.state.items():
        for key, value in before[id(p)].items():
            assert torch.equal(st[key], value), key
    assert state_bits(optimizer) == "8bit"


@pytest.mark.parametrize("direction", ["torch -> switchable", "switchable -> torch"])
def test_a_checkpoint_of_the_other_optimizer_resumes(direction):
    """A run resumed with 8-bit state newly listed loads torch AdamW's moments (and the reverse): they are
    translated, not dropped, and the next step is the one the saving optimizer would have taken."""
    from mpopt_hf.training.optimizer_state import adapt_loaded_state

    build = {"torch": _torch_adamw, "switchable": lambda m: switchable_adamw(_torch_adamw(m))}
    saving, loading = direction.split(" -> ")
    model, optimizer, _ = _train(build[saving], 3)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 10

    def step(opt):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    saved = copy.deepcopy(optimizer.state_dict())  # a state dict holds the live moments: the next step changes them
    step(optimizer)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(reference[n])
    resumed = build[loading](model)
    resumed.load_state_dict(saved)
    assert adapt_loaded_state(resumed) == 4
    step(resumed)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=n)


def test_resuming_with_8_bit_state_newly_listed(tmp_path):
    """A checkpoint of a run with torch's AdamW, resumed by a trainer whose configuration asks for 8-bit state:
    the moments carry over (translated, then quantized) and training goes on."""
    model = build_tiny("vit", num_layers=2)
    data = ListDataset(example_batch(model, 32))
    args = training_args(tmp_path, 8, steps=2, save_strategy="steps", save_steps=2)
    run_steps(MPOptTrainer, model, data, args, memory_config=MemoryConfig(4))
    args = training_args(tmp_path, 8, steps=4, save_strategy="no")
    trainer = MPOptTrainer(model=build_tiny("vit", num_layers=2), args=args, train_dataset=data,
                           memory_config=MemoryConfig(4, optimizer_state="8bit"))
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    inner = trainer.optimizer.optimizer
    assert trainer.state.global_step == 4 and state_bits(inner) == "8bit"
    assert {st["step"] for st in inner.state.values()} == {4}  # two saved steps, two more: not restarted


def test_the_fake_cost_model_adds_the_8_bit_steps_hidden_bytes():
    """`cost_predictor="fake"` prices budgets from fake steps, which cannot see the CPU kernel's fp32 copies; for
    an 8-bit configuration it takes the exact optimizer-step floor with those copies, as the memory model does."""
    from mpopt_hf.cost import FakeTensorCostModel

    from bitsandbytes.optim import GlobalOptimManager

    net = _Wide()
    batch = {"x": torch.randn(2, 16), "labels": torch.tensor([0, 1])}
    optimizer = switchable_adamw(torch.optim.AdamW(net.parameters(), lr=1e-3))
    config = MemoryConfig(2, optimizer_state="8bit")
    shared = GlobalOptimManager.get_instance()  # another optimizer's override by index (as Trainer registers one)
    shared.index2config[(0, 0)] = shared.index2config[(0, 2)] = {"optim_bits": 32}
    try:
        fake_step = predict_step(net, batch, config, optimizer).peak_bytes
        priced = FakeTensorCostModel(net, batch, optimizer).predict(config)[0]
        real = measure(net, batch, config, optimizer, steps=1)
    finally:
        del shared.index2config[(0, 0)], shared.index2config[(0, 2)]
    assert fake_step < real.peak_bytes and priced == pytest.approx(real.peak_bytes, rel=0.03)
    assert FakeTensorCostModel(net, batch, optimizer).predict(MemoryConfig(2))[0] == pytest.approx(
        predict_step(net, batch, MemoryConfig(2), optimizer).peak_bytes)


def test_an_8_bit_oom_rules_out_its_fp32_twin_and_not_the_reverse():
    from mpopt_hf.engine.candidates import Candidate
    from mpopt_hf.engine.rules import at_least_as_large

    eight, fp32 = Candidate(MemoryConfig(8, optimizer_state="8bit")), Candidate(MemoryConfig(8))
    assert at_least_as_large(fp32, eight) and not at_least_as_large(eight, fp32)
    assert not at_least_as_large(Candidate(MemoryConfig(4)), eight)  # a smaller micro-batch may fit
