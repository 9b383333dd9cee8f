"""The LoRA knob (``MemoryConfig.lora_rank``, peft's adapters on the Linear layers of the trainable blocks): where
the adapters go and what they freeze, the bytes they save against the fake-tensor prediction, that a switch keeps
what was learned, that checkpoints hold the plain model, that the engine chooses a rank when only it fits, and the
errors that say what to do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_utils import ListDataset, run_steps, training_args
from transformers import TrainerCallback

from mpopt_hf import MemoryConfig, MPOptArguments, MPOptTrainer
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.model.knobs import apply_memory_config, remove_knobs
from mpopt_hf.model.lora import adapter_parameters, current_placement, plain_state_dict
from mpopt_hf.profiler import build_memory_model, measure, predict_step
from mpopt_hf.space import enumerate_configs
from mpopt_hf.testing.tiny_models import build_tiny, example_batch
from mpopt_hf.training.adapter_optimizer import sync_adapters

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BATCH = 8


def _data(model, n=32):
    return ListDataset(example_batch(model, n))


def test_adapters_go_on_the_linear_layers_of_the_trainable_blocks():
    """freeze_rate 0.5 of 4 blocks: adapters on every Linear of blocks 2 and 3, whose weights and biases freeze;
    their norms, the head and the adapters train; nothing of blocks 0 and 1 trains. Removing the knobs merges."""
    model = build_tiny("vit", dropout=0.0)
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5, lora_rank=4))
    placement = current_placement(model)
    linears = [n for n, m in build_tiny("vit").named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert placement.rank == 4 and set(placement.targets) == {n for n in linears if ".layers.2." in n or ".layers.3." in n}
    assert len(placement.targets) == 12  # q, k, v, o, fc1, fc2 in each of 2 blocks
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".layers.0." in n or ".layers.1." in n or "base_layer" in n for n in trainable)
    assert {n for n in trainable if "lora_" in n} == {n for n, _ in model.named_parameters() if "lora_" in n}
    assert "vit.layers.3.layernorm_before.weight" in trainable and "classifier.weight" in trainable
    assert sum(p.numel() for p in adapter_parameters(model)) == 2 * 4 * (4 * (32 + 32) + (32 + 64) + (64 + 32))
    remove_knobs(model)
    assert not adapter_parameters(model) and all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == build_tiny("vit").state_dict().keys()


@pytest.fixture(scope="module")
def gpt_neo():
    torch.set_num_threads(1)
    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    return model, example_batch(model, BATCH), torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.mark.parametrize("config", [MemoryConfig(BATCH, lora_rank=4), MemoryConfig(4, 0.5, 1, lora_rank=2),
                                    MemoryConfig(BATCH, 0.25, lora_rank=8)], ids=MemoryConfig.short)
def test_the_saving_is_predicted_exactly(gpt_neo, config):
    """MemTracker's peak of a real step with adapters equals the fake-tensor step's, byte for byte, and so does the
    saving against the same configuration without adapters; a measurement leaves model and optimizer as found."""
    model, batch, optimizer = gpt_neo
    keys = model.state_dict().keys()
    real, full = measure(model, batch, config, optimizer, steps=1), measure(model, batch, config.replace(lora_rank=0),
                                                                            optimizer, steps=1)
    fake, fake_full = predict_step(model, batch, config, optimizer), predict_step(model, batch, config.replace(lora_rank=0),
                                                                                    optimizer)
    assert real.tracked_peak_bytes == fake.peak_bytes and real.optimizer_state == fake.optimizer_state
    assert full.tracked_peak_bytes - real.tracked_peak_bytes == fake_full.peak_bytes - fake.peak_bytes > 0
    assert real.optimizer_state < 0.5 * full.optimizer_state  # moments of r x (in + out), not in x out
    assert model.state_dict().keys() == keys and not optimizer.state and not adapter_parameters(model)


def test_a_measurement_keeps_the_adapters_a_run_holds(gpt_neo):
    """Measuring another rank while the model carries trained adapters: afterwards the same adapters' values, the
    base weights unmerged, and the optimizer over them again."""
    model, batch, _ = gpt_neo
    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    apply_memory_config(model, MemoryConfig(BATCH, lora_rank=4))
    sync_adapters(optimizer, model)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure(model, batch, MemoryConfig(BATCH, lora_rank=2), optimizer, steps=1)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in model.parameters()} <= held and len(held) == len(list(model.parameters()))


def test_the_profiled_memory_model_refuses_lora_with_the_way_out(gpt_neo):
    model, batch, optimizer = gpt_neo
    memory_model = build_memory_model(model, batch, optimizer, ("fp32",))
    with pytest.raises(ValueError, match=r"does not price LoRA adapters \(mb8/f0.00/ckpt0/fp32/lora4\).*cost_predictor='fake'"):
        memory_model.predict(MemoryConfig(BATCH, lora_rank=4), BATCH)


class _SwitchAt(TrainerCallback):
    """Switches the configuration at the end of a step and records the model's logits just before and after."""

    def __init__(self, trainer_box, step, config, batch):
        self.box, self.step, self.config, self.batch = trainer_box, step, config, batch
        self.logits: list[torch.Tensor] = []
        self.placements: list[tuple[int, int]] = []

    def _logits(self, model):
        with torch.no_grad():
            return model(**self.batch).logits

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.logits.append(self._logits(model))
            self.box[0].set_memory_config(self.config)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.box[0]._switch_if_pending(model)
            self.logits.append(self._logits(model))
            placement = current_placement(model)
            self.placements.append((placement.rank, len(placement.targets)))


def test_the_trainer_trains_adapters_only_and_a_switch_keeps_what_was_learned(tmp_path):
    """LoRA rank 4 for 3 steps, then rank 2 on more blocks: the adapted weights never move (weight decay 0.1
    included) while the adapters do; at the switch the model's outputs are unchanged (adapters merged, new ones
    start at B = 0); the optimizer then holds only live parameters, and the loss goes on falling."""
    model = build_tiny("vit", dropout=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batch = example_batch(model, 4)
    box: list = [None]
    switch = _SwitchAt(box, 3, MemoryConfig(4, freeze_rate=0.25, lora_rank=2), batch)
    losses = []

    class Losses(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            losses.append(box[0].last_step_loss)

    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, BATCH, steps=6, learning_rate=3e-3),
                           train_dataset=_data(model, 8), memory_config=MemoryConfig(4, freeze_rate=0.5, lora_rank=4),
                           callbacks=[switch, Losses()])
    box[0] = trainer

    frozen_names = [f"vit.layers.{i}.attention.q_proj.weight" for i in (2, 3)]

    class Frozen(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step <= 3:
                plain = plain_state_dict(model)  # adapters merged out of place: the frozen base must equal start
                for name in frozen_names:
                    base = model.get_submodule(name.rsplit(".", 1)[0]).get_base_layer().weight
                    assert torch.equal(base, start[name]) and not torch.equal(plain[name], start[name])

    trainer.add_callback(Frozen())
    trainer.train()
    before, after = switch.logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert len(switch.placements) == 1 and switch.placements[0] == (2, 18)  # rank 2 on 3 blocks x 6 Linears
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in trainer.model.parameters()}
    assert len(losses) == 6 and losses[-1] < losses[3] < losses[0]
    # training ended: the adapters are merged, the model is the plain one again, its function kept
    assert not adapter_parameters(trainer.model) and trainer.model.state_dict().keys() == start.keys()
    # and a measurement afterwards (the online loop's) does not bring them back
    measure(trainer.model, batch, MemoryConfig(4), torch.optim.AdamW(trainer.model.parameters()), steps=1)
    assert not adapter_parameters(trainer.model) and trainer.model.state_dict().keys() == start.keys()
    trains = {n for n, p in trainer.model.named_parameters() if p.requires_grad}  # freeze_rate 0.25 still holds
    assert "vit.layers.3.attention.q_proj.weight" in trains and "vit.layers.0.attention.q_proj.weight" not in trains


def test_micro_batching_under_lora_is_the_whole_batch(tmp_path):
    """The knob's contract holds with adapters: micro-batches of 2 and one batch of 8 give the same weights."""
    runs = []
    for micro in (BATCH, 2):
        model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
        trainer, _ = run_steps(MPOptTrainer, model, _data(model, 16), training_args(tmp_path / str(micro), BATCH, steps=2),
                               memory_config=MemoryConfig(micro, 0.25, 1, lora_rank=4))
        runs.append(plain_state_dict(trainer.model))
    for key in runs[0]:
        torch.testing.assert_close(runs[1][key], runs[0][key], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_holds_the_plain_model_and_a_run_resumes_from_it(tmp_path):
    """The saved weights have the plain model's keys and the merged values; the optimizer file holds no adapter; a
    resumed run loads both and goes on with fresh adapters."""
    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    config = MemoryConfig(4, 0.25, lora_rank=4)
    args = training_args(tmp_path, BATCH, steps=2, save_strategy="steps", save_steps=2)
    trainer, _ = run_steps(MPOptTrainer, model, _data(model), args, memory_config=config)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    plain = plain_state_dict(trainer.model)
    assert set(saved) <= set(build_tiny("gpt_neo", num_layers=4).state_dict()) and not any("lora" in k for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(value, plain[key], rtol=0, atol=1e-7)
    n_plain = len(list(build_tiny("gpt_neo", num_layers=4).parameters()))
    optimizer_file = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sum(len(g["params"]) for g in optimizer_file["param_groups"]) == n_plain  # the plain optimizer's

    resumed_model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    resumed = MPOptTrainer(model=resumed_model, args=training_args(tmp_path, BATCH, steps=4, save_strategy="no"),
                           train_dataset=_data(resumed_model), memory_config=config)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4 and resumed.memory_config.lora_rank == 4
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


@pytest.mark.parametrize("predictor", ["profile", "fake"])
def test_the_engine_chooses_lora_when_only_it_fits(tmp_path, predictor):
    """Ranks chosen jointly with the other knobs: with a budget between the rank-4 and the full peak (margin
    included) of the same micro-batch, the engine runs the adapters. The profiled cost model prices them by a
    fake-tensor step plus its calibrated workspace, with the step time of the twin without adapters."""
    from dist_fakes import StepClock

    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    space = dict(micro_batch_sizes=[16], freeze_rates=[0.0], checkpoint_segments=[0], lora_ranks=[0, 4],
                 trial_steps=1, search_share=None, cost_predictor=predictor)
    probe_space = {**space, "micro_batch_sizes": [16, 8]}  # the probe's fit also times a split step
    probe = MPOptTrainer(model=model, args=training_args(tmp_path, 16, steps=1), train_dataset=_data(model),
                         eval_dataset=_data(model, 8), mpopt_args=MPOptArguments(memory_budget_mib=1e6, **probe_space),
                         clock=StepClock())
    probe.train()
    costs = probe.mpopt_callback.cost_model
    full, lora = costs.peak_mib(MemoryConfig(16)), costs.peak_mib(MemoryConfig(16, lora_rank=4))
    assert lora < full
    if predictor == "profile":
        fake = predict_step(model, example_batch(model, 16), MemoryConfig(16, lora_rank=4),
                            torch.optim.AdamW(model.parameters()))
        workspace = costs.profile.model.calibration.workspace("fp32", 16)
        assert lora * 2**20 == pytest.approx(fake.peak_bytes + workspace, rel=1e-9)
        assert costs.predict(MemoryConfig(8, lora_rank=4))[1] == costs.predict(MemoryConfig(8))[1]
    margin = max(0.05, getattr(costs, "uncertainty", 0.0))  # the engine's: the profiled fit's uncertainty when larger
    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 16, steps=3), train_dataset=_data(model),
                           eval_dataset=_data(model, 8), clock=StepClock(), cost_model=costs,
                           mpopt_args=MPOptArguments(memory_budget_mib=(full + lora) / 2 / (1 - margin), **space))
    trainer.train()
    used = {MemoryConfig.from_dict(d.config) for d in trainer.mpopt_callback.engine.decisions}
    assert used == {MemoryConfig(16, lora_rank=4)} and trainer.memory_config.lora_rank == 4


def test_labels_space_and_clear_errors(tmp_path):
    config = MemoryConfig.parse("mb8/f0.5/lora8")
    assert config.lora_rank == 8 and config.short() == "mb8/f0.50/ckpt0/fp32/lora8"
    assert MemoryConfig.parse(config.short()) == config
    with pytest.raises(ValueError, match=r"MemoryConfig\.lora_rank must be an int >= 0"):
        MemoryConfig(8, lora_rank=-1)
    both = enumerate_configs([8], [0.0, 1.0], [0], ["fp32"], 2, lora_ranks=[0, 4])
    assert {(c.freeze_rate, c.lora_rank) for c in both} == {(0.0, 0), (0.0, 4), (1.0, 0)}  # no block to adapt at 1.0
    assert MPOptArguments(lora_ranks=[4, 0, 4]).lora_ranks == [0, 4]
    with pytest.raises(ValueError, match=r"MPOptArguments\.lora_ranks holds"):
        MPOptArguments(lora_ranks=[-2], cost_predictor="fake")

    import small_cnn

    cnn = small_cnn.build("resnet18", **small_cnn.tiny_overrides("resnet18"))
    with pytest.raises(ValueError, match=r"lora_rank=4: the trainable blocks of .* hold no Linear layer"):
        apply_memory_config(cnn, MemoryConfig(4, lora_rank=4))

    from peft import LoraConfig, get_peft_model

    users = get_peft_model(build_tiny("vit", dropout=0.0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"already carries peft adapters of its own"):
        apply_memory_config(users, MemoryConfig(4, lora_rank=2))
    apply_memory_config(users, MemoryConfig(4, freeze_rate=0.5))
    remove_knobs(users)  # the user's adapters are theirs: never merged by the knobs
    assert sum("lora_A" in n for n, _ in users.named_parameters()) == 8
    assert find_blocks(users).family == "vit"


LORA_FAMILIES = [("bert", False), ("gpt2", True), ("llama", True), ("t5", True), ("whisper", False), ("swin", False),
                 ("convnext", False), ("clip", False)]


@pytest.mark.parametrize("family, padded", LORA_FAMILIES, ids=[f"{n}{'-padded' if p else ''}" for n, p in LORA_FAMILIES])
def test_micro_batching_under_lora_on_every_family(tmp_path, family, padded, one_torch_thread):
    """Encoder-only, decoder-only (GPT-2's Conv1D layers too), encoder-decoder, speech, hierarchical vision and
    CLIP's contrastive loss (gradient-cached when split): with adapters on, micro-batches of 2 and checkpointing
    give the whole batch's gradient, adapters included."""
    from families import FAMILIES
    from test_trainer_families import BATCH as FAMILY_BATCH
    from test_trainer_families import _step_gradient

    spec = FAMILIES[family]
    batch = spec.batch(FAMILY_BATCH, padded=padded)
    whole = _step_gradient(MPOptTrainer, spec, batch, tmp_path / "whole",
                           memory_config=MemoryConfig(FAMILY_BATCH, freeze_rate=0.25, lora_rank=2))
    split = _step_gradient(MPOptTrainer, spec, batch, tmp_path / "split",
                           memory_config=MemoryConfig(2, freeze_rate=0.25, checkpoint_segments=1, lora_rank=2))
    assert whole.norm() > 0
    assert ((split - whole).norm() / whole.norm()).item() < 1e-6


def test_the_engine_keeps_ranks_apart_and_prefers_full_training_on_a_tie():
    """A rank changes what is learned: dominance keeps the fastest of each rank, not one for all; a race tie goes
    to the least held fixed (full training, then the higher rank); out of memory at rank 8 rules out rank 8 and
    full training at that micro-batch, not rank 4."""
    from mpopt_hf.engine.candidates import Candidate, RaceTrial
    from mpopt_hf.engine.rules import at_least_as_large, dominance_prune
    from mpopt_hf.engine.scoring import judge_race

    full, r8, r4 = MemoryConfig(8), MemoryConfig(8, lora_rank=8), MemoryConfig(8, lora_rank=4)
    kept = dominance_prune([Candidate(r4, 1.0, 0.1), Candidate(full, 3.0, 0.2), Candidate(r8, 2.0, 0.1),
                            Candidate(MemoryConfig(4, lora_rank=4), 0.5, 0.3)])
    assert {c.config for c in kept} == {full, r8, r4}
    same = RaceTrial(gain=0.1, metric=0.5, seconds=1.0, se=0.05, projected=0.9)
    assert judge_race({r4: same, r8: same, full: same}, 1.0, 2.0) == (full, True)
    assert judge_race({r4: same, r8: same}, 1.0, 2.0) == (r8, True)
    failed = Candidate(r8, None, None)
    assert at_least_as_large(Candidate(full), failed) and at_least_as_large(Candidate(MemoryConfig(8, lora_rank=16)), failed)
    assert not at_least_as_large(Candidate(r4), failed)
    assert not at_least_as_large(Candidate(MemoryConfig(8, lora_rank=4)), Candidate(full))


def test_a_race_copy_comes_back_across_placements():
    """A race between ranks: the copy taken at rank 4 is restored while the model carries rank-8 adapters on other
    blocks; the adapters are re-made at the copy's placement and every weight and moment is the copy's."""
    from mpopt_hf.training import snapshot

    model = build_tiny("gpt_neo", num_layers=4, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = example_batch(model, 4)

    def train(config, steps):
        apply_memory_config(model, config)
        sync_adapters(optimizer, model)
        for _ in range(steps):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    train(MemoryConfig(4, lora_rank=4), 2)
    copy = snapshot.capture(model, optimizer)
    with torch.no_grad():
        logits = model(**batch).logits
    train(MemoryConfig(4, 0.25, lora_rank=8), 1)
    snapshot.restore(copy, model, optimizer)
    assert current_placement(model).rank == 4
    state = model.state_dict()
    assert state.keys() == copy["model"].keys() and all(torch.equal(state[k], copy["model"][k]) for k in state)
    moments = optimizer.state_dict()["state"]
    assert moments.keys() == copy["optimizer"]["state"].keys()
    assert all(torch.equal(moments[i]["exp_avg"], copy["optimizer"]["state"][i]["exp_avg"]) for i in moments)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, logits, rtol=0, atol=0)
    train(MemoryConfig(4, lora_rank=4), 1)  # and training goes on from it


def test_the_engine_races_ranks_and_leaves_the_plain_model(tmp_path):
    """An engine racing full training against ranks 2 and 4 (race copies taken and restored across placements)
    runs to its end; afterwards the model is the plain one."""
    from dist_fakes import StepClock

    model = build_tiny("vit", dropout=0.0)
    args = MPOptArguments(micro_batch_sizes=[8], freeze_rates=[0.0], checkpoint_segments=[0], lora_ranks=[0, 2, 4],
                          trial_steps=2, search_share=None, cost_predictor="fake")
    trainer = MPOptTrainer(model=model, args=training_args(tmp_path, 8, steps=12), train_dataset=_data(model, 96),
                           eval_dataset=_data(model, 16), clock=StepClock(), mpopt_args=args)
    trainer.train()
    tried = {MemoryConfig.from_dict(d.config).lora_rank for d in trainer.mpopt_callback.engine.decisions}
    assert tried == {0, 2, 4} and trainer.state.global_step == 12
    assert trainer.model.state_dict().keys() == build_tiny("vit").state_dict().keys()


def test_no_adapter_on_layers_the_user_froze_or_inside_multihead_attention():
    model = build_tiny("vit", dropout=0.0)
    model.vit.layers[3].mlp.fc1.weight.requires_grad_(False)  # the user's own choice
    apply_memory_config(model, MemoryConfig(4, freeze_rate=0.5, lora_rank=2))
    targets = current_placement(model).targets
    assert "vit.layers.3.mlp.fc1" not in targets and "vit.layers.3.mlp.fc2" in targets and len(targets) == 11
    remove_knobs(model)
    assert not model.vit.layers[3].mlp.fc1.weight.requires_grad and model.vit.layers[3].mlp.fc2.weight.requires_grad

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    blocks = find_blocks(encoder)
    from mpopt_hf.model.lora import lora_targets

    names = lora_targets(encoder, blocks, 0)
    assert names and not any("out_proj" in n for n in names) and any(n.endswith("linear1") for n in names)


def test_load_best_model_at_end_loads_the_plain_best_checkpoint(tmp_path):
    """The best checkpoint holds the plain model; at the end the adapters are merged first, so the model is that
    checkpoint's weights exactly, not a mix with live adapters."""
    model = build_tiny("vit", dropout=0.0)
    args = training_args(tmp_path, BATCH, steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
                         eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer = MPOptTrainer(model=model, args=args, train_dataset=_data(model), eval_dataset=_data(model, 8),
                           memory_config=MemoryConfig(4, 0.25, lora_rank=4))
    trainer.train()
    # from_pretrained maps the legacy key names transformers writes ViT's checkpoints with
    best = type(model).from_pretrained(trainer.state.best_model_checkpoint).state_dict()
    state = trainer.model.state_dict()
    assert not adapter_parameters(trainer.model) and best.keys() == state.keys()
    assert all(torch.equal(state[k], best[k]) for k in best)
    assert not all(torch.equal(state[k], v) for k, v in build_tiny("vit", dropout=0.0).state_dict().items())
