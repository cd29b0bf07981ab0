import pytest
from pydantic import ValidationError

from worker.config import Settings


def test_defaults(clean_env):
    settings = Settings()
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.destinations == ["amplitude", "amberflo", "reteno", "brevo"]
    assert settings.topic("dest.amplitude") == "segment.dest.amplitude"
    assert settings.group("normalize") == "segment-normalize"


def test_any_librdkafka_property_passes_through(clean_env, monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    assert Settings().kafka_properties == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
    }


def test_destinations_setting(clean_env, monkeypatch):
    monkeypatch.setenv("DESTINATIONS", "amplitude, brevo")
    assert Settings().destinations == ["amplitude", "brevo"]
    monkeypatch.setenv("DESTINATIONS", "amplitude,mixpanel")
    with pytest.raises(ValidationError, match="unknown destinations"):
        Settings()


def test_config_file_is_overridden_by_env(clean_env, monkeypatch, tmp_path):
    from worker.config import load_settings

    path = tmp_path / "worker.env"
    path.write_text("TOPIC_PREFIX=file.\nTOPIC_PARTITIONS=12\n")
    monkeypatch.setenv("TOPIC_PARTITIONS", "3")
    settings = load_settings(str(path))
    assert (settings.topic_prefix, settings.topic_partitions) == ("file.", 3)
