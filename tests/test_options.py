"""Options declared once on dataclass fields: the flags derived from them, and their ranges checked
from the command line and from Python."""

from __future__ import annotations

import argparse
import dataclasses
import time

import pytest

from ess.bench import BenchConfig
from ess.calibration import CalibrationConfig, CalibrationError
from ess.config import TrainConfig
from ess.fields import FieldError, option
from ess.generation import Policy, Sampling
from ess.generation.policy import PolicyError, validate
from ess.options import add_options, options_from
from ess.quickstart import QuickstartConfig


@dataclasses.dataclass
class _Example:
    name: str = option("a required text")
    count: int = option("a count", 3, min=1)
    rate: float | None = option("a rate", None, above=0, below=1)
    loud: bool = option("off by default", False)
    quiet: bool = option("on by default", True)
    tags: list[str] = option("several values", default_factory=lambda: ["a"])
    sizes: tuple[int, ...] = option("several numbers", (1, 2), min=1)
    mode: str = option("one of two", "x", choices=("x", "y"))
    hidden: int = option("not a flag", 0, flag=False)


def _parser(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_options(parser, _Example, **kwargs)
    return parser


def test_flags_follow_the_annotations_and_the_metadata():
    args = _parser().parse_args(
        ["--name", "n", "--count", "5", "--rate", "0.5", "--loud", "--no-quiet", "--tags", "b", "c", "--sizes", "4"]
    )
    example = options_from(args, _Example)
    assert example == _Example("n", 5, 0.5, True, False, ["b", "c"], (4,), "x", 0)
    default = options_from(_parser().parse_args(["--name", "n"]), _Example)
    assert default == _Example("n")
    assert not hasattr(args, "hidden")
    assert options_from(args, _Example, hidden=7).hidden == 7


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "0"], "count must be at least 1, got 0"),
        (["--rate", "1"], "rate must be in (0, 1), got 1.0"),
        (["--sizes", "2", "0"], "sizes must be at least 1, got 0"),
        (["--count", "two"], "expected an integer, got 'two'"),
    ],
)
def test_a_value_out_of_range_is_refused_while_parsing(argv, message):
    with pytest.raises(argparse.ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _parser().parse_args(["--name", "n", *argv])


def test_only_exclude_prefix_and_overrides():
    args = _parser(only=("count", "quiet"), prefix="x_", overrides=True).parse_args([])
    assert vars(args) == {"x_count": None, "x_quiet": None}
    parsed = _parser(exclude=("tags",)).parse_args(["--name", "n"])
    assert "tags" not in vars(parsed) and "count" in vars(parsed)


@pytest.mark.parametrize("cls", [TrainConfig, Sampling, Policy, CalibrationConfig, BenchConfig, QuickstartConfig])
def test_every_field_of_a_command_config_has_help_and_a_flag(cls):
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    flags = vars(parser.parse_args(["--out", "o"] if cls is TrainConfig else []))
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f.name
        assert (f.name in flags) == f.metadata.get("flag", True), f.name


def test_the_same_ranges_hold_from_python():
    with pytest.raises(FieldError, match="lr must be above 0"):
        TrainConfig(out="o", lr=-1)
    with pytest.raises(FieldError, match="top_p must be in"):
        Sampling(top_p=2)
    with pytest.raises(CalibrationError, match="batch_size must be at least 1"):
        CalibrationConfig(batch_size=0)
    with pytest.raises(PolicyError, match="reliance must be one of low, medium, high"):
        validate(Policy(reliance="loud"))
    with pytest.raises(FieldError, match="schedules must include none"):
        BenchConfig(schedules=("every",))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "m", "--prompt", "hi", "--temperature", "-1"], "--temperature: temperature must be"),
        (["generate", "--model", "m", "--prompt", "hi", "--top-p", "2"], "--top-p: top_p must be in [0, 1]"),
        (["train", "--out", "{tmp}/run", "--lr", "-1"], "--lr: lr must be above 0, got -1.0"),
        (["serve", "--model", "m", "--batch-size", "0"], "--batch-size: batch_size must be at least 1"),
        (["bench", "--model", "m", "--repeats", "0"], "--repeats: repeats must be at least 1"),
        (["quickstart", "--benign-limit", "-3"], "--benign-limit: benign_limit must be at least 1"),
    ],
)
def test_a_bad_number_stops_the_command_at_once(tmp_path, run_ess, argv, message):
    started = time.monotonic()
    code, stderr = run_ess([a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1, stderr
    assert time.monotonic() - started < 60  # parsing only: no model is loaded, no answer generated
    assert not (tmp_path / "run").exists()
