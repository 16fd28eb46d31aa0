from __future__ import annotations

import subprocess
import sys

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
