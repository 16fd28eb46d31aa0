from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.runtime.cli import COMMANDS, build_parser


def test_every_subcommand_is_registered() -> None:
    parser = build_parser(None)
    for command in COMMANDS:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([command, "--help"])
        assert done.value.code == 0


def test_top_level_help_does_not_import_torch() -> None:
    code = "import sys; from server.runtime.cli import build_parser; build_parser(None); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_serve_flags_become_settings() -> None:
    from server.runtime.serve import settings_from_args

    args = build_parser("serve").parse_args(["serve", "--port", "9000", "--upstream", "http://127.0.0.1:9001/v1"])
    settings = settings_from_args(args)
    assert settings.port == 9000
    assert settings.upstream_base_url == "http://127.0.0.1:9001"


def test_a_reader_that_leaves_early_is_not_a_traceback(tmp_path: Path) -> None:
    """`student report | head -n 1`: the reader is gone before the report is written (here it
    never reads: its end of the pipe is closed at once), which exits 141 quietly, as `cat` would."""
    from server.accounting.ledger import Ledger

    ledger = tmp_path / "ledger.sqlite3"
    Ledger(ledger).close()
    student = str(Path(sys.executable).with_name("student"))
    process = subprocess.Popen(
        [student, "report", "--ledger", str(ledger)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141, stderr
    assert "Traceback" not in stderr, stderr
