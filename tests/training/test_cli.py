"""training/cli.py: a missing training package named with its extra, and `--help` of both scripts with a text and the
default of every flag."""

import argparse
import importlib.util
import os

import pytest

from ..helpers import C2I_SCRIPT, T2I_SCRIPT


def test_a_missing_training_package_names_the_extra(monkeypatch):
    import importlib.util

    from diffusers_pixnerd.training.cli import require_training_extra

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "peft" else find_spec(name))
    with pytest.raises(ImportError, match=r'Training needs peft: `pip install "diffusers-pixnerd\[training\]"`'):
        require_training_extra("datasets", "peft")
    require_training_extra("datasets")  # present: no error


class ParserCaptured(Exception):
    pass


def script_parser(script, monkeypatch) -> argparse.ArgumentParser:
    """The parser that a script's `parse_args` builds (caught where it would parse)."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise ParserCaptured

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(ParserCaptured):
        module.parse_args([])
    return captured["parser"]


@pytest.mark.parametrize("script", [C2I_SCRIPT, T2I_SCRIPT])
def test_every_flag_has_a_help_text_and_help_shows_the_defaults(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    flags = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert len(flags) > 60
    without_help = [action.option_strings[0] for action in flags if not (action.help or "").strip()]
    assert without_help == [], without_help
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "Save a checkpoint every N steps (and at the last one). (default: 5000)" in text
    assert "--dataset_split DATASET_SPLIT The split of `--dataset_name` to train on. (default: train)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # said in words, or nothing to say
    assert "--no_use_repa Turn `--use_repa` off. --repa_encoder" in text  # the off half of a switch: no default
    assert "--logit_mean LOGIT_MEAN Mean of `logit_normal` timestep sampling. (default: 0.0)" in text
    assert "off for LoRA). (default: " not in text  # `--use_repa`, `--use_ema`: the help says it in words
    if script == T2I_SCRIPT:
        assert "--lora_rank LORA_RANK Rank of the LoRA matrices. (default: 32)" in text
