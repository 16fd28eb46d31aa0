from __future__ import annotations

import re

from loadtest.workload import Workload, load_prompt_set


def workload(**kwargs) -> Workload:
    return Workload(prompt_set=load_prompt_set(None), **kwargs)


def test_bundled_prompt_set_has_the_articles_seven_topics() -> None:
    topics = load_prompt_set(None)["topics"]
    assert set(topics) == {
        "order_tracking",
        "return_policy",
        "payment_methods",
        "discount_code",
        "warranty",
        "late_delivery",
        "size_exchange",
    }


def test_request_is_a_streaming_chat_asking_for_usage_with_honest_lengths() -> None:
    body = workload(output_tokens=50, length_sigma=0).request(7)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 50 and body["ignore_eos"] is True
    assert body["messages"][0]["role"] == "system" and body["messages"][-1]["role"] == "user"
    assert "ignore_eos" not in workload(ignore_eos=False).request(7)


def test_requests_are_deterministic_and_varied() -> None:
    a, b = workload(seed=1), workload(seed=1)
    assert a.request(5) == b.request(5)
    questions = {workload().request(i)["messages"][-1]["content"] for i in range(200)}
    assert len(questions) > 150
    text = " ".join(questions)
    assert re.search(r"DH\d{6}", text) and "{" not in text  # order numbers filled, no placeholder left


def test_prompt_grows_to_its_target_and_lengths_average_the_target() -> None:
    short = workload(prompt_tokens=10, length_sigma=0, system_prompt="Hỗ trợ.")
    long = workload(prompt_tokens=1500, length_sigma=0, system_prompt="Hỗ trợ.")
    assert len(short.request(0)["messages"]) == 2
    assert sum(len(m["content"]) for m in long.request(0)["messages"]) >= 1500 * 3 * 0.8
    spread = workload(output_tokens=200, length_sigma=0.3)
    mean = sum(spread.request(i)["max_tokens"] for i in range(2000)) / 2000
    assert 190 <= mean <= 210
