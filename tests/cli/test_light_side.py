"""The light side (CLI, submit, watcher) must start without torch or transformers."""

from __future__ import annotations

import subprocess
import sys


def test_cli_and_intake_import_no_torch() -> None:
    code = (
        "import sys, joycap_queue.cli, joycap_queue.intake.enqueue, joycap_queue.messaging.app, joycap_queue.store.jobstate;"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_does_not_load_the_model_stack() -> None:
    code = (
        "import sys; from joycap_queue.cli import cli;"
        "cli.main(['submit', '--help'], standalone_mode=False);"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
