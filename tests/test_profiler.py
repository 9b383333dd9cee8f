"""Measuring and predicting a step's memory on a tiny HF model (CPU; a CUDA variant is marked gpu)."""

from __future__ import annotations

import json
import statistics
import time

import pytest
import torch

from mpopt_hf.profiler import fitting
from mpopt_hf.config import MemoryConfig
from mpopt_hf.model.knobs import apply_memory_config, knob_state
from mpopt_hf.memory_model import Calibration, MemoryModel, config_space
from mpopt_hf.profiler import (
    Measurement,
    build_memory_model,
    fit_profile,
    measure,
    predict_step,
)
from mpopt_hf.store import open_store
from mpopt_hf.testing.tiny_models import build_tiny, example_batch

BATCH = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = build_tiny("vit", num_layers=2)
    batch = example_batch(model, BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, batch, optimizer


@pytest.fixture(scope="module")
def fitted(setup):
    model, batch, optimizer = setup
    space = config_space(BATCH, 2, ("fp32", "bf16"), (2, 4, 8), (0.0, 0.5, 1.0), (0, 1, 2))
    profile = fit_profile(model, batch, optimizer, space, store=None, n_measure=3, steps=1)
    return profile, space


def test_measure_restores_everything(setup):
    model, batch, optimizer = setup
    apply_memory_config(model, MemoryConfig(4, 0.5))
    weights = [p.detach().clone() for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    m = measure(model, batch, MemoryConfig(2, 0.0, 1, "bf16"), optimizer, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert knob_state(model).config == MemoryConfig(4, 0.5)
    assert len(optimizer.state) == 0 and torch.equal(torch.get_rng_state(), rng)
    assert m.peak_bytes >= m.tracked_peak_bytes == sum(m.categories().values())
    assert m.weights == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                             for b in model.buffers())
    assert m.gradients > 0 and m.optimizer_state > 0 and m.step_s > 0 and m.backend == "memtracker+profiler"
    assert Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_fake_step_predicts_tracked_peak_exactly(setup):
    model, batch, optimizer = setup
    for config in (MemoryConfig(4, 0.5, 1), MemoryConfig(8, 1.0, 0, "bf16")):
        real = measure(model, batch, config, optimizer, steps=1)
        fake = predict_step(model, batch, config, optimizer)
        assert fake.backend == "fake"
        assert fake.peak_bytes == pytest.approx(real.tracked_peak_bytes, rel=0.005), config.short()


def test_prediction_error_on_unmeasured_configurations(setup, fitted):
    """On configurations the fit did not measure, split as the machine splits them:

    * tensor bytes (weights, gradients, optimizer state, activations, temporaries) are deterministic: the
      traced model without calibration against MemTracker's tracked peak, on every configuration, within
      the envelope the model takes by construction (never more than 0.2 % under, at most 4 % over);
    * what the machine adds (allocator rounding, oneDNN / MKL buffers) is calibrated here and depends on
      the kernels: fp32 totals stay within the acceptance bound (median <= 3 %, max <= 8 %) whatever the
      ISA (checked under ONEDNN_MAX_CPU_ISA=AVX2 / MKL_ENABLE_INSTRUCTIONS=AVX2 and unset), while bf16
      kernels differ between CPUs with and without bf16 / AMX units (34 % seen on one), so for bf16 only
      what holds everywhere is asserted: the machine adds, never removes, bytes, and the calibration
      never predicts less than the tensors. Total accuracy per CPU is the benchmark's (BENCHMARKS.md).
    """
    model, batch, optimizer = setup
    profile, space = fitted
    assert len(profile.measurements) <= 3
    bare = MemoryModel(profile.model.structure, profile.model.spans, Calibration())
    unmeasured = [c for c in space if c not in {m.config for m in profile.measurements}]
    subset = unmeasured[:: max(1, len(unmeasured) // 8)][:8]
    assert {c.precision for c in subset} == {"fp32", "bf16"}
    fp32_errors = []
    for config in subset:
        measured = measure(model, batch, config, optimizer, steps=1, warmup=1)
        tensors = bare.predict(config, BATCH).peak_bytes
        assert -0.002 <= tensors / measured.tracked_peak_bytes - 1 <= 0.04, config.short()
        predicted = profile.model.predict(config, BATCH).peak_bytes
        assert predicted >= tensors and measured.peak_bytes >= measured.tracked_peak_bytes, config.short()
        if config.precision == "fp32":
            fp32_errors.append(abs(predicted / measured.peak_bytes - 1))
    assert statistics.median(fp32_errors) <= 0.03 and max(fp32_errors) <= 0.08, fp32_errors


def test_prediction_is_fast(fitted):
    profile, space = fitted
    start = time.perf_counter()
    predictions = [profile.model.predict(c, BATCH) for c in space]
    per_config = (time.perf_counter() - start) / len(space)
    assert per_config < 0.5 and all(p.step_s > 0 for p in predictions)


def test_second_run_reuses_the_stored_fit(setup, tmp_path, monkeypatch):
    model, batch, optimizer = setup
    space = config_space(BATCH, 2, ("fp32",), (4, 8), (0.0, 0.5), (0, 1))
    with open_store(tmp_path / "p.sqlite") as store:
        first = fit_profile(model, batch, optimizer, space, store, n_measure=1, steps=1)
    assert not first.reused and len(first.measurements) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("the stored fit should have been reused")

    monkeypatch.setattr(fitting, "measure", no_measuring)  # what fit_profile calls
    monkeypatch.setattr(fitting, "build_memory_model", no_measuring)
    with open_store(tmp_path / "p.sqlite") as store:
        second = fit_profile(model, batch, optimizer, space, store, n_measure=1, steps=1)
    assert second.reused and second.measurements == first.measurements
    assert second.model.predict(space[0], BATCH) == first.model.predict(space[0], BATCH)


def test_fit_needs_at_most_three_measurements(setup):
    model, batch, optimizer = setup
    with pytest.raises(ValueError, match="n_measure must be in 0..3"):
        fit_profile(model, batch, optimizer, [MemoryConfig(2)], n_measure=4)


def test_model_without_loss_is_named(setup):
    model, batch, optimizer = setup
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="no scalar loss"):
        measure(model, no_labels, MemoryConfig(4), optimizer, steps=1)


def test_memory_model_of_a_plain_module():
    """Not only HF models: a plain torch module whose blocks the generic finder sees."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Linear(16, 32)
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU())
                                              for _ in range(3))
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x, labels):
            h = self.stem(x)
            for layer in self.layers:
                h = h + layer(h)
            return torch.nn.functional.cross_entropy(self.head(h), labels)

    net = Net()
    batch = {"x": torch.randn(8, 16), "labels": torch.randint(0, 4, (8,))}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    memory_model = build_memory_model(net, batch, optimizer, ("fp32",))
    for config in (MemoryConfig(8), MemoryConfig(2, 1 / 3, 1), MemoryConfig(4, 1.0)):
        exact = predict_step(net, batch, config, optimizer).peak_bytes
        assert memory_model.predict(config, 8).peak_bytes == pytest.approx(exact, rel=0.05), config.short()


@pytest.mark.gpu
def test_cuda_measurement_and_prediction():
    model = build_tiny("vit", num_layers=2).cuda()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in example_batch(model, BATCH).items()}
    optimizer = torch.optim.AdamW(model.parameters())
    space = config_space(BATCH, 2, ("fp32", "bf16", "fp16"), (2, 4, 8), (0.0, 0.5), (0, 1))
    profile = fit_profile(model, batch, optimizer, [c for c in space if c.precision != "fp16"], n_measure=3, steps=1)
    m = measure(model, batch, MemoryConfig(4, 0.5, 1, "bf16"), optimizer, steps=1)
    assert m.backend == "cuda" and m.reserved_bytes >= m.peak_bytes > 0
    predicted = profile.model.predict(MemoryConfig(4, 0.5, 1, "bf16"), BATCH).peak_bytes
    assert abs(predicted / m.peak_bytes - 1) <= 0.08
