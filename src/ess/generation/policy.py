"""Strategic attention, strategic decoding and re-classification schedules (docs/METHOD.md §5-7).

`RowPolicy` is the decision logic of one request, free of tensors: when to re-evaluate [CLS],
which span it reads, and what a verdict makes the decoder do. The fast generator and the exact
reference loop both drive it, so they cannot disagree on a decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..fields import check
from .types import Policy

INSERT, REFUSE = "insert", "refuse"


class PolicyError(ValueError):
    """An unknown schedule or reliance, or a bad rule parameter."""


@dataclass(frozen=True)
class Span:
    """What a re-evaluated [CLS] reads: the query or not, and response tokens [start, end)."""

    query: bool
    start: int
    end: int
    rule: int


def validate(policy: Policy) -> Policy:
    """`policy` itself, once its schedule and every field's rules are checked (raises PolicyError)."""
    schedule_interval(policy.schedule)  # raises on a bad schedule
    check(policy, PolicyError)
    return policy


POLICY_FLAGS = (
    "schedule",
    "reliance",
    "tau",
    "min_window",
    "threshold",
    "response_threshold",
    "hold_back",
    "defer_below",
)
"""The Policy fields `ess eval` takes as ablation overrides of the evaluated model's policy."""


def policy_overrides(values: object) -> dict:
    """The policy flags' values that were given (not None) in parsed flags or a config, by field name."""
    found = {name: getattr(values, name, None) for name in POLICY_FLAGS}
    return {name: value for name, value in found.items() if value is not None}


def threshold_of(policy: Policy, model_threshold: float) -> float:
    """The p(malicious) at which a query (or rule-1) verdict counts: the policy's own, else the model's."""
    return policy.threshold or model_threshold


def response_threshold_of(policy: Policy, model_threshold: float) -> float:
    """The p(malicious) at which a verdict on response text alone counts (rules 2 and 3): the
    policy's own, else the model's calibrated one."""
    return policy.response_threshold or model_threshold


def schedule_interval(schedule: str) -> int | None:
    """The K of `periodic:K`, None for the other schedules; raises on an unknown schedule."""
    if schedule in ("none", "first", "every", "annealing"):
        return None
    match = re.fullmatch(r"periodic:(\d+)", schedule)
    if not match or int(match.group(1)) < 1:
        raise PolicyError(f"unknown schedule {schedule!r}: expected none, first, every, periodic:K or annealing")
    return int(match.group(1))


def reevaluate_at(schedule: str, n: int) -> bool:
    """Whether [CLS] is re-evaluated once the n-th response token (1-based) has been fed.

    annealing: every token for the first 8, every 4th up to 32, every 16th up to 128, then never —
    early tokens decide where an answer goes, and a late start of harmful text is rare enough
    that the cost of looking stops paying (the paper reports Annealing about as safe as Every).
    """
    if schedule in ("none", "first"):
        return False
    if schedule == "every":
        return True
    if schedule == "annealing":
        return n <= 8 or (n <= 32 and n % 4 == 0) or (n <= 128 and n % 16 == 0)
    return n % schedule_interval(schedule) == 0


def reevaluates_after(schedule: str, n: int) -> bool:
    """Whether [CLS] may still be re-evaluated once more than n response tokens have been fed."""
    if schedule in ("none", "first"):
        return False
    return schedule != "annealing" or n < 128


class RowPolicy:
    """The ESS state of one request during decoding."""

    def __init__(self, policy: Policy, threshold: float, response_threshold: float):
        """`threshold` and `response_threshold`: the model's, which the policy's own override."""
        self.policy = policy
        self.threshold = threshold_of(policy, threshold)
        self.response_threshold = response_threshold_of(policy, response_threshold)
        self.query_malicious = False
        self.transition_at: int | None = None
        self.consecutive = 0
        self.run_start: int | None = None  # first token of the window that opened the malicious run
        self.intervened = False
        self.deferred = False  # a borderline malicious query waits for its rule-1 verdict
        self.last_p: float | None = None

    @property
    def plain(self) -> bool:
        return self.policy.schedule == "none"

    @property
    def may_withdraw(self) -> bool:
        """Whether a verdict may withdraw generated tokens (hold-back or deferral): the engine then
        keeps the [CLS] versions a rollback restores."""
        return not self.plain and (self.policy.hold_back > 0 or self.policy.defer_below > 0)

    def first_verdict(self, p: float) -> str | None:
        self.query_malicious = p >= self.threshold
        self.last_p = p
        # Deferring needs a later rule-1 verdict that can still act on what it reads.
        can_defer = self.policy.reliance != "low" and reevaluates_after(self.policy.schedule, self.policy.r1 - 1)
        self.deferred = self.query_malicious and p < self.policy.defer_below and can_defer
        if self.deferred:
            return None
        return self._act(self.query_malicious, self.query_malicious)

    def wants_reevaluation(self, n: int) -> bool:
        if self.intervened:
            return False
        if n < self.policy.min_window and self.span(n).rule in (2, 3):
            return False  # too little response text to judge yet
        return reevaluate_at(self.policy.schedule, n)

    def span(self, n: int) -> Span:
        """The span [CLS] reads after n response tokens."""
        p = self.policy
        if not p.strategic_attention:
            return Span(True, 0, n, 0)
        if self.query_malicious:
            return Span(True, 0, min(n, p.r1), 1)
        if self.transition_at is not None:
            s = self.transition_at
            return Span(False, max(0, s - p.r2), min(n, s + p.r3), 3)
        return Span(False, max(0, n - p.r2), n, 2)

    def observe(self, p: float, n: int) -> str | None:
        """Take a re-evaluated verdict; returns INSERT or REFUSE when decoding must change."""
        self.last_p = p
        if self.deferred:
            return self.settle() if n >= self.policy.r1 else None
        if self.query_malicious:
            return self._act(p >= self.threshold, False)
        malicious = p >= self.response_threshold
        if malicious:
            if self.consecutive == 0:
                self.run_start = self.span(n).start
            self.consecutive += 1
            if self.transition_at is None:
                self.transition_at = n  # rule 3: look around the point where the text turned
        else:
            self.consecutive = 0
            self.transition_at = self.run_start = None  # back to rule 2: one alarming word is tolerated
        return self._act(malicious, self.consecutive >= self.policy.tau)

    def settle(self) -> str | None:
        """End a deferral on the newest verdict: intervene as on a malicious query, or clear the
        query, which is judged from then on as a benign one (rules 2 and 3). Also called when the
        answer ends before its rule-1 window is complete."""
        self.deferred = False
        if self.last_p >= self.threshold:
            return self._act(True, True)
        self.query_malicious = False
        return None

    def held_from(self, n: int) -> int:
        """The first of n response tokens that a later verdict could still withdraw (n: none)."""
        policy = self.policy
        if self.deferred:
            return 0
        if (
            policy.hold_back == 0
            or self.intervened
            or policy.reliance == "low"
            or not reevaluates_after(policy.schedule, n)
        ):
            return n
        start = n - policy.hold_back
        if self.run_start is not None:
            start = min(start, self.run_start)
        return max(0, start)

    def _act(self, malicious: bool, medium_trigger: bool) -> str | None:
        reliance = self.policy.reliance
        if reliance == "high" and malicious:
            self.intervened = True
            return REFUSE
        if reliance == "medium" and medium_trigger:
            self.intervened = True
            return INSERT
        return None
