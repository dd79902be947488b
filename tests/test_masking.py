"""Masking secret values by value (orchestrator/masking.py) and finding them in a request."""

from __future__ import annotations

import json

from orchestrator.contract import secret_values
from orchestrator.deepbrain.errors import sanitize_message
from orchestrator.masking import mask


def test_long_values_are_masked_anywhere_in_every_form() -> None:
    secret = 'sk-"quoted"\\path-élan'
    text = f"a{secret}b {json.dumps(secret)} {json.dumps(secret, ensure_ascii=False)}"
    masked = mask(text, {secret})
    assert "quoted" not in masked and masked.count("***") == 3, masked


def test_words_of_a_value_are_masked_and_short_values_only_as_words() -> None:
    masked = mask("key sk-12345678 pin pin4 spin4 pin4x jwt", {"Bearer sk-12345678", "pin4", "jwt"})
    assert masked == "key *** pin *** spin4 pin4x jwt", masked


def test_a_value_split_by_whitespace_in_the_vendor_text_is_still_masked() -> None:
    secret = "two  spaces-secret-value"
    assert secret not in sanitize_message(f"echo: {secret}", request_secrets={secret})
    assert "spaces-secret-value" not in sanitize_message(
        f"echo: {' '.join(secret.split())}", request_secrets={secret}
    )


def test_secret_values_are_every_leaf_under_a_secret_key_at_any_depth() -> None:
    payload = {
        "avatar_id": "not-secret",
        "a": [{"custom_http": {"headers": {"X": "h-value", "n": 12}, "endpoint": "e"}}],
        "extra_headers": ["x-value"],
        "deep": {"auth_plugins": [{"kind": "static", "key": {"v": "p-value"}}]},
    }
    assert secret_values(payload) == {"h-value", "12", "x-value", "static", "p-value"}
