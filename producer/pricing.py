"""Dated price table and the cost of one call. Unknown models cost ``None``: never a guess.

Prices are USD per 1M tokens (input, output); thinking tokens bill at the output rate. Flex is
half of standard. Sources and dates: docs/gemini-wire.md (gathered 2026-11-21).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
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
    #: image models: (output tokens of one image, USD per image, standard tier), one per image size
    images: tuple[tuple[int, float], ...] = ()


#: Prompts above this many tokens use the long-context price where the model has one.
LONG_PROMPT_TOKENS = 200_000
#: Flex (and batch) cost this fraction of standard.
FLEX_DISCOUNT = 0.5
#: Priority costs this multiple of standard wherever Google publishes it (75-100% above standard; 1.8x on
#: the pricing pages read 2026-11-30).
PRIORITY_FACTOR = 1.8
#: Each tier's price as a fraction of standard ("provisioned" and unknown served tiers: standard).
TIER_FACTORS: dict[str, float] = {"flex": FLEX_DISCOUNT, "batch": FLEX_DISCOUNT, "standard": 1.0,
                                  "priority": PRIORITY_FACTOR}

PRICES: dict[str, Price] = {
    "gemini-2.5-flash": Price(0.30, 2.50, "ai.google.dev pricing page, 2026-08-04"),
    "gemini-2.5-pro": Price(1.25, 10.00, "ai.google.dev pricing page, 2026-08-04", 2.50, 15.00),
    "gemini-2.5-flash-lite": Price(0.10, 0.40, "pricing page 2026-03-18; flex per Vertex page 2026-06-17"),
    "gemini-3-flash-preview": Price(0.50, 3.00, "pricing page 2026-03-18; flex by the 50% rule"),
    "gemini-3.1-pro-preview": Price(2.00, 12.00, "pricing page 2026-03-18; flex by the 50% rule"),
    "gemini-2.5-flash-image": Price(
        0.0, 0.0, "third-party copies 2026-08/09; flex by the 50% rule", images=((1290, 0.039),)
    ),
    "gemini-3-pro-image-preview": Price(  # 1K and 2K images are 1,120 tokens; 4K images 2,000
        0.0, 0.0, "third-party copies 2026-08/09; flex by the 50% rule", images=((1120, 0.134), (2000, 0.24))
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


def closest_model(model: str) -> str | None:
    """The priced model whose name is closest to ``model`` (a likely typo's fix), or None if none is close."""
    name = model.removeprefix("models/")
    close = difflib.get_close_matches(name, list(PRICES), n=1, cutoff=0.75)
    return close[0] if close else None


def unpriced_models(models: Iterable[str | None]) -> list[str]:
    """The names among ``models`` with no known price, each once, in the order first seen."""
    seen: dict[str, None] = {}
    for model in models:
        if model and price_for(model) is None:
            seen.setdefault(model, None)
    return list(seen)


def unpriced_warning(model: str) -> str:
    """A warning for a model missing from the price table: accepted (new models appear all the time), but
    a typo would only show later, as a cost flexq cannot compute."""
    hint = closest_model(model)
    suggestion = f"; did you mean {hint!r}?" if hint else f" (priced: {', '.join(PRICES)})"
    return f"model {model!r} is not in flexq's price table, so its cost will show as unknown{suggestion}"


def cost_usd(model: str, usage: Usage, tier: Tier | str) -> float | None:
    """What one successful call cost on ``tier``; ``None`` if the model's price is unknown."""
    price = price_for(model)
    if price is None:
        return None
    factor = TIER_FACTORS.get(str(tier), 1.0)
    if price.images:
        image_tokens = usage.output_details.get("IMAGE", usage.output_tokens)  # text beside images: not priced
        return round(image_cost_usd(image_tokens, price.images) * factor, 10)
    long = usage.prompt_tokens > LONG_PROMPT_TOKENS and price.long_input_per_m is not None
    input_per_m = price.long_input_per_m if long and price.long_input_per_m else price.input_per_m
    output_per_m = price.long_output_per_m if long and price.long_output_per_m else price.output_per_m
    billed_output = usage.output_tokens + usage.thoughts_tokens
    total = (usage.prompt_tokens * input_per_m + billed_output * output_per_m) / 1_000_000
    return round(total * factor, 10)


def image_cost_usd(output_tokens: int, sizes: tuple[tuple[int, float], ...]) -> float:
    """Standard-tier cost of the images in ``output_tokens``: the mix of sizes whose tokens add up
    exactly (fewest images first); failing that, the nearest count of the first size (at least one)."""
    if output_tokens <= 0:
        return 0.0
    (small_tokens, small_usd), *larger = sizes
    for big_tokens, big_usd in larger:
        for big in range(output_tokens // big_tokens, -1, -1):
            rest = output_tokens - big * big_tokens
            if rest % small_tokens == 0:
                return big * big_usd + rest // small_tokens * small_usd
    return max(1, round(output_tokens / small_tokens)) * small_usd
