"""mkdocs hook: tables the docs take from the code, so the two cannot disagree.

A page line that is exactly one of the markers below is replaced, at build time, by a Markdown
table:

- `<!-- options: student serve -->`: every `student serve` flag, from
  `server.runtime.serve_flags.option_rows()` (flag, environment variable, default, meaning);
- `<!-- profiles: student serve -->`: the hardware profiles of `server.runtime.profiles.PROFILES`.

serving.md must hold both markers; a build without them fails rather than publish a page whose
tables silently went missing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # mkdocs loads this file by path; the project may not be installed
    sys.path.insert(0, str(ROOT))

from server.runtime.profiles import PROFILES  # noqa: E402  only importable once ROOT is on sys.path
from server.runtime.serve_flags import option_rows  # noqa: E402  as above

OPTIONS_MARKER = "<!-- options: student serve -->"
PROFILES_MARKER = "<!-- profiles: student serve -->"
MARKED_PAGE = "serving.md"
NONE = "\u2013"  # an en dash, as option_rows() writes "no default"


def cell(text: str) -> str:
    """Plain text for a table cell: Markdown's special characters shown as themselves."""
    for char in ("\\", "|", "*", "_", "[", "]"):
        text = text.replace(char, "\\" + char)
    return text.replace("<", "&lt;")


def code(text: str) -> str:
    """A code span for a table cell (a `|` inside would still end the cell)."""
    return "`" + text.replace("|", "\\|") + "`"


def options_table() -> str:
    """One row per `student serve` flag; the meaning without the default it repeats."""
    lines = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for flag, env, default, meaning in option_rows():
        meaning = meaning.removesuffix(f" (default: {default})")
        shown_default = NONE if default == NONE else code(default)
        lines.append(f"| {code(flag)} | {code(env)} | {shown_default} | {cell(meaning)} |")
    return "\n".join(lines)


def profiles_table() -> str:
    """One row per `--profile`: the settings it fills when they were left unset."""
    lines = [
        "| profile | device | dtype | GPU memory share | max model len | max seqs | extra vLLM arguments |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, values in PROFILES.items():
        extra = " ".join(values.get("vllm_extra_args", ()))
        row = [
            code(name),
            cell(str(values.get("device", NONE))),
            cell(str(values.get("dtype", NONE))),
            cell(str(values.get("gpu_memory_utilization", NONE))),
            cell(str(values.get("max_model_len", NONE))),
            cell(str(values.get("max_num_seqs", NONE))),
            code(extra) if extra else NONE,
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


TABLES = {OPTIONS_MARKER: options_table, PROFILES_MARKER: profiles_table}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace each marker line with its table."""
    lines = markdown.split("\n")
    found = {marker for marker in TABLES if marker in (line.strip() for line in lines)}
    if page.file.src_uri == MARKED_PAGE and found != set(TABLES):
        missing = ", ".join(sorted(set(TABLES) - found))
        raise PluginError(f"{MARKED_PAGE} lost its generated-table marker line(s): {missing}")
    if not found:
        return markdown
    return "\n".join(TABLES[line.strip()]() if line.strip() in TABLES else line for line in lines)
