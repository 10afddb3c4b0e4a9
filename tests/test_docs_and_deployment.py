"""What a new user reads and deploys: the README's settings table is the model's, and the
compose file parses as written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import settings_table

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_lists_every_setting_as_the_model_defines_it():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block == settings_table(), "README's settings table is stale: paste the output of `docpipe settings`"


def _compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose() is None, reason="neither docker-compose nor the docker compose plugin is installed")
def test_the_compose_file_is_valid_with_the_example_env_and_generated_secrets(tmp_path):
    for name in ("docker-compose.yml", ".env.example", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / (".env" if name == ".env.example" else name))
    subprocess.run([sys.executable, "-m", "pipeline.cli", "secrets", "--out", str(tmp_path / "secrets")], check=True, cwd=ROOT)
    run = subprocess.run([*_compose(), "config"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    config = run.stdout
    for service in ("redis", "minio", "init", "worker-baidu", "worker-idp", "worker-tuputech", "callbacks", "flower", "metrics"):
        assert f"  {service}:" in config
    assert "emulator-tuputech:" in config  # the emulators' profile is on through .env
    assert "FLOWER_BASIC_AUTH" in config and "requirepass" in config and "appendfsync always" in config
