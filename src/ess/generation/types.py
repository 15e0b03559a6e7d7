"""What goes into the generator and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.refusals import GUIDING_TEXT

Messages = list[dict[str, str]]

RELIANCES = ("low", "medium", "high")


@dataclass
class Sampling:
    """How the next token is chosen (Huang et al.'s decoding attack sweeps these)."""

    max_new_tokens: int = 128
    """Tokens the model may choose; forced tokens (prefill, guiding text) come on top."""
    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    seed: int | None = None
    """Seed of this request's sampler (None: seeded from the request's index)."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens (benchmarks compare equal amounts of work)."""


@dataclass
class Policy:
    """How ESS uses its signal during generation (METHOD.md §5-7)."""

    schedule: str = "annealing"
    """When [CLS] is re-evaluated: `none` (plain model, no ESS at all), `first` (query only),
    `every` (each step), `periodic:K` (every K response tokens) or `annealing` (every token for the
    first 8, every 4th up to 32, every 16th up to 128, then never)."""
    reliance: str = "medium"
    """Strategic decoding: `low` (signal used by attention only), `medium` (insert the guiding text
    on a malicious query, or after `tau` consecutive malicious re-evaluations), `high` (stop with a
    fixed refusal at the first malicious verdict)."""
    tau: int = 3
    """Consecutive malicious re-evaluations that trigger an intervention for a benign query."""
    r1: int = 10
    """Rule 1: a malicious query's [CLS] reads the query and the first r1 response tokens."""
    r2: int = 10
    """Rule 2: a benign query's [CLS] reads the latest r2 response tokens."""
    r3: int = 10
    """Rule 3: after a benign->malicious transition at S, [CLS] reads response tokens [S-r2, S+r3]."""
    min_window: int = 8
    """Rules 2 and 3: a benign query's [CLS] is re-evaluated only once the response holds this many
    tokens (1: from the first). [CLS] learns response text on windows of 8 to 24 tokens; verdicts on
    fewer mostly echoed the query's alarming words ("A romance scam on dating") and made most of the
    late interventions on benign-but-alarming prompts (README, *Data*)."""
    response_threshold: float | None = None
    """After a benign first verdict (rules 2 and 3): p(malicious) at which a re-evaluation counts as
    malicious (None: the model's calibrated `response_threshold`)."""
    guiding_text: str = GUIDING_TEXT
    """Inserted at the intervention point (medium reliance); the model continues and explains."""
    refusal_text: str = "Sorry, I cannot fulfill your request."
    """The fixed answer of high reliance."""
    strategic_attention: bool = True
    """False: re-evaluations read the query and the whole response so far (ablation of rules 1-3)."""
    hold_back: int = 10
    """Generated tokens kept from the caller while a verdict could still withdraw them: the newest
    `hold_back`, and, while a run of malicious verdicts has not yet reached an intervention, every
    token from the start of the window that opened the run. On an intervention the held tokens are
    withdrawn and the refusal follows what was released (0: nothing is held; the refusal follows
    everything generated). docs/hold_back.md explains the default."""


@dataclass
class Request:
    messages: Messages
    """The chat so far; the model answers the last user message."""
    prefill: str = ""
    """Forced start of the assistant's answer (the prefill attack); re-evaluated like any response text."""
    sampling: Sampling = field(default_factory=Sampling)
    policy: Policy = field(default_factory=Policy)


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
        """The one serialization of a generation (CLI, server, evaluation records)."""
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
