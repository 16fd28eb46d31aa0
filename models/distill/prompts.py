"""What `student distill` sends the teacher and how it reads the replies: pure functions on strings.

The requests: customer questions per topic (`response`; `cot` asks for situations that need several
steps of reasoning), and one request per document chunk and task (`summary`, `qa`, `classify`,
`extract`). The replies: questions parsed one per line (numbering, bullets and quotes removed), the
teacher's reasoning separated from its final answer (`reasoning_content` when the server gives it,
else `<think>…</think>` in the content), the class label found in a classify reply, and the cot
assistant turn `<think>\\nREASONING\\n</think>\\n\\nANSWER`. Kept apart from the run so that every
format is tested from strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

LABEL_WORDS = {
    "technical": "technical", "kỹ thuật": "technical",
    "policy": "policy", "chính sách": "policy",
    "guide": "guide", "hướng dẫn": "guide",
    "promotion": "promotion", "khuyến mãi": "promotion",
    "other": "other", "khác": "other",
}  # fmt: skip
AVOID_QUESTIONS_SHOWN = 20  # known questions quoted back to the teacher as "do not repeat"

QUESTION_WRITER_PROMPT = "Bạn là chuyên gia hỗ trợ khách hàng thương mại điện tử."
TASK_SYSTEM_PROMPTS = {
    "summary": "Bạn là chuyên gia tóm tắt văn bản. Tóm tắt ngắn gọn, nắm bắt ý chính.",
    "qa": "Bạn là chuyên gia trả lời câu hỏi. Hãy trả lời chính xác và đầy đủ.",
    "classify": "Bạn là chuyên gia phân loại. Phân loại chính xác theo các nhãn cho sẵn.",
    "extract": "Bạn là chuyên gia trích xuất thông tin. Trích xuất chính xác thông tin cần thiết.",
}


def question_messages(mode: str, topic: str, count: int, known: Sequence[str]) -> list[dict[str, str]]:
    """The request for `count` new questions on `topic` (cot: situations that need reasoning)."""
    if mode == "cot":
        ask = (
            f"Viết {count} tình huống khó mà nhân viên chăm sóc khách hàng của một cửa hàng trực tuyến "
            f"gặp về chủ đề: {topic}. Mỗi tình huống cần suy luận nhiều bước mới giải quyết được "
            "(ví dụ: khách mua giày size 42 nhưng hết hàng, size 43 còn hàng và đắt hơn 50.000đ)."
        )
    else:
        ask = f"Viết {count} câu hỏi khác nhau mà khách hàng của một cửa hàng trực tuyến thường hỏi về chủ đề: {topic}."
    ask += " Mỗi câu một dòng, viết như khách hàng nhắn tin, không đánh số, không giải thích."
    if known:
        shown = "\n".join(f"- {question}" for question in known[-AVOID_QUESTIONS_SHOWN:])
        ask += f"\nKhông lặp lại các câu đã có:\n{shown}"
    return [{"role": "system", "content": QUESTION_WRITER_PROMPT}, {"role": "user", "content": ask}]


def task_messages(task: str, chunk: str) -> list[dict[str, str]]:
    """The multitask request for one chunk; it is also the sample's system and user turns."""
    if task == "summary":
        ask = f"Tóm tắt nội dung sau:\n\n{chunk}"
    elif task == "qa":
        ask = (
            f"Dựa trên nội dung sau, tạo 5 câu hỏi và câu trả lời.\n\nNội dung:\n{chunk}\n\n"
            "Định dạng:\nQ1: [Câu hỏi]\nA1: [Câu trả lời]\n..."
        )
    elif task == "classify":
        ask = (
            "Phân loại nội dung sau vào đúng một nhãn: technical (kỹ thuật), policy (chính sách), "
            "guide (hướng dẫn), promotion (khuyến mãi), other (khác). Chỉ trả lời bằng một nhãn "
            f"tiếng Anh.\n\nNội dung:\n{chunk}\n\nNhãn:"
        )
    elif task == "extract":
        ask = (
            "Trích xuất các thông tin quan trọng trong nội dung sau dưới dạng JSON với các khóa "
            '"chu_de", "thoi_han", "dieu_kien", "chi_phi", "ngoai_le", "lien_he" '
            f"(null nếu không có).\n\nNội dung:\n{chunk}"
        )
    else:
        raise ValueError(f"unknown task {task!r}")
    return [{"role": "system", "content": TASK_SYSTEM_PROMPTS[task]}, {"role": "user", "content": ask}]


_BULLET = re.compile(
    r"^\s*(?:[-*•·+]+|\(?\d{1,3}\s*[.):\]]|[Qq]\d{1,3}\s*[:.)]"  # bullets, "1.", "(2)", "Q3:"
    r"|Câu(?:\s+hỏi)?\s*\d{1,3}\s*[:.)]|Tình huống\s*\d{1,3}\s*[:.)])\s*"  # "Câu hỏi 4:", "Tình huống 5."
)
_ANSWER_LINE = re.compile(r"^\s*(?:[Aa]\d{1,3}\s*[:.)]|Trả lời\s*:)")


def parse_questions(text: str) -> list[str]:
    """One question per non-empty line, with numbering, bullets and quotes removed."""
    questions = []
    for line in text.split("\n"):
        if _ANSWER_LINE.match(line):
            continue
        question = _BULLET.sub("", line, count=1).strip().strip("\"'“”").strip()
        if len(question) >= 3 and any(character.isalnum() for character in question):
            questions.append(question)
    return questions


def question_key(question: str) -> str:
    """How questions are compared for duplicates: case-folded, whitespace collapsed."""
    return " ".join(question.casefold().split())


@dataclass(frozen=True)
class SplitReply:
    """A reply cut into reasoning and final answer; `unterminated`: `<think>` never closed."""

    reasoning: str | None
    answer: str
    unterminated: bool = False


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(content: str, reasoning: str | None = None) -> SplitReply:
    """Separate the chain of thought from the answer.

    `reasoning` (the server's `reasoning_content`) wins when non-empty; otherwise the content's
    `<think>…</think>` is the reasoning and what follows it the answer. A content that has a
    closing tag but no opening one (R1's template opens the block in the prompt) counts everything
    before the tag as reasoning. Whitespace around both parts is stripped; an empty part is None/"".
    """
    if reasoning is not None and reasoning.strip():
        answer = content
        if THINK_CLOSE in answer:
            answer = answer.split(THINK_CLOSE, 1)[1]
        return SplitReply(reasoning.strip(), answer.strip())
    if THINK_CLOSE in content:
        before, answer = content.split(THINK_CLOSE, 1)
        if THINK_OPEN in before:
            before = before.split(THINK_OPEN, 1)[1]
        return SplitReply(before.strip() or None, answer.strip())
    if THINK_OPEN in content:
        before, thought = content.split(THINK_OPEN, 1)
        return SplitReply(thought.strip() or None, before.strip(), unterminated=True)
    return SplitReply(None, content.strip())


def extract_label(text: str) -> str | None:
    """The first class label (English or Vietnamese word) found in a classify reply, or None."""
    lowered = text.casefold()
    found = [(lowered.find(word), label) for word, label in LABEL_WORDS.items() if word in lowered]
    return min(found)[1] if found else None


def cot_assistant_content(reasoning: str, answer: str) -> str:
    """The assistant turn of a cot sample: the reasoning in `<think>` tags, then the answer."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"
