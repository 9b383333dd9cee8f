"""memory_cards: the real-size architectures' parameter counts, the ablation's rows, the knob space and its minimum
search (against a brute-force minimum), and the card's table round trip."""

from __future__ import annotations

import pytest
import torch

from memory_cards import ablation, card, memory_figure
from memory_cards.architectures import ARCHITECTURES, build, build_named
from memory_cards.space import PeakPredictor, divisors, knob_space, minimum_peak
from mpopt_hf import MemoryConfig
from mpopt_hf.model.blocks import find_blocks
from mpopt_hf.model.knobs import plan_knobs

# Published counts, or the published count with the head changed by arithmetic:
#  resnet50-cifar: torchvision resnet50 25,557,032 - 7x7 stem conv (9,408) + 3x3 (1,728) - 1000-class fc (2,049,000)
#                  + 10-class fc (20,490); mobilenetv2-cifar: torchvision mobilenet_v2 3,504,872 - its 1000-class
#                  classifier (1,281,000) + 10 classes (12,810); vit-b16: google/vit-base-patch16-224 86,567,656 - 769,000
#                  + 7,690 (10 labels); clip-b32: openai/clip-vit-base-patch32; gpt-neo-125m: EleutherAI/gpt-neo-125m.
PARAMETERS = {"resnet50-cifar": 23_520_842, "mobilenetv2-cifar": 2_236_682, "vit-b16": 85_806_346,
              "clip-b32": 151_277_313, "gpt-neo-125m": 125_198_592}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_real_size_architectures_have_the_published_parameter_count(name):
    with torch.device("meta"):
        model, _ = build(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


def test_sam_is_vit_b_at_its_native_size_and_its_input_size_is_a_parameter():
    with torch.device("meta"):
        native, _ = build("sam-vit-b", image_size=1024)
        small, _ = build("sam-vit-b")  # 512 px by default: the position embeddings shrink with the grid
    n_native = sum(p.numel() for p in native.parameters())
    assert abs(n_native - 93.7e6) < 0.05e6  # facebook/sam-vit-base: 93.7 M
    assert native.config.vision_config.num_hidden_layers == 12 and native.config.vision_config.hidden_size == 768
    assert small.config.vision_config.image_size == 512 and small.config.prompt_encoder_config.image_embedding_size == 32
    assert sum(p.numel() for p in small.parameters()) < n_native


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_tiny_variants_keep_the_family_and_make_a_batch_with_a_loss(name):
    with torch.device("meta"):
        full, _ = build(name)
    tiny, make = build(name, tiny=True)
    assert type(tiny) is type(full) and sum(p.numel() for p in tiny.parameters()) < 100_000
    assert torch.isfinite(tiny(**make(2)).loss)


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="clip-b32"):
        build("clip-b16")
    with pytest.raises(ValueError, match="resnet18"):
        build_named("resnet-18")


def _settings(**kw):
    return ablation.AblationSettings(**{"models": ("vit",), "batch_size": 32, **kw})


def test_ablation_rows_are_cumulative_in_the_order_they_say():
    rows = {r.label: r for r in ablation.ablation_rows(16, _settings())}
    assert list(rows)[:5] == ["baseline", "+ micro-batching", "+ bf16", "+ checkpointing", "+ freezing = all together"]
    assert rows["baseline"].config == MemoryConfig(32)
    assert rows["+ micro-batching"].config == MemoryConfig(8)
    assert rows["+ bf16"].config == MemoryConfig(8, precision="bf16")
    assert rows["+ checkpointing"].config == MemoryConfig(8, 0.0, 16, "bf16")  # micro-batching and bf16 still on
    assert rows["+ freezing = all together"].config == MemoryConfig(8, 0.5, 8, "bf16")  # every trainable block
    assert rows["+ freezing = all together"].knobs == ablation.CHAIN
    for label in ("bf16 alone", "checkpointing alone", "freezing alone"):
        changed = [f for f in ("micro_batch_size", "freeze_rate", "checkpoint_segments", "precision")
                   if getattr(rows[label].config, f) != getattr(rows["baseline"].config, f)]
        assert changed == [{"bf16 alone": "precision", "checkpointing alone": "checkpoint_segments",
                            "freezing alone": "freeze_rate"}[label]]
    assert not any("fp16" in r for r in rows)  # fp16 needs CUDA's loss scaler
    for r in rows.values():
        plan_knobs(r.config, 16)  # every configuration is valid for the model


def test_ablation_adds_lora_rows_only_for_models_with_linear_blocks():
    assert not any("LoRA" in r.label for r in ablation.ablation_rows(16, _settings()))
    rows = {r.label: r.config for r in ablation.ablation_rows(16, _settings(), lora=True)}
    assert rows["LoRA alone"] == MemoryConfig(32, lora_rank=8)
    assert rows["all together + LoRA"] == MemoryConfig(8, 0.5, 8, "bf16", lora_rank=8)


def test_ablation_adds_fp16_rows_on_cuda_only():
    rows = {r.label: r.config for r in ablation.ablation_rows(5, _settings(batch_size=6), "cuda")}
    assert rows["fp16 alone"] == MemoryConfig(6, precision="fp16")
    assert rows["all together, fp16"] == MemoryConfig(1, 0.5, 2, "fp16")  # 5 blocks: 3 frozen (halves round up)


def test_knob_space_is_every_divisor_freeze_count_and_segment_count():
    assert divisors(12) == [12, 6, 4, 3, 2, 1]
    space = knob_space(12, 3)
    assert len(space) == len(set(space)) == 2 * 6 * (4 + 3 + 2 + 1)  # precisions x divisors x sum of (trainable + 1)
    assert {c.micro_batch_size for c in space} == set(divisors(12))
    assert {(plan_knobs(c, 3).n_frozen, c.checkpoint_segments) for c in space} == {
        (k, s) for k in range(4) for s in range(4 - k)}
    kept = knob_space(12, 3, min_trainable_blocks=1)
    assert all(plan_knobs(c, 3).n_trainable >= 1 for c in kept) and len(kept) == len(space) - 2 * 6


@pytest.mark.usefixtures("one_torch_thread")
def test_minimum_search_finds_the_brute_force_minimum_of_exact_fake_steps():
    from mpopt_hf.testing.tiny_models import build_tiny, example_batch

    model = build_tiny("vit", num_layers=2)
    batch = example_batch(model, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    predictor = PeakPredictor(model, batch, optimizer)
    space = knob_space(2, find_blocks(model).n_blocks)
    brute = {c: predictor.exact_mib(c) for c in space}  # an exact fake step for every configuration
    found = minimum_peak(predictor, space, shortlist=4)
    assert found.n_configs == len(space)
    assert found.peak_mib == pytest.approx(min(brute.values()), abs=1e-3)
    assert brute[found.config] == pytest.approx(found.peak_mib)
    assert found.peak_mib < brute[MemoryConfig(2)]  # the knobs do save memory here


def _figure_results():
    row = {"config": MemoryConfig(4).to_dict(), "predicted_mib": 10.04, "exact_mib": 10.0, "peak_mib": 12.345,
           "tensor_peak_mib": 11.0, "step_s": 0.5, "categories_mib": {"weights": 2.0, "gradients": 2.0,
           "optimizer_state": 4.0, "activations": 2.5, "temporaries": 0.25, "inputs": 0.25},
           "dominant": "optimizer_state", "x_default": 1.0, "x_default_predicted": 1.0, "seed": None}
    low = {**row, "row": "minimum", "config": MemoryConfig(1, 1.0).to_dict(), "peak_mib": 2.5, "x_default": 0.2025,
           "seed": 0.04}
    return {"models": [{"model": "clip-b32", "batch_size": 4, "rows": [{**row, "row": "default"}, low]}]}


def test_card_table_shows_the_results_numbers_and_the_check_names_a_changed_row():
    results = _figure_results()
    spec = memory_figure.SPEC
    text = card.render_table(spec, memory_figure.records(results))
    parsed = card.parse_table(spec, "intro\n\n" + text + "\n\nafter")
    assert [r["measured peak MiB"] for r in parsed] == ["12.3", "2.5"]  # the results' numbers, 1 decimal
    assert parsed[1]["x default"] == "0.203" and parsed[1]["seed's figure"] == "x0.04"
    assert parsed[0]["temporaries + inputs"] == "0.5" and parsed[0]["largest"] == "optimizer_state"
    fresh = card.table_rows(spec, memory_figure.records(results))
    assert card.diff_tables(spec, fresh, parsed) == []
    changed = [dict(r) for r in parsed]
    changed[1]["measured peak MiB"], changed[0]["step s"] = "2.7", "99"  # memory differs, time is not compared
    assert card.diff_tables(spec, fresh, changed) == [
        "row 'clip-b32 / minimum': measured peak MiB is 2.7 in the card, 2.5 in the run"]
    assert card.diff_tables(spec, fresh, changed[:1])[0] == "row 'clip-b32 / minimum': in the run, missing from the card"


def test_memory_is_compared_to_one_decimal_and_ratios_to_a_hundredth():
    assert card._same("mib", "12.34", "12.3") and not card._same("mib", "12.36", "12.3")
    assert card._same("ratio", "0.20", "0.21") and not card._same("ratio", "0.20", "0.22")
    assert card._same("none", "1", "2") and not card._same("exact", "a", "b")
