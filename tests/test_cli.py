"""The `qwen2-cluster` console script, run as a user would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run(*args, env=None):
    beside_python = Path(sys.executable).parent / "qwen2-cluster"
    exe = str(beside_python) if beside_python.exists() else shutil.which("qwen2-cluster")
    assert exe, "the package is installed (pip install -e .), so its console script exists"
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)


def test_init_random_writes_a_checkpoint_with_overrides(tmp_path):
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"num_hidden_layers": 2}))
    out = run("init-random", "--preset", "tiny", "--config", str(override), "--out", str(tmp_path / "m"),
              "--seed", "3", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["torch_dtype"] == "bfloat16"
    assert (tmp_path / "m" / "tokenizer.json").is_file()


def test_unknown_preset_is_a_clean_error(tmp_path):
    out = run("init-random", "--preset", "qwen2-9000b", "--out", str(tmp_path / "m"))
    assert out.returncode != 0
    assert "unknown preset 'qwen2-9000b'" in out.stderr and "Traceback" not in out.stderr


def test_generate_through_the_engine_on_the_builtin_demo_checkpoint(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    out = run("generate", "--prompt", "Hello world", "--max-new-tokens", "5", "--ignore-eos",
              "--tensor-parallel-size", "2", "--rendezvous-host", "127.0.0.1", env=env)
    assert out.returncode == 0, out.stderr
    assert "tp=2 pp=1" in out.stderr
    assert "2 prompt tokens, 5 generated" in out.stderr  # "Hello world" is [9707, 1879] in Qwen's tokenizer
    assert (tmp_path / "qwen2-cluster" / "demo-tiny" / "config.json").is_file()
