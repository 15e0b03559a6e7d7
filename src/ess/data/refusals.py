"""Explained refusals: "Sorry, I cannot fulfill your request because <a reason that fits>"."""

from __future__ import annotations

import random
import re

from ..judges import is_refusal
from .schema import Example

GUIDING_TEXT = "Sorry, I cannot fulfill your request because"
"""The text strategic decoding inserts; training refusals start with it, so the model learns to
continue it with a reason (docs/METHOD.md §6)."""

_REFUSING_OPENINGS = ("i can't", "i cannot", "i'm sorry", "i am sorry", "sorry,", "i won't", "as an ai", "not able to")


def opens_with_refusal(text: str) -> bool:
    """Whether an answer starts by declining, as the base model's refusals do."""
    return text.lower().startswith(_REFUSING_OPENINGS)


def declines(answer: str) -> bool:
    """Whether an answer refuses: a phrase of the keyword judge anywhere, or a refusing opening."""
    return is_refusal(answer) or opens_with_refusal(answer)


# Reasons for requests whose dataset gives none, picked by the first pattern that matches.
_REASONS: list[tuple[str, str]] = [
    (
        r"bomb|explosive|detonat|grenade|ied\b",
        "it asks how to make or use explosives, which could kill or maim people.",
    ),
    (
        r"gun|firearm|weapon|rifle|ammunition|silencer",
        "it asks for help with weapons in a way that could get people hurt or killed.",
    ),
    (
        r"poison|toxin|nerve agent|anthrax|ricin|pathogen|virus strain|chemical weapon",
        "it asks for help with poisons or biological or chemical agents that could kill people.",
    ),
    (
        r"malware|ransomware|virus|keylogger|trojan|botnet|exploit|ddos",
        "it asks me to build or deploy malicious software that damages other people's systems.",
    ),
    (
        r"hack|crack|password|phish|break into|unauthori[sz]ed access",
        "it asks for help getting into accounts or systems without permission.",
    ),
    (
        r"suicide|self-harm|self harm|kill myself|cut myself|overdose",
        "it could lead to you getting hurt; if you are struggling, please reach out to someone you trust or a local crisis line.",
    ),
    (
        r"drug|meth|cocaine|heroin|fentanyl|narcotic",
        "it asks for help making or trafficking illegal drugs, which harms people and is against the law.",
    ),
    (
        r"steal|theft|shoplift|rob|burglar|counterfeit|launder",
        "it asks for help stealing or committing financial crime.",
    ),
    (r"fraud|scam|fake|forge|identity", "it asks for help deceiving people to take their money or identity."),
    (
        r"stalk|track someone|spy on|dox|personal information|location of",
        "it asks me to help violate someone's privacy, which could put them in danger.",
    ),
    (
        r"hate|racist|slur|inferior|harass|bully|threaten",
        "it asks me to attack or demean people, which causes real harm.",
    ),
    (
        r"misinformation|fake news|propaganda|conspiracy|disinformation",
        "it asks me to spread false information that could mislead and harm people.",
    ),
    (r"terror|extremis|radicali", "it asks for help with violent extremism."),
    (r"child|minor|underage", "it could put children at risk of harm."),
    (
        r"kill|murder|hurt|attack|assault|torture|violence|harm",
        "it asks for help hurting people, and I won't assist with violence.",
    ),
]
_DEFAULT_REASON = "it asks for help with something that could seriously harm people or break the law."
_CLOSINGS = [
    "",
    " If you have a different question, I'm happy to help.",
    " I'm glad to help with something else instead.",
    " Let me know if there is something safe I can help you with.",
]


def reason_for(example: Example) -> str:
    """The example's own refusal reason if its dataset has one, else one chosen by topic."""
    given = example.meta.get("reason")
    if given:
        return given.strip()
    text = example.prompt.lower()
    return next((reason for pattern, reason in _REASONS if re.search(pattern, text)), _DEFAULT_REASON)


def explained_refusal(example: Example, rng: random.Random) -> str:
    return f"{GUIDING_TEXT} {reason_for(example)}{rng.choice(_CLOSINGS)}"
