"""Dockerfile.cuda: no Docker engine runs here, so lint it and check it cannot drift from the set-up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.cuda"
HADOLINT = Path(sys.executable).with_name("hadolint")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_installs_with_the_readme_set_up_script_and_gpu_profile() -> None:
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(re.search(r"(^|\s)scripts/install\.sh gpu\s", args + " ") for args in runs), runs
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install.sh $(PROFILE) $(VENV)" in makefile  # `make serve PROFILE=gpu` runs the same script


def test_every_package_the_project_ships_is_copied_into_the_image() -> None:
    copied = {args.split()[0].rstrip("/") for keyword, args in instructions() if keyword == "COPY"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, f"not copied: {packages - copied}"
    assert {"pyproject.toml", "requirements", "scripts"} <= copied
    assert all((ROOT / name).exists() for name in copied)


def test_runtime_shape_non_root_health_nvml_and_volumes() -> None:
    found = instructions()
    users = [args for keyword, args in found if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    health = " ".join(args for keyword, args in found if keyword == "HEALTHCHECK")
    assert "/ready" in health
    env = " ".join(args for keyword, args in found if keyword == "ENV")
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=\S*utility", env)  # mounts libnvidia-ml for the energy meter
    assert ("EXPOSE", "8000") in found
    assert any(keyword == "VOLUME" for keyword, _ in found)
    assert '"/model"' in dict(found)["CMD"]
