"""What goes into the generator and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.refusals import GUIDING_TEXT
from ..fields import check, option

Messages = list[dict[str, str]]

RELIANCES = ("low", "medium", "high")


@dataclass
class Sampling:
    """How the next token is chosen (Huang et al.'s decoding attack sweeps these)."""

    max_new_tokens: int = option(
        "tokens the model may choose; forced tokens (prefill, guiding text) come on top", 128, min=0
    )
    temperature: float = option("0 = greedy; otherwise logits are divided by it before sampling", 0.0, min=0)
    top_p: float = option(
        "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (at least one)",
        1.0,
        min=0,
        max=1,
    )
    top_k: int = option("keep only the k most likely tokens (0 = all)", 0, min=0)
    seed: int | None = option("seed of this request's sampler (none: seeded from the request's index)", None, min=0)
    ignore_eos: bool = option(
        "generate exactly max_new_tokens (benchmarks compare equal amounts of work)", False, flag=False
    )

    def __post_init__(self):
        check(self)


@dataclass
class Policy:
    """How ESS uses its signal during generation (docs/METHOD.md §5-7); `policy.validate` checks it."""

    schedule: str = option(
        "when [CLS] is re-evaluated: none (plain model, no ESS at all), first (query only), every (each step), "
        "periodic:K (every K response tokens) or annealing (every token for the first 8, every 4th up to 32, "
        "every 16th up to 128, then never)",
        "annealing",
    )
    reliance: str = option(
        "strategic decoding: low (signal used by attention only), medium (insert the guiding text on a malicious "
        "query, or after tau consecutive malicious re-evaluations), high (stop with a fixed refusal at the first "
        "malicious verdict)",
        "medium",
        choices=RELIANCES,
    )
    tau: int = option("consecutive malicious re-evaluations that trigger an intervention for a benign query", 3, min=1)
    r1: int = option("rule 1: a malicious query's [CLS] reads the query and the first r1 response tokens", 10, min=1)
    r2: int = option("rule 2: a benign query's [CLS] reads the latest r2 response tokens", 10, min=1)
    r3: int = option(
        "rule 3: after a benign->malicious transition at S, [CLS] reads response tokens [S-r2, S+r3]", 10, min=1
    )
    defer_below: float = option(
        "rule 1 deferral: a malicious query verdict below this p(malicious) does not intervene at once; the "
        "answer's first r1 tokens are generated and held back (never shown), and the rule-1 verdict on the query "
        "and those tokens decides: intervene, or go on as a benign query (0: intervene at once on every malicious "
        "query verdict, the paper's behaviour; 1: every malicious query verdict defers)",
        0.0,
        min=0,
        max=1,
    )
    min_window: int = option(
        "rules 2 and 3: a benign query's [CLS] is re-evaluated only once the response holds this many tokens "
        "(1: from the first; [CLS] learns response text on windows of 8 to 24 tokens)",
        8,
        min=1,
    )
    threshold: float | None = option(
        "p(malicious) at which a query verdict (and a rule-1 verdict) counts as malicious (default: the model's "
        "threshold: 0.3 for models trained by ess train, 0.5 in the paper)",
        None,
        above=0,
        max=1,
    )
    response_threshold: float | None = option(
        "after a benign first verdict (rules 2 and 3): p(malicious) at which a re-evaluation counts as malicious "
        "(default: the model's calibrated response_threshold)",
        None,
        above=0,
        max=1,
    )
    guiding_text: str = option(
        "inserted at the intervention point (medium reliance); the model continues and explains", GUIDING_TEXT
    )
    refusal_text: str = option("the fixed answer of high reliance", "Sorry, I cannot fulfill your request.")
    strategic_attention: bool = option(
        "re-evaluations read only the span their rule chooses (off: the query and the whole response so far, "
        "an ablation of rules 1-3)",
        True,
    )
    hold_back: int = option(
        "generated tokens kept from the caller while a verdict could still withdraw them: the newest hold_back, "
        "and, while a run of malicious verdicts has not yet reached an intervention, every token from the start "
        "of the window that opened the run; on an intervention the held tokens are withdrawn and the refusal "
        "follows what was released (0: nothing is held, the paper's behaviour; docs/hold_back.md)",
        10,
        min=0,
    )


@dataclass
class Request:
    messages: Messages
    """The chat so far; the model answers the last user message."""
    prefill: str = ""
    """Forced start of the assistant's answer (the prefill attack); re-evaluated like any response text."""
    sampling: Sampling = field(default_factory=Sampling)
    policy: Policy = field(default_factory=Policy)
    query: str | None = None
    """The query as the model reads it, chat template already applied (e.g. an lm-evaluation-harness
    context); None: rendered from `messages`."""


@dataclass
class TraceEntry:
    step: int
    """Response tokens emitted when [CLS] was re-evaluated (0 = the first verdict on the query)."""
    p_malicious: float
    span: tuple[int, int]
    """Response-token range [start, end) that [CLS] read (the query too under rule 1)."""
    rule: int
    """Strategic-attention rule that chose the span (1, 2 or 3; 0 for the first verdict)."""


@dataclass
class Generation:
    prompt: str
    """The last user message of the request."""
    text: str
    """The answer, prefill included, as a user would see it."""
    token_ids: list[int]
    """The answer's token ids (prefill, generated and inserted tokens)."""
    p_malicious: float | None
    """First verdict of [CLS] on the query (None in plain mode)."""
    intervened: bool = False
    """Whether strategic decoding inserted the guiding text or the fixed refusal."""
    intervention_step: int | None = None
    """Response-token index where the inserted text starts."""
    tokens_before_intervention: int | None = None
    """Response tokens released (shown) before the intervention, prefill included (a leak)."""
    prefill: str = ""
    trace: list[TraceEntry] = field(default_factory=list)
    """Every verdict taken, including those on tokens later withdrawn (steps count them)."""
    finish_reason: str = "length"
    """`eos`, `length`, `refusal` (high reliance) or `cancelled` (the caller stopped the row)."""
    withdrawn_token_ids: list[int] = field(default_factory=list)
    """Tokens generated, held back and withdrawn by the intervention: never shown."""
    withdrawn_text: str = ""
    """The withdrawn tokens as text (for research)."""

    def to_json(self) -> dict:
        """The one serialization of a generation (CLI and server; evaluation records copy its fields)."""
        from dataclasses import asdict

        return asdict(self)


@dataclass
class StreamEvent:
    """Text of one request that has cleared every verdict, from `generate_stream`."""

    index: int
    """The request's index in the list given to `generate_stream`."""
    text: str
    """Newly released text (empty on a final event with nothing left to release)."""
    generation: Generation | None = None
    """Set on the request's last event: the finished generation."""
