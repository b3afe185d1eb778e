import subprocess
import sys

import pytest

from tests.conftest import run_cli


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from llmopt.cli.app import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\n"
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TORCH_NOT_IMPORTED" in proc.stdout
    for command in ("quantize", "eval", "bench", "shard", "serve", "nginx-config"):
        assert command in proc.stdout


def test_entry_point_and_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("llmopt ")


@pytest.mark.parametrize("command", ["shard", "serve", "nginx-config"])
def test_unbuilt_commands_say_so_and_fail(command):
    proc = run_cli(command)
    assert proc.returncode == 4
    assert "not yet available" in proc.stderr
    assert proc.stdout == ""


def test_models_lists_builtins():
    proc = run_cli("models")
    assert proc.returncode == 0
    assert "smollm2-135m" in proc.stdout and "tiny-random" in proc.stdout
