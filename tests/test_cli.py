"""The ``mpopt profile`` command end to end on a tiny model, and its answers to bad input."""

from __future__ import annotations

import json
import re

import pytest

from mpopt_hf.cli import EXIT_BAD_INPUT, EXIT_BUDGET_TOO_SMALL, SUBCOMMANDS, build_parser, main, parse_input_shape

SMALL_SPACE = ["--batch-size", "8", "--precisions", "fp32", "--micro-batch-sizes", "4,8", "--freeze-rates", "0,1",
               "--checkpoint-segments", "0,1", "--steps", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store") / "profiles.sqlite")


def test_json_rows_then_reuse_from_store(capsys, store):
    code, out, _ = run(capsys, "profile", "--model", "tiny-vit", "--input-shape", "3,32,32", *SMALL_SPACE,
                       "--fit-measurements", "1", "--measure", "1", "--json", "--store", store)
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 6  # 2 micro-batch sizes x (freeze 0: ckpt 0/1, freeze 1: ckpt 0)
    for row in rows:
        assert {"micro_batch_size", "freeze_rate", "checkpoint_segments", "precision", "predicted_peak_mib",
                "predicted_step_s", "fits"} <= set(row)
        assert row["fits"] is None and row["predicted_peak_mib"] > 0
    measured = [r for r in rows if r["measured"]]
    assert len(measured) == 2 and sum(r["used_for_fit"] for r in measured) == 1
    for row in measured:
        assert row["measured_peak_mib"] > 0 and row["measured_step_s"] > 0
        assert abs(row["peak_error"]) < 0.08

    code, out, _ = run(capsys, "profile", "--model", "tiny-vit", "--input-shape", "3,32,32", *SMALL_SPACE,
                       "--fit-measurements", "1", "--budget-mib", "1000", "--store", store)
    assert code == 0
    assert "fit reused from the store" in out and "6 of 6 configurations fit 1000 MiB less a margin of 0.05" in out
    assert "peak MiB" in out.splitlines()[1]


def test_a_configuration_fits_the_budget_less_the_engines_margin(capsys, store):
    """The CLI judges "fits" as the engine does: the predicted peak at most budget x (1 - safety margin)."""
    flags = ["profile", "--model", "tiny-vit", "--input-shape", "3,32,32", *SMALL_SPACE, "--fit-measurements", "1",
             "--json", "--store", store]
    _, out, _ = run(capsys, *flags)
    smallest = min(r["predicted_peak_mib"] for r in json.loads(out))
    budget = smallest / 0.97  # the smallest fits 97 % of it: inside the budget, not inside 95 % of it
    code, _, err = run(capsys, *flags, "--budget-mib", f"{budget:.6f}")
    assert code == EXIT_BUDGET_TOO_SMALL and "less its safety margin of 0.05" in err
    code, out, _ = run(capsys, *flags, "--budget-mib", f"{budget:.6f}", "--safety-margin", "0")
    rows = json.loads(out)
    assert code == 0 and min(rows, key=lambda r: r["predicted_peak_mib"])["fits"] is True
    assert all(not r["fits"] for r in rows if r["predicted_peak_mib"] > 1.001 * budget)
    with pytest.raises(SystemExit):
        main([*flags, "--safety-margin", "0.5"])
    assert "--safety-margin must be a number in [0, 0.5), got '0.5'" in capsys.readouterr().err


def test_budget_below_minimum_exits_nonzero_naming_it(capsys, store):
    code, _, err = run(capsys, "profile", "--model", "tiny-vit", "--input-shape", "3,32,32", *SMALL_SPACE,
                       "--fit-measurements", "1", "--budget-mib", "0.01", "--json", "--store", store)
    assert code == EXIT_BUDGET_TOO_SMALL
    assert "below the smallest predicted peak" in err and "MiB (reached by mb4/f1.00/ckpt0/fp32)" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "resnet9000", "--input-shape", "3,32,32"], "Unknown --model 'resnet9000'; accepted: a small_cnn"),
        (["--model", "tiny-vit", "--input-shape", "3,x,32"], "--input-shape must be comma-separated"),
        (["--model", "tiny-vit", "--input-shape", "3,32"], "C,H,W for images"),
        (["--model", "tiny-vit", "--input-shape", "1,32,32"], "must have 3 channels"),
        (["--model", "tiny-gpt-neo", "--input-shape", "3,32,32"], "one sequence length up to"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--precisions", "fp8"], "accepted: ['fp32', 'bf16'"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--freeze-rates", "0,half"], "--freeze-rates must be"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--freeze-rates", "1.5"], "freeze_rate must be in [0, 1]"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--checkpoint-policies", "block,sac"],
         "--checkpoint-policies ['sac'] unknown (in 'block,sac'); accepted: ['block', 'selective']"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--optimizer-states", "fp32,4bit"],
         "--optimizer-states ['4bit'] unknown (in 'fp32,4bit'); accepted: ['fp32', '8bit']"),
        (["--model", "tiny-vit", "--input-shape", "3,32,32", "--lora-ranks", "0,-4"], "--lora-ranks must be"),
    ],
)
def test_bad_input_names_value_and_what_is_accepted(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "profile", *argv, "--no-store")
    assert code == EXIT_BAD_INPUT and message in err


@pytest.mark.parametrize("budget", ["-5", "0", "abc"])
def test_non_positive_budget_is_refused_by_the_parser(capsys, budget):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--model", "tiny-vit", "--input-shape", "3,32,32", "--budget-mib", budget])
    assert exc.value.code == 2
    assert f"--budget-mib must be a positive number of MiB, got '{budget}'" in capsys.readouterr().err


def test_parser_is_extensible():
    assert "profile" in SUBCOMMANDS
    SUBCOMMANDS["noop"] = lambda sub: sub.add_parser("noop").set_defaults(handler=lambda args: 0)
    try:
        assert build_parser().parse_args(["noop"]).command == "noop"
        assert main(["noop"]) == 0
    finally:
        del SUBCOMMANDS["noop"]


def test_input_shape_parsing():
    assert parse_input_shape("3, 32,32") == (3, 32, 32) and parse_input_shape("128") == (128,)


def test_device_flag_accepts_cpu_and_cuda_indices_only():
    import argparse

    from mpopt_hf.cli import device_arg

    assert [device_arg(d) for d in ("cpu", "cuda", "cuda:1", "CUDA:0")] == ["cpu", "cuda", "cuda:1", "cuda:0"]
    for bad in ("tpu", "cuda:", "cuda:-1", "cpu:0", "mps", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"--device must be one of cpu, cuda, cuda:N.*{bad!r}"):
            device_arg(bad)


def test_checkpoint_segments_within_the_model_still_profile(capsys):
    code, out, err = run(capsys, "profile", "--model", "tiny-vit", "--input-shape", "3,32,32", "--batch-size", "4",
                         "--precisions", "fp32", "--micro-batch-sizes", "4", "--freeze-rates", "0",
                         "--checkpoint-segments", "4", "--fit-measurements", "0", "--json", "--no-store")
    assert code == 0, err
    assert [r["checkpoint_segments"] for r in json.loads(out)] == [4]


def test_selective_checkpointing_is_profiled_when_listed(capsys):
    code, out, err = run(capsys, "profile", "--model", "tiny-vit", "--input-shape", "3,32,32", "--batch-size", "4",
                         "--precisions", "fp32", "--micro-batch-sizes", "4", "--freeze-rates", "0",
                         "--checkpoint-segments", "0,2", "--checkpoint-policies", "block,selective",
                         "--fit-measurements", "0", "--json", "--no-store")
    assert code == 0, err
    rows = {(r["checkpoint_segments"], r["checkpoint_policy"]): r["predicted_peak_mib"] for r in json.loads(out)}
    assert list(rows) == [(0, "block"), (2, "block"), (2, "selective")]
    assert rows[(2, "block")] < rows[(2, "selective")] < rows[(0, "block")]


def test_8_bit_optimizer_state_is_profiled_when_listed(capsys):
    pytest.importorskip("bitsandbytes")
    code, out, err = run(capsys, "profile", "--model", "tiny-gpt-neo", "--input-shape", "32", "--batch-size", "4",
                         "--precisions", "fp32", "--micro-batch-sizes", "4", "--freeze-rates", "0",
                         "--checkpoint-segments", "0", "--optimizer-states", "fp32,8bit",
                         "--fit-measurements", "0", "--json", "--no-store")
    assert code == 0, err
    state = {r["optimizer_state"]: r["predicted_optimizer_state_mib"] for r in json.loads(out)}
    assert list(state) == ["fp32", "8bit"] and 0 < state["8bit"] < state["fp32"]


def test_lora_ranks_are_profiled_by_a_fake_step_when_listed(capsys):
    """Rows with adapters: the fake step's bytes plus the fit's workspace, fewer optimizer-state bytes than full
    training, and one of them measured; the error stays within the profiler's bounds."""
    code, out, err = run(capsys, "profile", "--model", "tiny-gpt-neo", "--input-shape", "32", "--batch-size", "4",
                         "--precisions", "fp32", "--micro-batch-sizes", "4", "--freeze-rates", "0",
                         "--checkpoint-segments", "0", "--lora-ranks", "0,4", "--fit-measurements", "1",
                         "--measure", "1", "--json", "--no-store")
    assert code == 0, err
    rows = {r["lora_rank"]: r for r in json.loads(out)}
    assert list(rows) == [0, 4] and rows[4]["peak_phase"] == "fake step (LoRA)"
    assert 0 < rows[4]["predicted_optimizer_state_mib"] < rows[0]["predicted_optimizer_state_mib"]
    assert rows[4]["predicted_step_s"] == rows[0]["predicted_step_s"]  # the twin's: an upper bound
    measured = [r for r in rows.values() if r["measured"]]
    assert len(measured) == 2 and all(abs(r["peak_error"]) < 0.1 for r in measured)


# ---------------------------------------------------------------------------- the arguments as a dataclass


def parsed(*argv):
    """`ProfileArguments` as ``mpopt profile ARGV`` builds them, without running the command."""
    from mpopt_hf.cli import ProfileArguments
    from mpopt_hf.cli.parsing import dataclass_from

    return dataclass_from(ProfileArguments, build_parser().parse_args(["profile", *argv]))


def test_profile_arguments_parse_from_a_json_file_as_from_the_flags(tmp_path):
    from transformers import HfArgumentParser

    from mpopt_hf.cli import ProfileArguments

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"model": "tiny-vit", "input_shape": [3, 32, 32], "batch_size": 8, "budget_mib": 512,
                                "micro_batch_sizes": [4, 8], "freeze_rates": [0, 1], "precisions": ["fp32"],
                                "device": "CPU", "no_store": True}))
    (from_json,) = HfArgumentParser(ProfileArguments).parse_json_file(path)
    assert from_json == parsed("--model", "tiny-vit", "--input-shape", "3,32,32", "--batch-size", "8",
                               "--budget-mib", "512", "--micro-batch-sizes", "4,8", "--freeze-rates", "0,1",
                               "--precisions", "fp32", "--no-store")
    assert from_json.input_shape == [3, 32, 32] and from_json.freeze_rates == [0.0, 1.0]
    assert from_json.device == "cpu" and from_json.checkpoint_segments is None


def test_list_flags_take_commas_or_spaces_and_flags_their_field_names():
    from mpopt_hf.cli import ProfileArguments

    commas = parsed("--model", "tiny-vit", "--input-shape", "3,32,32", "--micro-batch-sizes", "1,2,4",
                    "--checkpoint-segments", "0,2")
    spaces = parsed("--model", "tiny-vit", "--input_shape", "3", "32", "32", "--micro_batch_sizes", "1", "2", "4",
                    "--checkpoint-segments", "0", "2")
    assert commas == spaces
    assert commas.micro_batch_sizes == [1, 2, 4] and commas.checkpoint_segments == [0, 2]
    in_python = ProfileArguments(model="tiny-vit", input_shape="3,32,32", micro_batch_sizes="1,2,4",
                                 checkpoint_segments=[0, 2])  # a comma-separated str is read as the flag's text
    assert in_python == commas


@pytest.mark.parametrize(
    "changes, raises, message",
    [
        ({"batch_size": 0}, ValueError, "--batch-size must be an integer >= 1, got 0"),
        ({"batch_size": "8"}, TypeError, "--batch-size must be an integer >= 1, got '8' (str)"),
        ({"budget_mib": float("inf")}, ValueError, "--budget-mib must be a positive number of MiB, got inf"),
        ({"device": "tpu"}, ValueError, "--device must be one of cpu, cuda, cuda:N"),
        ({"input_shape": [3, 32]}, ValueError, "--input-shape must be C,H,W"),
        ({"freeze_rates": [0, 2]}, ValueError, "--freeze-rates '0,2': each freeze_rate must be in [0, 1]; got [2.0]"),
        ({"micro_batch_sizes": [1.5]}, ValueError, "--micro-batch-sizes must be comma-separated"),
        ({"store": "x.sqlite", "no_store": True}, ValueError, "--store 'x.sqlite' and --no-store exclude each other"),
    ],
)
def test_a_bad_field_raises_naming_its_flag_and_value(changes, raises, message):
    from mpopt_hf.cli import ProfileArguments

    with pytest.raises(raises, match=re.escape(message)):
        ProfileArguments(**{"model": "tiny-vit", "input_shape": [3, 32, 32], **changes})


def test_profile_help_lists_each_flag_once_by_its_dashed_name(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "--micro-batch-sizes LIST" in out and "--batch-size N" in out and "(default: 32)" in out
    assert "--batch_size" not in out.replace("(--batch_size)", "")
