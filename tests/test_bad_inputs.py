"""Every input is checked where it enters: bad values of the dataclasses, of the ``mpopt`` CLI and of the recipe
raise (or exit non-zero) with a message that names the field or flag and the value (issue 12, item 5).

One table, one parametrised test. Each row: how the bad input is given, what it must raise (an exception type, or
``EXIT`` for a command that must exit non-zero), and the substrings the message must hold (the field, the value,
and where useful what is allowed). Nothing trains: the CLI rows fail before the profile is fitted and the recipe
rows call its `parse` (or build its argument dataclasses) directly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import pytest

from mpopt_hf.config import InvalidTypeError, MemoryConfig, MPOptArguments

NAN, INF = math.nan, math.inf
EXIT = "exit"  # the command must exit with EXIT_BAD_INPUT (2) and say why on stderr
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # a folder without config.json


@dataclass
class Bad:
    kind: str  # "call": call `target`; "cli": `mpopt` argv; "recipe": clip_online.run.parse(argv)
    target: Any
    raises: Any
    says: tuple[str, ...]


def call(fn, raises, *says):
    return Bad("call", fn, raises, says)


def cli(*argv_and_says, raises=EXIT):
    """``mpopt profile`` on the tiny ViT with a small batch; ``argv`` then the message's substrings after ``--``."""
    cut = argv_and_says.index("--")
    return Bad("cli", list(argv_and_says[:cut]), raises, tuple(argv_and_says[cut + 1:]))


def recipe(argv, raises, *says):
    return Bad("recipe", list(argv), raises, says)


def mpopt(**kwargs):
    return lambda: MPOptArguments(**kwargs)


def memory(*args, **kwargs):
    return lambda: MemoryConfig(*args, **kwargs)


def hf_parse(*flags):
    def parse():
        from transformers import HfArgumentParser

        return HfArgumentParser(MPOptArguments).parse_args_into_dataclasses(list(flags))

    return parse


def run_dataclass(name, **kwargs):
    def build():
        from clip_online import run

        return getattr(run, name)(**kwargs)

    return build


def online(**kwargs):
    def build():
        from mpopt_hf.online import OnlineRetrainer
        from mpopt_hf.testing.tiny_models import build_tiny
        from transformers import TrainingArguments

        args = TrainingArguments(output_dir=TESTS_DIR, use_cpu=True, report_to=[], per_device_train_batch_size=4)
        return OnlineRetrainer(build_tiny("vit"), args, show_progress=False, **kwargs)

    return build


def classifier_config(**kwargs):
    def build():
        from clip_online.modeling import CLIPClassifierConfig

        return CLIPClassifierConfig(**kwargs)

    return build


def load_clip(path):
    def load():
        from clip_online.loading import load_clip

        return load_clip(path)

    return load


CASES = {
    # ------------------------------------------------------------------ the CLIP classifier and its loader
    "classifier/confidence_margin='0.4'": call(classifier_config(confidence_margin="0.4"), TypeError,
                                               "CLIPClassifierConfig.confidence_margin", "'0.4'"),
    "classifier/confidence_margin=True": call(classifier_config(confidence_margin=True), TypeError,
                                              "CLIPClassifierConfig.confidence_margin", "True", "bool"),
    "classifier/logit_scale=nan": call(classifier_config(logit_scale=NAN), ValueError,
                                       "CLIPClassifierConfig.logit_scale", "nan"),
    "classifier/image_std=0": call(classifier_config(image_std=[0.3, 0.0, 0.3]), ValueError,
                                   "CLIPClassifierConfig.image_std", "0", "> 0"),
    "classifier/image_mean=2 values": call(classifier_config(image_mean=[0.5, 0.5]), ValueError,
                                           "CLIPClassifierConfig.image_mean", "[0.5, 0.5]", "3 numbers"),
    "load_clip//nonexistent": call(load_clip("/nonexistent"), FileNotFoundError, "'/nonexistent'", "does not exist"),
    # ------------------------------------------------------------------ OnlineRetrainer
    "online/budget_mib='64'": call(online(budget_mib="64"), TypeError, "OnlineRetrainer.budget_mib", "'64'"),
    "online/budget_mib=True": call(online(budget_mib=True), TypeError, "OnlineRetrainer.budget_mib", "True", "bool"),
    "online/budget_mib=-1": call(online(budget_mib=-1.0), ValueError, "OnlineRetrainer.budget_mib", "-1.0", "> 0"),
    "online/seconds_per_task=inf": call(online(seconds_per_task=INF), ValueError, "OnlineRetrainer.seconds_per_task",
                                        "inf", "finite"),
    "online/eval_batch_size=0": call(online(eval_batch_size=0), ValueError, "OnlineRetrainer.eval_batch_size", "0"),
    "online/memory_config=dict": call(online(memory_config={"micro_batch_size": 2}), TypeError,
                                      "OnlineRetrainer.memory_config", "dict"),
    # ------------------------------------------------------------------ MemoryConfig
    "memory/micro_batch_size=True": call(memory(True), TypeError, "MemoryConfig.micro_batch_size", "True", "bool"),
    "memory/micro_batch_size='8'": call(memory("8"), TypeError, "MemoryConfig.micro_batch_size", "'8'", "int >= 1"),
    "memory/freeze_rate=nan": call(memory(8, freeze_rate=NAN), ValueError, "MemoryConfig.freeze_rate", "nan", "[0, 1]"),
    "memory/freeze_rate='0.5'": call(memory(8, freeze_rate="0.5"), TypeError, "MemoryConfig.freeze_rate", "'0.5'"),
    "memory/checkpoint_segments=1.0": call(memory(8, checkpoint_segments=1.0), TypeError,
                                           "MemoryConfig.checkpoint_segments", "1.0", "int >= 0"),
    "memory/precision=None": call(memory(8, precision=None), TypeError, "MemoryConfig.precision", "None", "'fp32'"),
    "memory/parse(None)": call(lambda: MemoryConfig.parse(None), TypeError, "MemoryConfig.parse", "None",
                               "mb8/f0.5/ckpt2/bf16"),
    "memory/parse two precisions": call(lambda: MemoryConfig.parse("mb8/bf16/fp32"), ValueError, "'mb8/bf16/fp32'",
                                        "two precisions", "'bf16'", "'fp32'"),
    "memory/parse f1.5": call(lambda: MemoryConfig.parse("mb8/f1.5"), ValueError, "'mb8/f1.5'",
                              "MemoryConfig.freeze_rate", "1.5"),
    "memory/parse no mb": call(lambda: MemoryConfig.parse("f0.5/bf16"), ValueError, "'f0.5/bf16'", "micro-batch"),
    "memory/from_dict list": call(lambda: MemoryConfig.from_dict([8]), TypeError, "MemoryConfig.from_dict", "[8]"),
    # ------------------------------------------------------------------ MPOptArguments
    "mpopt/memory_budget_mib='lots'": call(mpopt(memory_budget_mib="lots"), ValueError,
                                           "MPOptArguments.memory_budget_mib", "'lots'", "'auto'"),
    "mpopt/memory_budget_mib=True": call(mpopt(memory_budget_mib=True), TypeError, "memory_budget_mib", "True", "bool"),
    "mpopt/memory_budget_mib=inf": call(mpopt(memory_budget_mib=INF), ValueError, "memory_budget_mib", "inf", "> 0"),
    "mpopt/micro_batch_sizes=8": call(mpopt(micro_batch_sizes=8), TypeError, "MPOptArguments.micro_batch_sizes", "8",
                                      "list", "[8]"),
    "mpopt/micro_batch_sizes=[8, 2.5]": call(mpopt(micro_batch_sizes=[8, 2.5]), ValueError, "micro_batch_sizes",
                                             "[2.5]", "ints >= 1"),
    "mpopt/freeze_rates nan": call(mpopt(freeze_rates=[0.5, NAN]), ValueError, "MPOptArguments.freeze_rates", "[nan]"),
    "mpopt/freeze_rates=0.5": call(mpopt(freeze_rates=0.5), TypeError, "freeze_rates", "0.5", "list"),
    "mpopt/precisions='bf16'": call(mpopt(precisions="bf16"), TypeError, "MPOptArguments.precisions", "'bf16'", "list"),
    "mpopt/checkpoint_segments=[True]": call(mpopt(checkpoint_segments=[True]), ValueError, "checkpoint_segments",
                                             "[True]", "ints >= 0"),
    "mpopt/significance=nan": call(mpopt(significance=NAN), ValueError, "MPOptArguments.significance", "nan", ">= 0"),
    "mpopt/exploration=nan": call(mpopt(exploration=NAN), ValueError, "MPOptArguments.exploration", "nan", ">= 0"),
    "mpopt/exploration=inf": call(mpopt(exploration=INF), ValueError, "exploration", "inf", "finite"),
    "mpopt/trial_steps=2.5": call(mpopt(trial_steps=2.5), TypeError, "MPOptArguments.trial_steps", "2.5", "int >= 1"),
    "mpopt/trial_steps='4'": call(mpopt(trial_steps="4"), TypeError, "trial_steps", "'4'"),
    "mpopt/safety_margin=nan": call(mpopt(safety_margin=NAN), ValueError, "safety_margin", "nan", "[0, 0.5)"),
    "mpopt/discount=1.5": call(mpopt(discount=1.5), ValueError, "MPOptArguments.discount", "1.5", "[0, 1]"),
    "mpopt/trial_max_s=0": call(mpopt(trial_max_s=0), ValueError, "trial_max_s", "0", "> 0"),
    "mpopt/time_budget_s=nan": call(mpopt(time_budget_s=NAN), ValueError, "time_budget_s", "nan"),
    "mpopt/drift_threshold=inf": call(mpopt(drift_threshold=INF), ValueError, "drift_threshold", "inf", "or None"),
    "mpopt/retune_every_steps=-1": call(mpopt(retune_every_steps=-1), ValueError, "retune_every_steps", "-1", ">= 0"),
    "mpopt/bn_min_micro_batch=0": call(mpopt(bn_min_micro_batch=0), ValueError, "bn_min_micro_batch", "0", ">= 1"),
    "mpopt/late_gain='false'": call(mpopt(late_gain="false"), TypeError, "MPOptArguments.late_gain", "'false'"),
    "mpopt/strategy=1": call(mpopt(strategy=1), TypeError, "MPOptArguments.strategy", "1", "'race'"),
    "mpopt/gain_metric='accuracy'": call(mpopt(gain_metric="accuracy"), ValueError, "gain_metric", "'accuracy'",
                                         "'val_accuracy'"),
    "mpopt/cost_predictor='exact'": call(mpopt(cost_predictor="exact"), ValueError, "cost_predictor", "'exact'"),
    "mpopt/profile_store=''": call(mpopt(profile_store=""), ValueError, "MPOptArguments.profile_store", "''"),
    "hf/--significance nan": call(hf_parse("--significance", "nan"), ValueError, "significance", "nan"),
    "hf/--freeze_rates 0 inf": call(hf_parse("--freeze_rates", "0", "inf"), ValueError, "freeze_rates", "[inf]"),
    # ------------------------------------------------------------------ the mpopt CLI
    "cli/--checkpoint-segments 99": cli("--checkpoint-segments", "99", "--",
                                        "--checkpoint-segments", "[99]", "0..4", "tiny-vit"),
    "cli/--checkpoint-segments beyond the trainable blocks": cli(
        "--freeze-rates", "1", "--checkpoint-segments", "1", "--",
        "--checkpoint-segments", "[1]", "--freeze-rates", "[1.0]"),
    "cli/--device tpu": cli("--device", "tpu", "--", "argument --device", "'tpu'", "cpu, cuda, cuda:N"),
    "cli/--device cuda:x": cli("--device", "cuda:x", "--", "--device", "'cuda:x'"),
    "cli/--model /nonexistent": cli("--model", "/nonexistent", "--", "--model", "/nonexistent", "does not exist",
                                    "hub id"),
    "cli/--model folder without config.json": cli("--model", TESTS_DIR, "--", "--model", TESTS_DIR,
                                                  "without config.json"),
    "cli/--freeze-rates nan": cli("--freeze-rates", "0,nan", "--", "--freeze-rates", "'0,nan'", "[nan]", "[0, 1]"),
    "cli/--micro-batch-sizes 0,16": cli("--micro-batch-sizes", "0,4,16", "--", "--micro-batch-sizes", "[0, 16]",
                                        "1..8"),
    "cli/--batch-size true": cli("--batch-size", "true", "--", "--batch-size", "'true'", "integer >= 1"),
    "cli/--budget-mib nan": cli("--budget-mib", "nan", "--", "--budget-mib", "'nan'", "positive"),
    "cli/--budget-mib inf": cli("--budget-mib", "inf", "--", "--budget-mib", "'inf'"),
    "cli/--steps 1.5": cli("--steps", "1.5", "--", "--steps", "'1.5'"),
    "cli/--measure -1": cli("--measure", "-1", "--", "--measure", "'-1'", ">= 0"),
    "cli/--fit-measurements 4": cli("--fit-measurements", "4", "--", "--fit-measurements", "4"),
    "cli/--precisions fp8": cli("--precisions", "fp32,fp8", "--", "--precisions", "'fp8'", "'bf16'"),
    "cli/--input-shape 3,0,32": cli("--input-shape", "3,0,32", "--", "--input-shape", "'3,0,32'", "positive"),
    "cli/--store ''": cli("--store", "", "--", "--store", "''"),
    "cli/--store with --no-store": cli("--store", "x.sqlite", "--no-store", "--", "--store", "--no-store"),
    # ------------------------------------------------------------------ the recipe (clip_online.run)
    "recipe/--model /nonexistent": recipe(["--model", "/nonexistent"], ValueError, "ModelArguments.model",
                                          "'/nonexistent'", "does not exist", "hub id needs the hub"),
    "recipe/--model folder without config.json": recipe(["--model", TESTS_DIR], ValueError, "ModelArguments.model",
                                                        TESTS_DIR, "without config.json"),
    "recipe/--severity 0": recipe(["--severity", "0"], ValueError, "DataArguments.severity", "0", "1..5"),
    "recipe/--corruptions smoke": recipe(["--corruptions", "fog", "smoke"], ValueError, "DataArguments.corruptions",
                                         "['smoke']", "'fog'"),
    "recipe/--data_dir with digits": recipe(["--data_dir", TESTS_DIR], ValueError, "DataArguments.data_dir", TESTS_DIR,
                                            "cifar10-c"),
    "recipe/--stream_seed -1": recipe(["--stream_seed", "-1"], ValueError, "DataArguments.stream_seed", "-1"),
    "recipe/--budget_fraction nan": recipe(["--budget_fraction", "nan"], ValueError, "RunArguments.budget_fraction",
                                           "nan", "(0, 1]"),
    "recipe/--seconds_per_task inf": recipe(["--seconds_per_task", "inf"], ValueError, "RunArguments.seconds_per_task",
                                            "inf"),
    "recipe/--fixed_config two precisions": recipe(["--baseline", "fixed", "--fixed_config", "mb8/bf16/fp32"],
                                                   ValueError, "RunArguments.fixed_config", "'mb8/bf16/fp32'",
                                                   "two precisions"),
    "recipe/--fixed_config without --baseline fixed": recipe(["--fixed_config", "mb8"], ValueError,
                                                             "RunArguments.fixed_config", "'mb8'", "--baseline"),
    "recipe/--confidence_margin nan": recipe(["--confidence_margin", "nan"], ValueError,
                                             "ModelArguments.confidence_margin", "nan", "(0, 1]"),
    "recipe/--templates without {}": recipe(["--templates", "a photo"], ValueError, "ModelArguments.templates",
                                            "['a photo']", "'{}'"),
    "recipe/--pretrain_steps -1": recipe(["--pretrain_steps", "-1"], ValueError, "ModelArguments.pretrain_steps", "-1"),
    "recipe/--pretrain_lr inf": recipe(["--pretrain_lr", "inf"], ValueError, "ModelArguments.pretrain_lr", "inf"),
    "recipe/--memory_budget_mib nan": recipe(["--memory_budget_mib", "nan"], ValueError,
                                             "MPOptArguments.memory_budget_mib", "nan"),
    "recipe/--micro_batch_sizes 0": recipe(["--micro_batch_sizes", "16", "0"], ValueError,
                                           "MPOptArguments.micro_batch_sizes", "[0]"),
    "recipe/ModelArguments(local_files_only='yes')": call(run_dataclass("ModelArguments", local_files_only="yes"),
                                                          TypeError, "ModelArguments.local_files_only", "'yes'"),
    "recipe/ModelArguments(templates='a {}')": call(run_dataclass("ModelArguments", templates="a {}"), TypeError,
                                                    "ModelArguments.templates", "'a {}'", "list"),
    "recipe/DataArguments(severity=True)": call(run_dataclass("DataArguments", severity=True), TypeError,
                                                "DataArguments.severity", "True"),
    "recipe/DataArguments(corruptions='fog')": call(run_dataclass("DataArguments", corruptions="fog"), TypeError,
                                                    "DataArguments.corruptions", "'fog'", "['fog']"),
    "recipe/DataArguments(train_per_task=2.5)": call(run_dataclass("DataArguments", train_per_task=2.5), TypeError,
                                                     "DataArguments.train_per_task", "2.5"),
    "recipe/RunArguments(budget_fraction='0.5')": call(run_dataclass("RunArguments", budget_fraction="0.5"),
                                                       TypeError, "RunArguments.budget_fraction", "'0.5'"),
    "recipe/RunArguments(measure_peak=1)": call(run_dataclass("RunArguments", measure_peak=1), TypeError,
                                                "RunArguments.measure_peak", "1"),
}


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_naming_field_and_value(case, capsys):
    if case.kind == "cli":
        from mpopt_hf.cli import EXIT_BAD_INPUT, main

        argv = ["profile", "--model", "tiny-vit", "--input-shape", "3,32,32", "--batch-size", "8", *case.target]
        if "--store" not in case.target and "--no-store" not in case.target:
            argv.append("--no-store")
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
        out, message = capsys.readouterr()
        assert code == EXIT_BAD_INPUT, (code, out, message)
        assert "Traceback" not in message
    else:
        if case.kind == "recipe":
            from clip_online.run import parse

            target = lambda: parse(case.target)
        else:
            target = case.target
        with pytest.raises(case.raises) as info:
            target()
        message = str(info.value)
        if case.raises is TypeError:  # type errors stay catchable as the ValueError of a bad configuration
            assert isinstance(info.value, InvalidTypeError) and isinstance(info.value, ValueError)
    for part in case.says:
        assert part in message, f"{part!r} missing from: {message}"

