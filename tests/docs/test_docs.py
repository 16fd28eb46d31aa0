"""The documentation: the site builds with `mkdocs build --strict`, its generated tables follow the
code, and the README stays short.

The build runs once per module (about two seconds): broken links, missing anchors, pages left out
of the nav and a lost table marker all fail it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import AliasChoices

from server.runtime.serve_flags import option_rows
from server.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_LINES = 150
ISSUE_NUMBER = re.compile(r"\bissue\s*#?\d", re.IGNORECASE)
ENV_NAME = re.compile(r"\bSTUDENT_[A-Z0-9_]*[A-Z0-9]\b")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as `mkdocs build --strict` writes it."""
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return site_dir


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def test_serving_page_has_a_row_for_every_flag(site: Path) -> None:
    page = (site / "serving" / "index.html").read_text(encoding="utf-8")
    rows = list(option_rows())
    assert rows, "option_rows() is empty"
    missing = [flag for flag, *_ in rows if f"<td><code>{flag}</code></td>" not in page]
    assert not missing, f"the generated option table on serving.md lacks {missing}"


def test_every_environment_variable_in_serving_md_is_a_setting() -> None:
    """The hand-written table of settings without a flag names only settings that exist."""
    known: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [f"student_{name}"]
        known.update(str(choice).upper() for choice in choices)
    named = set(ENV_NAME.findall((DOCS / "serving.md").read_text(encoding="utf-8")))
    assert named - known == set(), f"serving.md names variables no setting reads: {sorted(named - known)}"


def test_readme_fits_on_two_screens() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}"


def test_no_issue_numbers_in_the_docs() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in markdown_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not found, "issue numbers in the docs:\n" + "\n".join(found)
