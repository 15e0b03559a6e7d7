"""The response threshold of an ESS model, set from its answers to benign prompts (`ess calibrate`,
and the end of `ess train`).

After a benign first verdict, [CLS] judges windows of answer text alone (rules 2 and 3), and `tau`
consecutive verdicts at or above the response threshold stop the answer. How often those verdicts
fire on ordinary text depends on the trained model, so the threshold is set per model: calibration
answers benign prompts that training never saw and raises the threshold above `floor` until at most
`max_late_stop_rate` of the answers are stopped (docs/experiments.md has the measurements).

Each round generates the answers at a candidate threshold with the decoding signal off (reliance
`low`): up to the point where strategic decoding would step in, that is exactly the guarded
generation (rule 3's windows included), so the answers it would stop are counted exactly. A round
that stops too many proposes the next candidate from its own verdicts; the next round generates
again only the answers with a verdict at or above the last candidate (the others cannot change).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import CALIBRATION_PROMPTS, MAX_LATE_STOP_RATE, ESSConfig
from .fields import check, option
from .generation import Policy, Request, Sampling, generate
from .generation.policy import threshold_of
from .metrics import calibrated_threshold

MAX_ROUNDS = 6
"""Generations at most (each raises the threshold). If the limit is hit, the last threshold measured
is kept, with its late stops reported."""


class CalibrationError(ValueError):
    """A calibration that cannot run as asked."""


@dataclass
class CalibrationConfig:
    """How the response threshold is calibrated; every field is also an `ess calibrate` flag."""

    prompts: str = option(
        "benign prompts never used in training (bundled: 80 benign-but-alarming and 40 plain requests, "
        "disjoint from the training and held-out seed sets)",
        CALIBRATION_PROMPTS,
    )
    max_late_stop_rate: float = option(
        "share of the calibration answers that may be stopped late", MAX_LATE_STOP_RATE, min=0, below=1
    )
    floor: float = option(
        "the threshold is never set below this (the uncalibrated default)",
        ESSConfig.response_threshold,
        above=0,
        max=1,
    )
    max_new_tokens: int = option("tokens of each calibration answer", 64, min=1)
    batch_size: int = option("answers generated together", 64, min=1)

    def __post_init__(self):
        check(self, CalibrationError)


@dataclass
class CalibrationResult:
    response_threshold: float
    """The calibrated threshold, written to the model's config."""
    answers: int
    """Calibration prompts whose query verdict was benign (the others never reach rules 2 and 3)."""
    stopped_at_floor: int
    """Of those answers, the ones `floor` would stop late."""
    stopped: int
    """Of those answers, the ones the calibrated threshold stops late."""
    allowed: int
    """Late stops the rate allows (more than this only where MAX_ROUNDS ended the search)."""
    query_flagged: int
    """Calibration prompts flagged on the query (the query threshold is not changed)."""


def late_stop_score(response_verdicts: list[float], tau: int) -> float:
    """The highest threshold at which `tau` consecutive verdicts all reach it (0 with fewer than `tau`
    verdicts): an answer read at threshold t is stopped exactly when this is at least t."""
    runs = [min(response_verdicts[i : i + tau]) for i in range(len(response_verdicts) - tau + 1)]
    return max(runs, default=0.0)


@dataclass
class _Reading:
    """One calibration answer as generated at `threshold`."""

    benign_query: bool
    score: float
    """`late_stop_score` of its answer-text verdicts."""
    peak: float
    """Its highest answer-text verdict."""
    threshold: float

    @property
    def holds_above(self) -> bool:
        """Whether the answer is generated alike at every higher threshold: no verdict reached this
        one, so no rule-3 window opened and nothing a higher threshold changes happened."""
        return self.peak < self.threshold


def calibrate_response_threshold(model, config: CalibrationConfig, policy: Policy | None = None) -> CalibrationResult:
    """Set `model.config.response_threshold` from the model's answers to `config.prompts` under
    `policy`'s schedule, tau and windows (default: the default policy)."""
    from .data.loaders import load_examples

    policy = policy or Policy()
    requests = [
        Request(e.query, sampling=Sampling(max_new_tokens=config.max_new_tokens))
        for e in load_examples(config.prompts, label="benign")
    ]
    readings: list[_Reading | None] = [None] * len(requests)
    threshold, stopped_at_floor = config.floor, None
    for round_ in range(MAX_ROUNDS):
        reading = dataclasses.replace(policy, reliance="low", response_threshold=threshold)
        stale = [i for i, r in enumerate(readings) if r is None or not r.holds_above]
        for i, fresh in zip(stale, _read(model, [requests[i] for i in stale], reading, config.batch_size)):
            readings[i] = fresh
        scores = [r.score for r in readings if r.benign_query]
        stopped = sum(s >= threshold for s in scores)
        stopped_at_floor = stopped if stopped_at_floor is None else stopped_at_floor
        proposed = calibrated_threshold(scores, config.max_late_stop_rate, floor=threshold)
        if proposed == threshold or round_ == MAX_ROUNDS - 1:
            break
        threshold = proposed
    model.config.response_threshold = threshold
    return CalibrationResult(
        response_threshold=threshold,
        answers=len(scores),
        stopped_at_floor=stopped_at_floor,
        stopped=stopped,
        allowed=int(config.max_late_stop_rate * len(scores)),
        query_flagged=len(requests) - len(scores),
    )


def _read(model, requests: list[Request], reading: Policy, batch_size: int) -> list[_Reading]:
    """Each request's answer generated under `reading`, read as a `_Reading`."""
    requests = [dataclasses.replace(r, policy=reading) for r in requests]
    readings = []
    for g in generate(model, requests, batch_size=batch_size, progress=True):
        verdicts = [t.p_malicious for t in g.trace if t.rule in (2, 3)]
        readings.append(
            _Reading(
                benign_query=g.p_malicious < threshold_of(reading, model.config.threshold),
                score=late_stop_score(verdicts, reading.tau),
                peak=max(verdicts, default=0.0),
                threshold=reading.response_threshold,
            )
        )
    return readings


def describe(result: CalibrationResult, config: CalibrationConfig) -> str:
    return (
        f"response threshold {result.response_threshold:.3f} from {result.answers} answers to {config.prompts}: "
        f"{result.stopped} stopped late, {result.allowed} allowed ({result.stopped_at_floor} at {config.floor:g}); "
        f"{result.query_flagged} prompts flagged on the query"
    )
