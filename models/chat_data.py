"""The chat "messages" JSONL format that training reads: rows parsed and checked, nothing else.

It stays free of torch and transformers, so `student dataset check` starts in a fraction of a
second; `models.train` renders and trains on what it returns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A chat JSONL file or sample that cannot be used for training; the message says why."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class ChatSample:
    """One conversation; `topic` is optional metadata carried through from the JSONL."""

    messages: tuple[Message, ...]
    topic: str | None = None

    def as_dicts(self) -> list[dict[str, str]]:
        """The `messages` list in the shape chat templates and OpenAI-style APIs expect."""
        return [{"role": message.role, "content": message.content} for message in self.messages]


def parse_chat_sample(row: object, where: str) -> ChatSample:
    """Validate one decoded JSONL row; `where` (e.g. "data.jsonl line 3") goes into errors."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise DatasetError(f'{where}: expected an object with a "messages" list')
    messages = []
    for index, message in enumerate(row["messages"]):
        if not isinstance(message, dict):
            raise DatasetError(f"{where}: message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: message {index} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DatasetError(f'{where}: message {index} has no text "content"')
        messages.append(Message(role, content))
    if not messages:
        raise DatasetError(f'{where}: "messages" is empty')
    topic = row.get("topic")
    return ChatSample(tuple(messages), topic if isinstance(topic, str) else None)


def load_chat_jsonl(path: Path) -> list[ChatSample]:
    """Read a chat JSONL file (one `{"messages": [...], ...}` object per non-blank line).

    Lines end at "\\n" only: `str.splitlines` would also split inside strings holding U+2028,
    U+0085 and the like, which JSON written with `ensure_ascii=False` leaves unescaped.
    """
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path.name} line {number}: not valid JSON ({error.msg})") from None
        samples.append(parse_chat_sample(row, f"{path.name} line {number}"))
    if not samples:
        raise DatasetError(f"dataset file {path} has no samples")
    return samples
