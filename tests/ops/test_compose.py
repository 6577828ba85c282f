"""The deployment files, checked without a Docker engine: they parse, their commands are real
commands of this CLI, their images install the project, and .env.example lists every variable."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from joycap_queue.cli import cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["compose.yaml", "compose.workers.yaml"]
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def services(name: str) -> dict[str, dict]:
    return yaml.safe_load((ROOT / name).read_text())["services"]


def option_names(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_command_is_a_real_cli_command(name: str) -> None:
    for service, spec in services(name).items():
        if "build" not in spec:
            continue  # redis and postgres run their own images
        command = spec["command"]
        assert command[0] == "joycap-queue", service
        sub = cli.commands.get(command[1])
        assert sub is not None, f"{service}: {command[1]} is not a joycap-queue command"
        for arg in command[2:]:
            if arg.startswith("-"):
                assert arg.split("=")[0] in option_names(sub), f"{service}: {command[1]} has no option {arg}"


def test_stores_are_healthchecked_and_waited_for() -> None:
    spec = services("compose.yaml")
    assert {"redis", "postgres", "worker", "watcher", "flower"} <= set(spec)
    assert "--appendonly yes" in " ".join(spec["redis"]["command"])
    for store in ("redis", "postgres"):
        assert spec[store]["healthcheck"]["test"]
    for service in ("worker", "watcher", "flower"):
        depends = spec[service]["depends_on"]
        assert depends == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
        }
    device = spec["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert spec["watcher"]["volumes"] == spec["worker"]["volumes"][1:], (
        "workers must see the inbox at the same path"
    )


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_secrets_are_required_and_every_variable_is_in_env_example(name: str) -> None:
    text = (ROOT / name).read_text()
    documented = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    used = set(VARIABLE.findall(text))
    assert used and used <= documented, f"missing from .env.example: {sorted(used - documented)}"
    for secret in ("REDIS_PASSWORD", "POSTGRES_PASSWORD"):
        assert re.search(r"\$\{" + secret + r":\?", text), f"{secret} must be required with ${{VAR:?}}"
    for spec in services(name).values():
        for key, value in (spec.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${"), f"{key} holds a literal password"


@pytest.mark.parametrize(
    ("dockerfile", "extra", "gpu"),
    [("docker/worker.Dockerfile", ".[worker]", True), ("docker/light.Dockerfile", ".", False)],
)
def test_images_install_the_project(dockerfile: str, extra: str, gpu: bool) -> None:
    text = "\n".join(
        line for line in (ROOT / dockerfile).read_text().splitlines() if not line.startswith("#")
    )
    assert "COPY joycap_queue" in text and "COPY pyproject.toml" in text
    assert f'pip install "{extra}"' in text or f"pip install {extra}" in text
    assert re.search(r"^USER (?!root)\w+", text, re.MULTILINE), "images run as a non-root user"
    assert ("FROM nvidia/cuda" in text) == gpu
    assert ("torch" in text) == gpu, "the light image must not install torch"
    for spec in (services("compose.yaml") | services("compose.workers.yaml")).values():
        build = spec.get("build")
        if build:
            assert (ROOT / build["dockerfile"]).is_file()
