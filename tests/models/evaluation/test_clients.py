"""Answering and judging through the real HTTP client against a scripted stand-in server
(`tests.models.distill.test_teacher.scripted_teacher`): retries, refusals, the judge's fallback."""

from __future__ import annotations

import asyncio

import pytest

from models.distill.teacher import TeacherClient
from models.evaluation.answering import Target, answer_items, resolve_model
from models.evaluation.errors import EvalError
from models.evaluation.eval_set import DEFAULT_EVAL_SET, load_eval_set
from models.evaluation.judging import VERDICT_SCHEMA, Judge
from tests.models.distill.test_teacher import Sleeps, completion, ok, scripted_teacher, status

ITEMS = load_eval_set(DEFAULT_EVAL_SET)[:3]


def test_answers_keep_item_order_and_a_retried_one_is_marked() -> None:
    async def scenario() -> tuple[list, list]:
        async with scripted_teacher([status(503), ok(completion("Dạ, 30 ngày ạ."))], models=["student"]) as server:
            target = await resolve_model(Target("t", server.url))
            async with TeacherClient(target.client_config(), sleep=Sleeps()) as client:
                return await answer_items(client, ITEMS, max_tokens=16, concurrency=1), server.requests

    answers, requests = asyncio.run(scenario())
    assert [answer.item_id for answer in answers] == [item.id for item in ITEMS]
    assert answers[0].attempts == 2 and not answers[0].first_attempt and answers[0].text == "Dạ, 30 ngày ạ."
    assert all(answer.first_attempt and answer.prompt_tokens == 11 for answer in answers[1:])
    body = requests[0]["body"]
    assert body["model"] == "student" and body["temperature"] == 0.0 and body["max_tokens"] == 16
    assert body["messages"] == list(ITEMS[0].messages)


def test_a_refused_key_stops_the_run_and_an_unknown_model_is_named() -> None:
    async def refused() -> None:
        async with scripted_teacher([status(401, message="bad key")], models=["student"]) as server:
            target = await resolve_model(Target("t", server.url))
            async with TeacherClient(target.client_config(), sleep=Sleeps()) as client:
                await answer_items(client, ITEMS, max_tokens=16, concurrency=2)

    with pytest.raises(EvalError, match="HTTP 401: bad key"):
        asyncio.run(refused())

    async def unknown() -> None:
        async with scripted_teacher([], models=["student"]) as server:
            await resolve_model(Target("t", server.url, model="gpt-x"))

    with pytest.raises(EvalError, match="does not serve 'gpt-x' \\(it serves student\\)"):
        asyncio.run(unknown())


def test_the_judge_asks_both_orders_and_falls_back_to_plain_replies() -> None:
    script = [
        status(400, message="response_format is not supported"),
        ok(completion("A")),  # target first: prefers the target
        ok(completion("The second one")),  # reference first: unreadable
    ]

    async def scenario() -> tuple:
        async with scripted_teacher(script, models=["judge"]) as server:
            target = Target("judge", server.url, "judge")
            config = target.client_config(extra_body={"response_format": VERDICT_SCHEMA})
            async with TeacherClient(config) as structured, TeacherClient(target.client_config()) as plain:
                judgement = await Judge(structured, plain).judge("Đổi trả?", "trả lời", "tham chiếu")
            return judgement, server.requests

    judgement, requests = asyncio.run(scenario())
    assert [request["body"].get("response_format") for request in requests] == [VERDICT_SCHEMA, None, None]
    user = [request["body"]["messages"][1]["content"] for request in requests]
    assert user[1].index("trả lời") < user[1].index("tham chiếu")  # target first
    assert user[2].index("tham chiếu") < user[2].index("trả lời")  # then the reference first
    first, second = judgement.orders
    assert (first.verdict, first.prefers) == ("A", "target")
    assert (second.verdict, second.prefers, second.reply) == (None, None, "The second one")
    assert judgement.outcome == "invalid"
