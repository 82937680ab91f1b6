"""Job parameters are validated at the boundary; every refusal says what is wrong."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.requests import MAX_PROMPT_CHARS, BadRequest, GenerateRequest


def test_a_plain_prompt_is_accepted_with_defaults_left_to_the_release():
    r = GenerateRequest.parse(prompt="Leather Jacket")
    assert r.prompt == "Leather Jacket" and r.steps is None and r.seed is None and r.target_model is None


def test_a_full_request_is_accepted():
    r = GenerateRequest.parse(prompt="x", negative_prompt="", steps=30, guidance=7.5, width=1024, height=768,
                              seed=2**32 - 1, release="nano-banana@base-v1.0.0+lora-v2.3.1")
    assert r.target_model == "nano-banana"


@pytest.mark.parametrize(
    "params,message",
    [
        ({"prompt": ""}, "prompt: prompt is empty"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS}"),
        ({"prompt": b"\xff\xfe"}, "not valid UTF-8"),
        ({"prompt": "a\udc80b"}, "lone surrogates"),
        ({"prompt": "a\x00b"}, "NUL"),
        ({"prompt": 5}, "must be text"),
        ({"prompt": "x", "steps": 0}, "steps must be between 1 and"),
        ({"prompt": "x", "steps": 1.5}, "whole number"),
        ({"prompt": "x", "steps": True}, "whole number"),
        ({"prompt": "x", "width": 65}, "multiple of 8"),
        ({"prompt": "x", "height": 4096}, "multiple of 8 between"),
        ({"prompt": "x", "width": 0}, "multiple of 8"),
        ({"prompt": "x", "guidance": math.nan}, "finite"),
        ({"prompt": "x", "guidance": math.inf}, "finite"),
        ({"prompt": "x", "guidance": -1}, "between 0 and"),
        ({"prompt": "x", "seed": -1}, "seed must be"),
        ({"prompt": "x", "seed": 2**32}, "seed must be"),
        ({"prompt": "x", "release": "../../etc@base-v1"}, "release"),
        ({"prompt": "x", "release": "nano-banana"}, "release"),
        ({"prompt": "x", "model": "Nano/Banana"}, "invalid model"),
        ({"prompt": "x", "model": "other", "release": "nano-banana@base-v1"}, "not a release of model"),
        ({"prompt": "x", "sampler": "euler"}, "sampler"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(params, message):
    with pytest.raises(BadRequest, match="bad generate request") as info:
        GenerateRequest.parse(**params)
    assert message in str(info.value)


@settings(max_examples=200)
@given(
    prompt=st.one_of(st.text(max_size=2100), st.binary(max_size=64)),
    steps=st.one_of(st.none(), st.integers(-5, 200), st.floats(allow_nan=True)),
    width=st.one_of(st.none(), st.integers(-16, 5000)),
    guidance=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    seed=st.one_of(st.none(), st.integers(-(2**40), 2**40)),
)
def test_any_input_is_either_a_valid_request_or_a_bad_request(prompt, steps, width, guidance, seed):
    try:
        r = GenerateRequest.parse(prompt=prompt, steps=steps, width=width, guidance=guidance, seed=seed)
    except BadRequest as exc:
        assert str(exc).startswith("bad generate request: ")
        return
    assert r.prompt.strip() and len(r.prompt) <= MAX_PROMPT_CHARS
    assert r.steps is None or 1 <= r.steps <= 150
    assert r.width is None or (r.width % 8 == 0 and 8 <= r.width <= 2048)
    assert r.guidance is None or math.isfinite(r.guidance)
    assert r.seed is None or 0 <= r.seed < 2**32
