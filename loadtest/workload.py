"""What the virtual customers ask: Vietnamese support chats and how long prompts and answers are.

Every request is a pure function of (workload, arrival index): the same seed gives the same
conversation, whichever process or worker sends it. Lengths are *targets*: prompts are built
from whole conversation turns until an estimate (characters ÷ `chars_per_token`) reaches the
target, answers are held to `max_tokens` (with `ignore_eos` so a model that stops early still
produces them). The real counts always come from the server's `usage`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_PROMPT_TOKENS = 300  # system prompt + history + question
DEFAULT_OUTPUT_TOKENS = 200  # 300 + 200 = the article's ~500 tokens per request
DEFAULT_LENGTH_SIGMA = 0.3  # lognormal spread of both lengths; 0 = fixed lengths
DEFAULT_CHARS_PER_TOKEN = 3.0  # Vietnamese on a multilingual BPE tokenizer, roughly
TOKENS_PER_MESSAGE = 4  # chat-template overhead per message, roughly
MAX_LENGTH_FACTOR = 4.0  # a sampled length is clipped to mean × this


def bundled_prompt_set() -> dict[str, Any]:
    """The prompt set shipped in `loadtest/data/support_prompts.json`."""
    return json.loads(resources.files("loadtest").joinpath("data/support_prompts.json").read_text("utf-8"))


def load_prompt_set(path: str | Path | None) -> dict[str, Any]:
    """A prompt set file (same schema as the bundled one), or the bundled one when `path` is None."""
    data = bundled_prompt_set() if path is None else json.loads(Path(path).read_text("utf-8"))
    topics = data.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise ValueError(f"prompt set {path or 'bundled'}: no topics")
    for name, topic in topics.items():
        if not topic.get("questions"):
            raise ValueError(f"prompt set {path or 'bundled'}: topic {name!r} has no questions")
    return data


@dataclass(frozen=True)
class Workload:
    """How requests are built; `to_dict()`/`from_dict()` carry it to workers on other hosts."""

    prompt_set: dict[str, Any]
    model: str = "student"
    system_prompt: str | None = None  # None: the prompt set's
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    length_sigma: float = DEFAULT_LENGTH_SIGMA
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    ignore_eos: bool = True
    temperature: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError("prompt and output token targets must be at least 1")
        if self.length_sigma < 0 or self.chars_per_token <= 0:
            raise ValueError("length sigma must be >= 0 and chars per token > 0")

    @property
    def system(self) -> str:
        return self.system_prompt if self.system_prompt is not None else self.prompt_set.get("system_prompt", "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        return cls(**data)

    def request(self, index: int) -> dict[str, Any]:
        """The `/v1/chat/completions` body for arrival `index` (streaming, usage included)."""
        rng = random.Random(f"{self.seed}:{index}")
        prompt_target = _sample_length(rng, self.prompt_tokens, self.length_sigma)
        output_target = _sample_length(rng, self.output_tokens, self.length_sigma)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._conversation(rng, prompt_target),
            "max_tokens": output_target,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM's extra sampling parameter: generate exactly max_tokens
        return body

    def _conversation(self, rng: random.Random, prompt_target: int) -> list[dict[str, str]]:
        topics = self.prompt_set["topics"]
        names = sorted(topics)
        topic = topics[rng.choice(names)]
        question = self._fill(rng, rng.choice(topic["questions"]))
        messages = [{"role": "system", "content": self.system}] if self.system else []
        budget = prompt_target - self._estimate(messages) - self._estimate([{"content": question}])
        history: list[dict[str, str]] = []
        while budget > 0:  # earlier turns of the same chat, until the prompt reaches its target
            earlier = topics[rng.choice(names)]
            turn = [
                {"role": "user", "content": self._fill(rng, rng.choice(earlier["questions"]))},
                {"role": "assistant", "content": rng.choice(earlier.get("answers") or ["Dạ vâng."])},
            ]
            history.extend(turn)
            budget -= self._estimate(turn)
        return [*messages, *history, {"role": "user", "content": question}]

    def _estimate(self, messages: list[dict[str, str]]) -> int:
        return sum(math.ceil(len(m["content"]) / self.chars_per_token) + TOKENS_PER_MESSAGE for m in messages)

    def _fill(self, rng: random.Random, template: str) -> str:
        fill = self.prompt_set.get("fill", {})
        values = {key: _expand(rng, rng.choice(options)) for key, options in fill.items() if options}
        return template.format_map(_Missing(values))


def _sample_length(rng: random.Random, mean: int, sigma: float) -> int:
    """A lognormal length with the given mean (clipped to [1, mean × 4]); `sigma` 0 gives `mean`."""
    if sigma == 0:
        return mean
    value = rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)
    return max(1, min(round(value), round(mean * MAX_LENGTH_FACTOR)))


def _expand(rng: random.Random, option: str) -> str:
    """Fill the generator tokens of a `fill` option: {digits6} and {thousands} (a VND amount)."""
    return option.replace("{digits6}", f"{rng.randrange(100000, 1000000)}").replace(
        "{thousands}", f"{rng.choice([89, 150, 249, 320, 499, 650, 890, 1250, 2490, 5990]):,}".replace(",", ".")
    )


class _Missing(dict):
    """format_map helper: unknown {placeholders} stay as written."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"
