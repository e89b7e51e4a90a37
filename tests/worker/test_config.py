from __future__ import annotations

import ipaddress

import pytest

from worker.config import ConfigError, get_settings, load_settings, parse_allow_entry, reset_settings


def test_defaults_are_the_embedded_mode(tmp_path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.effective_database_url == f"sqlite:///{(tmp_path / 'catalog.db').resolve()}"
    assert s.embedded_broker and s.effective_broker_url == "filesystem://"
    assert s.device == "auto" and s.steps[0] == "metadata" and "tagging" in s.steps


def test_environment_switches_to_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", "postgresql+psycopg2://u@db/catalog")
    monkeypatch.setenv("CATALOG_BROKER_URL", "redis://cache:6379/2")
    monkeypatch.setenv("CATALOG_FETCH_ALLOW_HOSTS", "10.0.0.0/8, 127.0.0.1:8080")
    s = get_settings()
    assert s.effective_database_url == "postgresql+psycopg2://u@db/catalog"
    assert not s.embedded_broker
    assert s.effective_redis_url == "redis://cache:6379/2"  # events stream defaults to the broker
    assert s.fetch_allow_hosts == ["10.0.0.0/8", "127.0.0.1:8080"]


@pytest.mark.parametrize(
    ("var", "value"),
    [("CATALOG_MAX_PIXELS", "lots"), ("CATALOG_DEVICE", "tpu"), ("CATALOG_DATABASE_URL", "mysql://x"),
     ("CATALOG_FETCH_ALLOW_HOSTS", "not-an-ip"), ("CATALOG_VISIBILITY_TIMEOUT", "1"),
     ("CATALOG_SR_MODEL", "esrgan")],
)
def test_bad_value_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=var):
        get_settings()


def test_allow_entries() -> None:
    assert parse_allow_entry("10.0.0.0/8") == (ipaddress.ip_network("10.0.0.0/8"), None)
    assert parse_allow_entry("127.0.0.1:8080") == (ipaddress.ip_network("127.0.0.1/32"), 8080)
    assert parse_allow_entry("[::1]:81") == (ipaddress.ip_network("::1/128"), 81)


def test_visibility_timeout_must_cover_the_longest_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_VISIBILITY_TIMEOUT", "600")
    monkeypatch.setenv("CATALOG_TASK_TIME_LIMIT", "900")
    with pytest.raises(ConfigError, match="CATALOG_VISIBILITY_TIMEOUT above CATALOG_TASK_TIME_LIMIT"):
        get_settings()


# --- issue 13: fail fast, naming the variable ----------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [("CATALOG_DETECTOR", "yolov8", "unknown model 'yolov8'"),
     ("CATALOG_SEGMENTER", "torchvision:", "unknown model"),
     ("CATALOG_TAXONOMY_PATH", "/nope.yaml", "does not exist"),
     ("CATALOG_CATEGORY_HEAD_PATH", "/nope.pt", "does not exist"),
     ("CATALOG_DETECTOR_CHECKPOINT", "/nope.pth", "does not exist"),
     ("CATALOG_SEGMENTER_CHECKPOINT", "/nope.pth", "does not exist")],
)
def test_settings_that_cannot_work_are_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                               says: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"{var}: .*{says}"):
        get_settings()


def test_torchvision_models_and_existing_files_are_accepted(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "det.pth"
    checkpoint.write_bytes(b"x")
    monkeypatch.setenv("CATALOG_DETECTOR", "torchvision:fasterrcnn_mobilenet_v3_large_fpn")
    monkeypatch.setenv("CATALOG_DETECTOR_CHECKPOINT", str(checkpoint))
    s = get_settings()
    assert s.detector_checkpoint == checkpoint


def test_bad_fraud_weights_json_names_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_FRAUD_WEIGHTS", "{bad")
    with pytest.raises(ConfigError) as caught:
        get_settings()
    assert "CATALOG_FRAUD_WEIGHTS" in str(caught.value)
    assert "CATALOG_STEPS" not in str(caught.value)


def test_unknown_fraud_kind_is_refused_naming_the_valid_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_FRAUD_WEIGHTS", '{"foo": 1, "nsfw": 0.5}')
    with pytest.raises(ConfigError, match=r"CATALOG_FRAUD_WEIGHTS: unknown flag kind\(s\) foo; valid kinds: "
                                          r"duplicate_image, contact_info, nsfw"):
        get_settings()
    monkeypatch.setenv("CATALOG_FRAUD_WEIGHTS", '{"nsfw": 0.5}')
    reset_settings()
    assert get_settings().fraud_weights == {"nsfw": 0.5}


@pytest.mark.parametrize("url", ["postgresql://u@db/catalog", "postgres://u@db/catalog"])
def test_driverless_postgres_url_uses_psycopg2(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", url)
    assert get_settings().effective_database_url == "postgresql+psycopg2://u@db/catalog"


def test_refused_url_is_shown_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_DATABASE_URL", "mysql://u:TopSecret@db/x")
    with pytest.raises(ConfigError) as caught:
        get_settings()
    assert "TopSecret" not in str(caught.value) and "mysql://u:***@db/x" in str(caught.value)


@pytest.mark.parametrize("name", ["DATABASE_URL", "BROKER_URL", "REDIS_URL", "API_SECRET"])
def test_secret_read_from_file(tmp_path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    values = {"DATABASE_URL": "postgresql+psycopg2://u:pw@db/c", "BROKER_URL": "redis://:pw@r:6379/0",
              "REDIS_URL": "redis://:pw@r:6379/1", "API_SECRET": "s" * 40}
    secret = tmp_path / "secret"
    secret.write_text(values[name] + "\n")
    monkeypatch.setenv(f"CATALOG_{name}_FILE", str(secret))
    value = getattr(get_settings(), name.lower())
    shown = value.get_secret_value() if name == "API_SECRET" else value
    assert shown == values[name]  # the trailing newline is stripped


def test_secret_and_its_file_together_are_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("redis://r:6379/0\n")
    monkeypatch.setenv("CATALOG_BROKER_URL", "redis://other:6379/0")
    monkeypatch.setenv("CATALOG_BROKER_URL_FILE", str(secret))
    with pytest.raises(ConfigError, match="CATALOG_BROKER_URL and CATALOG_BROKER_URL_FILE are both set"):
        get_settings()


def test_unreadable_secret_file_names_the_variable(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_API_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="CATALOG_API_SECRET_FILE: cannot read"):
        get_settings()
