"""The command line: help, prompt, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from joycap_queue.cli import cli

COMMANDS = [
    ["submit"],
    ["watch"],
    ["flower"],
    ["up"],
    ["status"],
    ["results"],
    ["caption"],
    ["prompt"],
    ["worker"],
    ["model"],
    ["model", "make-tiny"],
    ["export"],
    ["submit-dataset"],
    ["retry"],
    ["cancel"],
    ["forget"],
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(runner: CliRunner, command: list[str]) -> None:
    result = runner.invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert "joycap-queue " in result.output


def test_prompt_prints_the_exact_prompt(runner: CliRunner) -> None:
    result = runner.invoke(
        cli, ["prompt", "-t", "descriptive", "-l", "40", "--extra", "0", "1", "8", "--name", "Alice"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        "Write a detailed description for this image in 40 words or less. If there is a person/character in the "
        "image you must refer to them as Alice. Do NOT include information about people/characters that cannot be "
        "changed (like ethnicity, gender, etc), but do still include changeable attributes (like hair style). "
        "Do NOT mention the image's resolution."
    )


def test_prompt_follows_the_model_profile(runner: CliRunner) -> None:
    result = runner.invoke(
        cli, ["prompt", "--model", "fancyfeast/llama-joycaption-alpha-two-hf-llava", "-l", "any", "--system"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "system: You are a helpful image captioner.",
        "Write a descriptive caption for this image in a formal tone.",
    ]


def test_prompt_by_key_and_custom_prompt(runner: CliRunner) -> None:
    by_key = runner.invoke(cli, ["prompt", "-l", "any", "--extra", "lighting", "camera-angle"])
    assert by_key.output.strip() == (
        "Write a detailed description for this image. Include information about lighting. "
        "Include information about camera angle."
    )
    custom = runner.invoke(cli, ["prompt", "--prompt", "  Describe the colours.  ", "--extra", "2"])
    assert custom.output.strip() == "Describe the colours."


def test_prompt_file_is_listed(runner: CliRunner, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(["one", {"prompt": "two", "weight": 3}]))
    result = runner.invoke(cli, ["prompt", "--prompt-file", str(prompt_file)])
    assert result.exit_code == 0, result.output
    assert "[1] one" in result.output and "[3] two" in result.output


def test_prompt_list(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["prompt", "--list", "--profile", "alpha-two"])
    assert "Booru tag list" in result.output and " 16  important-only" in result.output
    assert "no-meta-phrases" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prompt", "-t", "haiku"], "Invalid value for '--caption-type': unknown caption type 'haiku'"),
        (["prompt", "-l", "25"], "Invalid value for '--length'"),
        (["prompt", "--extra", "99"], "Invalid value for '--extra'"),
        (["prompt", "--profile", "alpha-two", "--extra", "0"], "Invalid value for '--name'"),
        (["submit", "/no/such/folder"], "does not exist"),
        (["submit", ".", "--broker-url", "amqp://x"], "unsupported broker URL"),
        (["status", "--database-url", "nonsense"], "malformed database URL"),
        (["status", "--database-url", "postgresql://u:hunter2@127.0.0.1:1/x"], "cannot reach the database"),
        (["submit", ".", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    ],
)
def test_user_mistakes_are_one_line_errors(runner: CliRunner, args: list[str], message: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert "hunter2" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_unreachable_redis_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    database = tmp_path / "j.db"
    result = subprocess.run(
        [sys.executable, "-m", "joycap_queue", "submit", str(image)],
        env={
            "PATH": "/usr/bin:/bin",
            "JOYCAP_BROKER_URL": "redis://:topsecret@127.0.0.1:1/0",
            "JOYCAP_DATABASE_URL": f"sqlite:///{database}",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach Redis at redis://:***@127.0.0.1:1/0")
    assert "topsecret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not database.exists()
