"""Speculative decoding through the API: the per-request `speculative` field, acceptance figures
in `usage` (a compound extension), `/metrics`, and the model configuration key."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from server.app import load_order
from server.config import ModelConfig, parse_config
from tests.server.conftest import MODEL
from tests.server.test_openai_api import assert_error, events

Client = TestClient[Litestar]
# A repetitive prompt: prompt lookup finds n-grams to propose.
PROMPT = "the model is the model is the model is the model is the model"


def completion(client: Client, **body: Any) -> Any:
    body = {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_tokens": 24, **body}
    return client.post("/v1/completions", json={"ignore_eos": True, **body})


def test_ngram_request_reports_acceptance_in_usage_and_matches_plain_output(client: Client):
    plain = completion(client).json()
    assert "speculative" not in plain["usage"]
    spec = completion(client, speculative={"method": "ngram", "num_tokens": 3}).json()
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    figures = spec["usage"]["speculative"]
    assert figures["draft_tokens"] >= figures["accepted_tokens"] >= 0
    assert figures["acceptance_rate"] == pytest.approx(
        figures["accepted_tokens"] / figures["draft_tokens"]
    )


def test_streamed_usage_carries_the_same_figures(client: Client):
    spec = {"method": "ngram", "num_tokens": 4}
    body = {"speculative": spec, "stream": True, "stream_options": {"include_usage": True}}
    chunks = events(completion(client, **body).text)
    whole = completion(client, speculative=spec).json()
    assert chunks[-1]["usage"] == whole["usage"]


def test_draft_without_a_draft_model_is_a_400_naming_the_field(client: Client):
    response = completion(client, speculative={"method": "draft"})
    assert_error(response, 400, param="speculative.method")


@pytest.mark.parametrize(
    "spec", [{"method": "fast"}, {"method": "ngram", "num_tokens": 0}, {"method": "ngram", "x": 1}]
)
def test_malformed_speculative_field_is_a_400(client: Client, spec: dict):
    response = completion(client, speculative=spec)
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text


def test_metrics_expose_acceptance_counters(client: Client):
    completion(client, speculative={"method": "ngram", "num_tokens": 2})
    text = client.get("/metrics").text
    assert f'compound_speculative_draft_tokens_total{{model="{MODEL}"}}' in text
    assert "# TYPE compound_speculative_accepted_tokens_total counter" in text


def test_model_config_key_and_draft_models_load_first():
    config = parse_config(
        msgspec.yaml.encode(
            {
                "models": [
                    {
                        "name": "big",
                        "path": "b",
                        "speculative": {"method": "draft", "draft_model": "small"},
                    },
                    {"name": "small", "path": "s"},
                ]
            }
        ),
        file="compound.yaml",
    )
    big = config.models[0]
    assert big.load_kwargs()["speculative"].draft_model == "small"
    assert [m.name for m in load_order(config.models)] == ["small", "big"]
    assert ModelConfig(name="x", path="p").load_kwargs().get("speculative") is None
