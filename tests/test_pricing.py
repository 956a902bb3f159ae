"""producer.pricing: cost of one call per model and tier (prices in docs/gemini-wire.md)."""

from __future__ import annotations

import pytest

from producer.models import Usage
from producer.pricing import FLEX_DISCOUNT, LONG_PROMPT_TOKENS, PRICES, cost_usd, price_for
from producer.status import Tier


def usage(prompt: int = 0, output: int = 0, thoughts: int = 0) -> Usage:
    return Usage(prompt_tokens=prompt, output_tokens=output, thoughts_tokens=thoughts,
                 total_tokens=prompt + output + thoughts)


HUNDRED_K = usage(prompt=100_000, output=100_000)


@pytest.mark.parametrize(
    ("model", "use", "standard", "flex"),
    [
        # 100k in + 100k out: a tenth of (input + output) per-1M prices
        pytest.param("gemini-2.5-flash", HUNDRED_K, 0.28, 0.14, id="2.5-flash"),
        pytest.param("gemini-2.5-pro", HUNDRED_K, 1.125, 0.5625, id="2.5-pro"),
        pytest.param("gemini-2.5-flash-lite", HUNDRED_K, 0.05, 0.025, id="2.5-flash-lite"),
        pytest.param("gemini-3-flash-preview", HUNDRED_K, 0.35, 0.175, id="3-flash-preview"),
        pytest.param("gemini-3.1-pro-preview", HUNDRED_K, 1.4, 0.7, id="3.1-pro-preview"),
        # the wire doc's success example: 29 prompt, 3 candidates, 57 thinking
        pytest.param("gemini-2.5-flash", usage(29, 3, 57), 0.0001587, 0.00007935, id="wire-example"),
        # thinking tokens bill at the output rate
        pytest.param("gemini-2.5-flash", usage(thoughts=1_000_000), 2.5, 1.25, id="thinking-as-output"),
        pytest.param("gemini-2.5-flash", usage(output=500_000, thoughts=500_000), 2.5, 1.25,
                     id="thinking-plus-output"),
        pytest.param("gemini-2.5-flash", usage(prompt=1_000_000), 0.3, 0.15, id="input-only"),
        pytest.param("gemini-2.5-flash", usage(), 0.0, 0.0, id="no-tokens"),
        # long context (2.5 pro): prompts over 200k tokens use the higher price for input and output
        pytest.param("gemini-2.5-pro", usage(prompt=LONG_PROMPT_TOKENS), 0.25, 0.125, id="pro-200k-is-short"),
        pytest.param("gemini-2.5-pro", usage(prompt=LONG_PROMPT_TOKENS + 1), 0.5000025, 0.25000125,
                     id="pro-200k-plus-one-is-long"),
        pytest.param("gemini-2.5-pro", usage(prompt=300_000, output=100_000), 2.25, 1.125, id="pro-long-output"),
        pytest.param("gemini-2.5-flash", usage(prompt=300_000), 0.09, 0.045, id="flash-has-no-long-price"),
        # image models: per image, counted from output tokens
        pytest.param("gemini-2.5-flash-image", usage(prompt=20, output=1290), 0.039, 0.0195, id="flash-image-one"),
        pytest.param("gemini-2.5-flash-image", usage(output=2580), 0.078, 0.039, id="flash-image-two"),
        pytest.param("gemini-2.5-flash-image", usage(prompt=20), 0.0, 0.0, id="flash-image-none"),
        pytest.param("gemini-3-pro-image-preview", usage(output=1120, thoughts=200), 0.134, 0.067,
                     id="pro-image-1k"),
        pytest.param("gemini-3-pro-image-preview", usage(output=2240), 0.268, 0.134, id="pro-image-two-1k"),
        pytest.param("gemini-3-pro-image-preview", usage(output=2000), 0.24, 0.12, id="pro-image-4k"),
        pytest.param("gemini-3-pro-image-preview", usage(output=3120), 0.374, 0.187, id="pro-image-4k-and-1k"),
        pytest.param("gemini-3-pro-image-preview", usage(output=1200), 0.134, 0.067, id="pro-image-1k-and-text"),
        # name forms
        pytest.param("models/gemini-2.5-flash", HUNDRED_K, 0.28, 0.14, id="models-prefix"),
        pytest.param("gemini-2.5-flash-001", HUNDRED_K, 0.28, 0.14, id="numeric-suffix"),
        pytest.param("models/gemini-2.5-flash-image", usage(output=1290), 0.039, 0.0195, id="models-prefix-image"),
    ],
)
def test_cost_usd(model: str, use: Usage, standard: float, flex: float) -> None:
    assert cost_usd(model, use, Tier.STANDARD) == pytest.approx(standard, abs=1e-10)
    assert cost_usd(model, use, Tier.FLEX) == pytest.approx(flex, abs=1e-10)
    assert cost_usd(model, use, "standard") == cost_usd(model, use, Tier.STANDARD)
    assert cost_usd(model, use, "flex") == cost_usd(model, use, Tier.FLEX)


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("gpt-4o", id="other-vendor"),
        pytest.param("gemini-9-ultra", id="future-gemini"),
        pytest.param("gemini-2.5-flash-preview-09-2025", id="dated-preview"),
        pytest.param("gemini-2.5-flash-x", id="non-numeric-suffix"),
        pytest.param("models/", id="bare-prefix"),
        pytest.param("", id="empty"),
        pytest.param("-001", id="suffix-only"),
    ],
)
def test_unknown_model_costs_none(model: str) -> None:
    assert price_for(model) is None
    assert cost_usd(model, HUNDRED_K, Tier.FLEX) is None
    assert cost_usd(model, HUNDRED_K, Tier.STANDARD) is None


@pytest.mark.parametrize("model", sorted(PRICES))
def test_every_priced_model_flex_is_half_of_standard(model: str) -> None:
    price = PRICES[model]
    assert price.source
    use = usage(prompt=250_000, output=5_000, thoughts=3_000)
    standard = cost_usd(model, use, Tier.STANDARD)
    flex = cost_usd(model, use, Tier.FLEX)
    assert standard is not None
    assert flex is not None
    assert standard > 0
    assert flex == pytest.approx(standard * FLEX_DISCOUNT, abs=1e-10)
    assert price_for(f"models/{model}") is price


def test_cost_is_rounded_without_float_noise() -> None:
    assert cost_usd("gemini-2.5-flash", usage(29, 3, 57), Tier.STANDARD) == 0.0001587
    assert cost_usd("gemini-2.5-flash-lite", usage(prompt=1), Tier.FLEX) == 5e-8


@pytest.mark.parametrize(
    ("model", "closest"),
    [
        pytest.param("gemini-2.5-flsh", "gemini-2.5-flash", id="typo"),
        pytest.param("models/gemini-2.5-prro", "gemini-2.5-pro", id="prefixed-typo"),
        pytest.param("gemini-2.5-flash-lit", "gemini-2.5-flash-lite", id="cut-short"),
        pytest.param("text-bison-001", None, id="nothing-close"),
    ],
)
def test_closest_model(model: str, closest: str | None) -> None:
    from producer.pricing import closest_model

    assert closest_model(model) == closest


def test_unpriced_models_are_named_once_in_order_seen() -> None:
    from producer.pricing import unpriced_models, unpriced_warning

    models = ["gemini-2.5-flsh", "gemini-2.5-flash", None, "x-1", "gemini-2.5-flsh", "models/gemini-2.5-flash-001"]
    assert unpriced_models(models) == ["gemini-2.5-flsh", "x-1"]
    assert unpriced_warning("gemini-2.5-flsh") == (
        "model 'gemini-2.5-flsh' is not in flexq's price table, so its cost will show as unknown; "
        "did you mean 'gemini-2.5-flash'?"
    )
    assert unpriced_warning("x-1").endswith(f"(priced: {', '.join(PRICES)})")  # no close name: the list
