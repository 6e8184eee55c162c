"""The service skeleton's configs: flags and environment variables, validation at parse time, the inverse
(config -> arguments) that launchers use, and dotted overrides that fail when the config is built."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from modalign.core.auth import AuthConfig
from modalign.core.broker import BrokerConfig
from modalign.core.config import ConfigError, add_arguments, field_docs, parse_config, to_arguments, with_overrides
from modalign.core.kafka import KafkaConfig
from modalign.core.launch import LocalSystem, on_broker, service_argv
from modalign.demo.run import DEMO_SETTINGS, DEMO_SPOKEN, DemoConfig, service_settings
from modalign.feedback.server import FeedbackConfig
from modalign.policy.config import PolicyConfig
from modalign.policy.model import build_default_policy, save_policy
from modalign.reward.config import RewardServerConfig
from modalign.rollout.server import RolloutConfig
from modalign.trainer.service import TrainerConfig
from modalign.up import LocalPorts, UpConfig, local_services

INSECURE = AuthConfig(insecure=True)

SERVICE_CONFIGS = [PolicyConfig, FeedbackConfig, RewardServerConfig, TrainerConfig, RolloutConfig]
COMMAND_CONFIGS = [*SERVICE_CONFIGS, UpConfig, DemoConfig, BrokerConfig]


@pytest.fixture(autouse=True)
def no_modalign_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in __import__("os").environ if name.startswith("MODALIGN_")]:
        monkeypatch.delenv(name)


@pytest.mark.parametrize("cls", COMMAND_CONFIGS, ids=lambda cls: cls.__name__)
def test_every_flag_has_help_text_and_its_environment_variable(cls: type) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    flags = [action for action in parser._actions if action.dest != "help"]
    assert flags
    for action in flags:
        text, _, env = action.help.partition(" [env ")
        assert text.strip(), f"{action.option_strings[0]} of {cls.__name__} has no docstring"
        assert env.startswith("MODALIGN_" + action.dest.replace(".", "_").upper() + ";"), action.help


@pytest.mark.parametrize("cls", SERVICE_CONFIGS, ids=lambda cls: cls.__name__)
def test_every_nested_config_field_is_documented(cls: type) -> None:
    for field in dataclasses.fields(cls):
        assert field.name in field_docs(cls), f"{cls.__name__}.{field.name} has no docstring"


def test_modalign_help_lists_each_services_flags_with_help() -> None:
    result = subprocess.run([sys.executable, "-m", "modalign", "feedback", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--kafka.bootstrap-servers" in result.stdout and "MODALIGN_LISTEN" in result.stdout
    assert "Threads serving RPCs" in result.stdout


def test_a_bad_value_exits_like_argparse_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(RolloutConfig, ["--rollout.steps", "50,20"])
    assert exit_info.value.code == 2
    assert "argument --rollout.steps: increasing percentages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(PolicyConfig, ["--follow", "sometimes"])
    assert "argument --follow: one of rollout, latest, none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(RewardServerConfig, ["--follow", "true"])
    assert "argument --follow: one of latest, none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(RolloutConfig, ["--rollout.required-metrics", "rating,reward"])
    assert "argument --rollout.required-metrics: names reward, which needs --reward-url" in capsys.readouterr().err


def test_environment_variables_are_read_and_a_malformed_one_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODALIGN_KAFKA_TOPIC_PREFIX", "env.")
    monkeypatch.setenv("MODALIGN_GRPC_MAX_WORKERS", "3")
    config = parse_config(FeedbackConfig, ["--grpc.max-workers", "4"])
    assert (config.kafka.topic_prefix, config.grpc.max_workers) == ("env.", 4)  # flags win
    assert config.kafka.produce_timeout_s == 5.0  # the service's own default for a nested field
    monkeypatch.setenv("MODALIGN_METRICS_PORT", "ninety")
    with pytest.raises(SystemExit):
        parse_config(FeedbackConfig, [])
    assert "argument --metrics-port: environment variable MODALIGN_METRICS_PORT='ninety'" in capsys.readouterr().err


def test_the_broker_and_demo_flags_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODALIGN_PORT", "19092")
    monkeypatch.setenv("MODALIGN_MINUTES", "2.5")
    demo = parse_config(DemoConfig, ["--versions", "3"])
    assert (demo.broker.port, demo.minutes, demo.versions) == (19092, 2.5, 3)
    assert parse_config(UpConfig, ["--example"]).example is True  # a bare boolean flag is a switch


@pytest.mark.parametrize("config", [
    with_overrides(PolicyConfig(), {"listen": "0.0.0.0:1", "follow": "none", "blob_dir": Path("/b"),
                                    "kafka.topic_prefix": "t.", "max_batch_wait_ms": 2.5, "s3.endpoint_url": "http://s",
                                    "s3.allow_plaintext": True}),
    RewardServerConfig(model_dir=Path("/m"), follow="latest", limits=dataclasses.replace(
        RewardServerConfig().limits, max_batch_size=3)),
    with_overrides(TrainerConfig(), DEMO_SETTINGS["trainer"]),
    with_overrides(RolloutConfig(), DEMO_SETTINGS["rollout"]),
    with_overrides(FeedbackConfig(), {"kafka.produce_timeout_s": 1.0, "log_level": "DEBUG"}),
], ids=lambda config: type(config).__name__)
def test_arguments_rebuild_the_config_they_came_from(config: object) -> None:
    arguments = to_arguments(config)
    assert arguments, "every case sets something"
    assert parse_config(type(config), arguments) == config
    assert to_arguments(type(config)()) == []  # defaults need no flags


def test_a_misspelt_or_removed_field_fails_when_the_config_is_built() -> None:
    with pytest.raises(ConfigError, match="TrainerConfig has no field 'rounds_per_verison'"):
        with_overrides(TrainerConfig(), {"rounds_per_verison": 2})
    with pytest.raises(ConfigError, match="LearnerConfig has no field 'algorithmm'"):
        with_overrides(TrainerConfig(), {"learner.algorithmm": "dpo"})
    with pytest.raises(ConfigError, match="not a"):
        with_overrides(RolloutConfig(), {"rollout.steps": "50,100"})  # a typed config takes typed values
    with pytest.raises(ConfigError) as refused:
        with_overrides(RolloutConfig(), {"rollout.steps": (100, 50)})  # validated as its service would
    assert refused.value.field == "rollout.steps"
    ports = LocalPorts()
    with pytest.raises(ConfigError, match="no field 'follow_versions'"):
        local_services(KafkaConfig(), Path("/tmp/x"), ports, INSECURE, {"reward": {"follow_versions": True}})
    with pytest.raises(ConfigError, match="not a service"):
        local_services(KafkaConfig(), Path("/tmp/x"), ports, INSECURE, {"rolout": {}})
    with pytest.raises(ConfigError):  # a launcher never starts a service with a config it would refuse
        LocalSystem({"policy": dataclasses.replace(PolicyConfig(), follow="nonsense")}, Path("/tmp/x"))


def test_the_demo_configures_every_service_as_before(tmp_path: Path) -> None:
    """The demo's settings, as the flags its services were started with before they came from configs."""
    demo = DemoConfig(device="cuda", seed=3)
    services = local_services(KafkaConfig(topic_prefix="demo-x."), tmp_path, LocalPorts(50151, 9201), INSECURE,
                              service_settings(demo, Path("/warm")))
    trainer = parse_config(TrainerConfig, to_arguments(services["trainer"]))  # as the trainer process reads it
    assert (trainer.learner.algorithm, trainer.round_max_seconds, trainer.min_pairs_to_learn) == ("dpo", 5, 16)
    assert (trainer.rounds_per_version, trainer.learner.max_new_tokens, trainer.learner.policy_lr) == (2, 32, 1e-4)
    assert (trainer.learner.policy_model_dir, trainer.learner.seed, trainer.learner.device) == ("/warm", 3, "cuda")
    assert (trainer.kafka.topic_prefix, trainer.metrics_port, trainer.work_dir) == ("demo-x.", 9204, tmp_path / "trainer")
    rollout = services["rollout"]
    assert (rollout.rollout.steps, rollout.rollout.min_step_seconds, rollout.rollout.min_samples) == ((50, 100), 10, 15)
    assert (rollout.rollout.required_metrics, rollout.tick_seconds, rollout.listen) == (("rating",), 1, "127.0.0.1:50155")
    assert (services["policy"].model_dir, services["policy"].device) == ("/warm", "cuda")
    assert (services["reward"].device, services["reward"].follow) == ("cuda", "latest")
    assert services["feedback"].kafka.produce_timeout_s == 5.0


def test_services_are_started_as_modalign_subcommands() -> None:
    config = on_broker(FeedbackConfig, KafkaConfig(bootstrap_servers="b:1"), listen="127.0.0.1:7")
    assert service_argv(config) == ["-m", "modalign", "feedback", "--kafka.bootstrap-servers", "b:1",
                                    "--listen", "127.0.0.1:7"]


def test_the_demo_runs_the_algorithm_it_is_given_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    for algorithm in ("dpo", "ppo", "a2c", "rloo", "grpo"):
        demo = parse_config(DemoConfig, ["--algorithm", algorithm])
        services = local_services(KafkaConfig(), tmp_path, LocalPorts(), INSECURE, service_settings(demo, Path("/warm")))
        trainer = parse_config(TrainerConfig, to_arguments(services["trainer"]))  # as the trainer process reads it
        assert trainer.learner.algorithm == algorithm
        assert trainer.rounds_per_version == DEMO_SETTINGS["trainer"]["rounds_per_version"]
        assert trainer.learner.policy_lr == (3e-4 if algorithm == "a2c" else 1e-4)  # A2C's one step per batch
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--algorithm", "a3c"])


def test_the_demos_reward_backbone_reaches_the_trainer_and_the_reward_service(tmp_path: Path) -> None:
    demo = parse_config(DemoConfig, ["--reward-backbone", "clip", "--algorithm", "rloo"])
    services = local_services(KafkaConfig(), tmp_path, LocalPorts(), INSECURE, service_settings(demo, Path("/warm")))
    trainer = parse_config(TrainerConfig, to_arguments(services["trainer"]))  # as the trainer process reads it
    reward = parse_config(RewardServerConfig, to_arguments(services["reward"]))
    assert (trainer.learner.reward_backbone, reward.backbone) == ("clip", "clip")
    assert DemoConfig().reward_backbone == TrainerConfig().learner.reward_backbone == RewardServerConfig().backbone == "generative"
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--reward-backbone", "vit"])


def test_a_spoken_demo_learns_at_its_own_rate_and_refuses_a_share_it_cannot_run(tmp_path: Path) -> None:
    demo = parse_config(DemoConfig, ["--spoken-share", "0.5"])
    services = local_services(KafkaConfig(), tmp_path, LocalPorts(), INSECURE, service_settings(demo, Path("/warm")))
    trainer = parse_config(TrainerConfig, to_arguments(services["trainer"]))  # as the trainer process reads it
    assert demo.spoken_share == 0.5 and (trainer.learner.policy_lr, trainer.learner.reward_epochs) == (2e-4, 1)
    assert set(DEMO_SPOKEN) == {"learner.policy_lr", "learner.reward_epochs"}
    for flags in (["--spoken-share", "1.5"], ["--spoken-share", "-0.1"], ["--spoken-share", "0.3", "--reward-backbone", "clip"]):
        with pytest.raises(SystemExit):
            parse_config(DemoConfig, flags)


def test_a_spoken_demo_refuses_a_starting_model_that_hears_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_policy(*build_default_policy(seed=0), tmp_path / "llava")
    assert parse_config(DemoConfig, ["--policy-model", str(tmp_path / "llava")]).spoken_share == 0
    with pytest.raises(SystemExit):
        parse_config(DemoConfig, ["--policy-model", str(tmp_path / "llava"), "--spoken-share", "0.3"])
    assert "hears nothing" in capsys.readouterr().err
