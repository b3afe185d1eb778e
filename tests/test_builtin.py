"""Built-in models are materialised once, deterministically, under a lock."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_random_is_deterministic_and_concurrent_builds_are_safe(tiny_dir: Path, tmp_path: Path):
    # Two processes race to build tiny-random into an empty cache: both succeed, one folder results,
    # and it is byte-identical to the session's copy (same config, same seed).
    code = "from llmopt.models import materialize_builtin; print(materialize_builtin('tiny-random'))"
    env = {**os.environ, "LLMOPT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1]
    built = Path(outputs[0])
    assert digest(built) == digest(tiny_dir)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()) == ["tiny-random"]
