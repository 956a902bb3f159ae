"""Dated price table and the cost of one call. Unknown models cost ``None``: never a guess.

Prices are USD per 1M tokens (input, output); thinking tokens bill at the output rate. Flex is
half of standard. Sources and dates: docs/gemini-wire.md (gathered 2026-11-21).
"""

from __future__ import annotations

from dataclasses import dataclass

from producer.models import Usage
from producer.status import Tier


@dataclass(frozen=True)
class Price:
    input_per_m: float  # USD per 1M input tokens, standard tier
    output_per_m: float  # USD per 1M output (and thinking) tokens, standard tier
    source: str
    long_input_per_m: float | None = None  # prompts over LONG_PROMPT_TOKENS, where priced apart
    long_output_per_m: float | None = None
    per_image: float | None = None  # image models: USD per output image, standard tier


#: Prompts above this many tokens use the long-context price where the model has one.
LONG_PROMPT_TOKENS = 200_000
#: Flex (and batch) cost this fraction of standard.
FLEX_DISCOUNT = 0.5
#: Output tokens per image, by image model (for counting images from usage).
IMAGE_TOKENS = {"gemini-2.5-flash-image": 1290, "gemini-3-pro-image-preview": 1120}

PRICES: dict[str, Price] = {
    "gemini-2.5-flash": Price(0.30, 2.50, "ai.google.dev pricing page, 2026-08-04"),
    "gemini-2.5-pro": Price(1.25, 10.00, "ai.google.dev pricing page, 2026-08-04", 2.50, 15.00),
    "gemini-2.5-flash-lite": Price(0.10, 0.40, "pricing page 2026-03-18; flex per Vertex page 2026-06-17"),
    "gemini-3-flash-preview": Price(0.50, 3.00, "pricing page 2026-03-18; flex by the 50% rule"),
    "gemini-3.1-pro-preview": Price(2.00, 12.00, "pricing page 2026-03-18; flex by the 50% rule"),
    "gemini-2.5-flash-image": Price(0.0, 0.0, "third-party copies 2026-08/09; flex by the 50% rule", per_image=0.039),
    "gemini-3-pro-image-preview": Price(
        0.0, 0.0, "third-party copies 2026-08/09 (1K/2K image); flex by the 50% rule", per_image=0.134
    ),
}


def price_for(model: str) -> Price | None:
    """The price of ``model`` (``models/`` prefix and ``-001``-style suffixes tolerated)."""
    name = model.removeprefix("models/")
    if name in PRICES:
        return PRICES[name]
    base, _, suffix = name.rpartition("-")
    if base in PRICES and suffix.isdigit():
        return PRICES[base]
    return None


def cost_usd(model: str, usage: Usage, tier: Tier | str) -> float | None:
    """What one successful call cost on ``tier``; ``None`` if the model's price is unknown."""
    price = price_for(model)
    if price is None:
        return None
    factor = FLEX_DISCOUNT if str(tier) == Tier.FLEX else 1.0
    if price.per_image is not None:
        per_image_tokens = IMAGE_TOKENS.get(model.removeprefix("models/"), 1290)
        images = max(1, round(usage.output_tokens / per_image_tokens)) if usage.output_tokens else 0
        return round(images * price.per_image * factor, 10)
    long = usage.prompt_tokens > LONG_PROMPT_TOKENS and price.long_input_per_m is not None
    input_per_m = price.long_input_per_m if long and price.long_input_per_m else price.input_per_m
    output_per_m = price.long_output_per_m if long and price.long_output_per_m else price.output_per_m
    billed_output = usage.output_tokens + usage.thoughts_tokens
    total = (usage.prompt_tokens * input_per_m + billed_output * output_per_m) / 1_000_000
    return round(total * factor, 10)
