from __future__ import annotations

import ipaddress

import pytest

from worker.config import ConfigError, get_settings, load_settings, parse_allow_entry


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
     ("CATALOG_FETCH_ALLOW_HOSTS", "not-an-ip"), ("CATALOG_VISIBILITY_TIMEOUT", "1")],
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
