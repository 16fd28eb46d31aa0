"""The plan of a `student distill` run, made from its inputs before any request is sent.

Topics (one per line) or shop documents (`.txt`/`.md`, cut into chunks) become a `Plan`: the
ordered list of samples to make, with deterministic ids (`response/theo-doi-don-hang/0007` from the
mode, topic and index; `multitask/<document>/<chunk>/<task>`) and per-request seeds derived from
`--seed` and the id. `plan_record` is what `plan.json` holds; a run resumes into a folder only when
`plan_differences` finds nothing changed, which is why everything that shapes the replies
(teacher, generation settings, inputs) is part of it. Kept apart from the run so that the plan can
be built and checked from strings, without a teacher or a folder.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.distill.teacher import TeacherConfig

TASKS = ("summary", "qa", "classify", "extract")

PLAN_FORMAT = "student-distill-plan/1"

SYSTEM_PROMPT = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."


class DistillError(Exception):
    """A run that cannot start or continue as asked; the message says what to fix."""


@dataclass(frozen=True)
class Document:
    """A shop document: `name` is its path relative to the documents folder."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Generation:
    """Request settings that shape the replies, hence part of the plan."""

    max_tokens: int
    temperature: float
    seed: int
    system_prompt: str = SYSTEM_PROMPT
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "system_prompt": self.system_prompt,
            "extra_body": dict(self.extra_body),
        }


@dataclass(frozen=True)
class Topic:
    key: str  # slug, unique within the plan
    text: str


@dataclass(frozen=True)
class PlannedSample:
    """One line of samples.jsonl to be: its id, task and where its prompt comes from."""

    id: str
    task: str
    topic: str
    topic_key: str | None = None  # response/cot: the topic whose question `index` is used
    index: int | None = None
    document: str | None = None  # multitask: document name and chunk
    chunk_index: int | None = None
    chunk: str | None = None


@dataclass(frozen=True)
class Plan:
    mode: str
    samples: tuple[PlannedSample, ...]
    topics: tuple[Topic, ...] = ()
    questions_per_topic: int = 0
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def by_task(self) -> dict[str, int]:
        return dict(Counter(sample.task for sample in self.samples))


def slugify(text: str, max_chars: int = 48) -> str:
    """ASCII slug: Vietnamese diacritics removed (đ → d), lowercase, words joined by '-'."""
    text = text.replace("đ", "d").replace("Đ", "D")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_chars].rstrip("-") or "x"


def load_topics(path: Path) -> list[str]:
    """Topics from a text file: one per line, blank lines and `#` comments skipped, duplicates once."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DistillError(f"topics file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DistillError(f"cannot read topics file {path}: {error}") from None
    topics, seen = [], set()
    for line in text.split("\n"):
        topic = " ".join(line.split())
        if topic and not topic.startswith("#") and topic.casefold() not in seen:
            seen.add(topic.casefold())
            topics.append(topic)
    if not topics:
        raise DistillError(f"topics file {path} has no topics (one per line; # starts a comment)")
    return topics


def load_documents(folder: Path) -> list[Document]:
    """The non-empty `.txt` and `.md` files under `folder`, sorted by relative path."""
    if not folder.is_dir():
        raise DistillError(f"documents folder {folder} does not exist or is not a folder")
    documents = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".txt", ".md"):
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise DistillError(f"cannot read document {path}: {error}") from None
        if text:
            documents.append(Document(path.relative_to(folder).as_posix(), text))
    if not documents:
        raise DistillError(f"documents folder {folder} has no non-empty .txt or .md file")
    return documents


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Paragraphs packed greedily into chunks of at most `max_chars` characters.

    A paragraph longer than that is cut at whitespace (or anywhere, for a single huge word).
    """
    if max_chars < 1:
        raise ValueError("max_chars must be >= 1")
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        paragraph = paragraph.strip()
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if paragraph:
            pieces.append(paragraph)
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 2 + len(piece) <= max_chars:
            chunks[-1] += "\n\n" + piece
        else:
            chunks.append(piece)
    return chunks


def unique_keys(texts: Sequence[str]) -> list[str]:
    """Slugs of `texts`, made unique by suffixes -2, -3, ... in order of appearance."""
    keys, used = [], Counter[str]()
    for text in texts:
        base = slugify(text)
        used[base] += 1
        key = base if used[base] == 1 else f"{base}-{used[base]}"
        while key in keys:
            used[base] += 1
            key = f"{base}-{used[base]}"
        keys.append(key)
    return keys


def plan_questions(mode: str, topics: Sequence[str], questions_per_topic: int) -> Plan:
    """The plan of `response`/`cot`: `questions_per_topic` samples per topic, in topic order."""
    if questions_per_topic < 1:
        raise DistillError("--questions-per-topic must be at least 1")
    planned_topics = tuple(Topic(key, text) for key, text in zip(unique_keys(topics), topics, strict=True))
    samples = tuple(
        PlannedSample(f"{mode}/{topic.key}/{index:04d}", mode, topic.text, topic_key=topic.key, index=index)
        for topic in planned_topics
        for index in range(questions_per_topic)
    )
    inputs = {"topics": [topic.text for topic in planned_topics], "questions_per_topic": questions_per_topic}
    return Plan(mode, samples, planned_topics, questions_per_topic, inputs)


def plan_multitask(documents: Sequence[Document], tasks: Sequence[str], chunk_chars: int) -> Plan:
    """The plan of `multitask`: every chunk of every document times every task."""
    if not tasks:
        raise DistillError("--tasks names no task")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise DistillError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if chunk_chars < 200:
        raise DistillError("--chunk-chars must be at least 200")
    keys = unique_keys([document.name.rsplit(".", 1)[0] for document in documents])
    samples = []
    for key, document in zip(keys, documents, strict=True):
        topic = document.name.rsplit(".", 1)[0]
        for chunk_index, chunk in enumerate(chunk_text(document.text, chunk_chars)):
            for task in tasks:
                samples.append(
                    PlannedSample(
                        f"multitask/{key}/{chunk_index:03d}/{task}",
                        task,
                        topic,
                        document=document.name,
                        chunk_index=chunk_index,
                        chunk=chunk,
                    )
                )
    inputs = {
        "documents": [{"name": document.name, "sha256": document.sha256} for document in documents],
        "tasks": list(tasks),
        "chunk_chars": chunk_chars,
    }
    return Plan("multitask", tuple(samples), inputs=inputs)


def plan_record(plan: Plan, teacher: TeacherConfig, generation: Generation) -> dict[str, Any]:
    """What plan.json holds; every key but `samples` must match for a run to resume."""
    return {
        "format": PLAN_FORMAT,
        "mode": plan.mode,
        "teacher": {"url": teacher.base_url, "model": teacher.model},
        "generation": generation.as_dict(),
        "inputs": dict(plan.inputs),
        "samples": [sample.id for sample in plan.samples],
    }


def plan_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted names of the plan fields that differ, e.g. ["mode", "teacher.model"]."""

    def walk(a: Any, b: Any, prefix: str) -> Iterator[str]:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                yield from walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            yield prefix

    return list(walk(old, new, ""))


def request_seed(seed: int, key: str) -> int:
    """A per-request seed (0 ≤ s < 2**31) derived from the run's `seed` and a stable key."""
    return zlib.crc32(f"{seed}|{key}".encode()) & 0x7FFFFFFF
