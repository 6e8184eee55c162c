"""An unsupported or broken checkpoint is refused at start with a one-line reason, before any weight is read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import Blip2Config, LlamaConfig

from modalign.policy.families import UnsupportedModel, supported_model_types
from modalign.policy.model import build_default_policy, load_policy, save_policy


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    save_policy(*build_default_policy(0), folder)
    return folder


def broken_copy(source: Path, target: Path, *removed: str) -> Path:
    shutil.copytree(source, target)
    for name in removed:
        (target / name).unlink()
    return target


def refusal(folder: Path) -> str:
    with pytest.raises(UnsupportedModel) as refused:
        load_policy(folder)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_family_that_is_not_supported_is_named_with_the_supported_list(tmp_path: Path) -> None:
    Blip2Config().save_pretrained(tmp_path)
    message = refusal(tmp_path)
    assert "'blip-2'" in message and all(model_type in message for model_type in supported_model_types())


def test_a_text_only_checkpoint_is_refused_as_having_no_vision_part(tmp_path: Path) -> None:
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert "'llama' is not a supported image-text-to-text family" in refusal(tmp_path)


def test_a_folder_without_a_config_is_refused(tmp_path: Path) -> None:
    assert "no readable model config" in refusal(tmp_path)


def test_a_checkpoint_without_its_processor_is_refused(llava: Path, tmp_path: Path) -> None:
    folder = broken_copy(llava, tmp_path / "no-processor", "processor_config.json")
    assert "no readable processor" in refusal(folder)


def test_a_processor_without_a_chat_template_is_refused(llava: Path, tmp_path: Path) -> None:
    folder = broken_copy(llava, tmp_path / "no-template", "chat_template.jinja")
    assert "no chat_template" in refusal(folder)


@pytest.mark.integration
def test_the_policy_service_refuses_to_start_on_it_with_the_reason(tmp_path: Path) -> None:
    """Refused before anything is served: the process exits with status 2 and the reason as its last words."""
    Blip2Config().save_pretrained(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "modalign", "policy", "--model-dir", str(tmp_path), "--listen", "127.0.0.1:0",
         "--kafka.bootstrap-servers", "127.0.0.1:1", "--auth.insecure"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("modalign policy: ")
    assert "'blip-2'" in done.stderr.strip().splitlines()[-1]
