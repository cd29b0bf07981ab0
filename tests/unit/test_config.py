"""The one configuration loader: sources, precedence, validation that names the variable."""

import pytest

from worker.config import Config, Settings, load_config, masked
from worker.config_loader import ConfigError, read_sources
from worker.sink.settings import SinkSettings


def test_defaults():
    config = Config.from_sources({})
    assert config.settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert config.settings.destinations == ["amplitude", "amberflo", "reteno", "brevo"]
    assert config.names.dest("amplitude") == "segment.dest.amplitude"
    assert config.names.dlq("raw") == "segment.dlq.raw"
    assert config.names.group("normalize") == "segment-normalize"
    assert config.kafka.group_id("sink-brevo") == "segment-sink-brevo"


def test_any_librdkafka_property_passes_through():
    sources = {
        "KAFKA_BOOTSTRAP_SERVERS": "broker:9093",
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "PLAIN",
    }
    assert Config.from_sources(sources).kafka.properties == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "PLAIN",
    }


def test_every_client_gets_the_users_properties_and_only_its_own_kind():
    sources = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_LINGER_MS": "50", "KAFKA_SESSION_TIMEOUT_MS": "7000"}
    clients = Config.from_sources(sources).kafka
    consumer = clients.consumer_config("normalize")
    producer = clients.producer_config()
    assert consumer["security.protocol"] == producer["security.protocol"] == "SSL"
    assert consumer["session.timeout.ms"] == "7000" and "linger.ms" not in consumer
    assert producer["linger.ms"] == "50" and "session.timeout.ms" not in producer
    assert consumer["group.id"] == "segment-normalize"


def test_a_consumer_at_its_prefetch_bound_fetches_again_soon_and_the_user_can_say_otherwise():
    # librdkafka waits fetch.queue.backoff.ms (1 s by default) to fetch again once a partition's
    # prefetch reaches its bound; with the sink's bounded prefetch that starved a running sink.
    for bounded in (True, False):
        config = Config.from_sources({}).kafka.consumer_config("sink-amplitude", bounded_prefetch=bounded)
        assert int(config["fetch.queue.backoff.ms"]) <= 50
    assert int(Config.from_sources({}).kafka.consumer_config("x", bounded_prefetch=True)["queued.min.messages"])
    user = Config.from_sources({"KAFKA_FETCH_QUEUE_BACKOFF_MS": "500"}).kafka.consumer_config(
        "x", bounded_prefetch=True
    )
    assert user["fetch.queue.backoff.ms"] == "500"


def test_destinations_setting():
    assert Settings.from_sources({"DESTINATIONS": "amplitude, brevo"}).destinations == ["amplitude", "brevo"]
    with pytest.raises(ConfigError, match=r"^DESTINATIONS=amplitude,mixpanel: unknown destinations \['mixpanel'\]"):
        Settings.from_sources({"DESTINATIONS": "amplitude,mixpanel"})


def test_config_file_is_overridden_by_env(tmp_path):
    path = tmp_path / "worker.env"
    path.write_text("TOPIC_PREFIX=file.\nTOPIC_PARTITIONS=12\nSINK_CONCURRENCY=3\n")
    config = load_config({"TOPIC_PARTITIONS": "3"}, str(path))
    assert (config.settings.topic_prefix, config.settings.topic_partitions) == ("file.", 3)
    assert config.sink().concurrency == 3


def test_config_file_named_by_the_environment(tmp_path):
    path = tmp_path / "worker.env"
    path.write_text("KAFKA_SECURITY_PROTOCOL=SASL_SSL\n")
    sources = read_sources({"SEGMENT_WORKER_CONFIG": str(path)})
    assert Config.from_sources(sources).kafka.properties["security.protocol"] == "SASL_SSL"


def test_a_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_sources({}, str(tmp_path / "nope.env"))


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SINK_CONCURRENCY", "0", "greater than 0"),
        ("SINK_MAX_BUFFERED_EVENTS", "-1", "greater than 0"),
        ("SINK_REQUEST_TIMEOUT", "soon", "valid number"),
        ("SINK_BACKOFF_MAX", "0.1", "below SINK_BACKOFF_INITIAL"),
    ],
)
def test_bad_sink_values_name_the_variable(variable, value, message):
    with pytest.raises(ConfigError, match=message) as caught:
        SinkSettings.from_sources({variable: value})
    assert str(caught.value).startswith(f"{variable}")
    assert "\n" not in str(caught.value)


def test_secrets_are_never_echoed():
    config = Config.from_sources({"AMPLITUDE_API_KEY": "super-secret", "KAFKA_SASL_PASSWORD": "hunter2"})
    assert "super-secret" not in repr(config.destination_config("amplitude"))
    assert "hunter2" not in repr(config)
    assert masked(config.kafka.properties)["sasl.password"] == "***"
    with pytest.raises(ConfigError) as caught:
        Config.from_sources({"COLLECTOR_WRITE_KEYS": "k1", "COLLECTOR_MAX_BODY_BYTES": "big"}).collector()
    assert "COLLECTOR_MAX_BODY_BYTES=big" in str(caught.value)


def test_json_settings_that_are_not_json_name_the_variable():
    with pytest.raises(ConfigError, match=r"^AMPLITUDE_EVENT_MAPPING: not valid JSON"):
        Config.from_sources({"AMPLITUDE_EVENT_MAPPING": "{oops"}).destination_config("amplitude")


def test_a_sink_needs_its_destinations_key():
    with pytest.raises(ConfigError, match=r"^RETENO_ACCESS_KEY is not set"):
        Config.from_sources({}).destination("reteno")
    assert Config.from_sources({"RETENO_ACCESS_KEY": "k"}).destination("reteno").name == "reteno"


def test_an_unknown_destination_is_an_error():
    with pytest.raises(ConfigError, match="unknown destination 'mixpanel'"):
        Config.from_sources({}).destination("mixpanel")


def test_replicated_topics_require_two_in_sync_copies():
    from worker.topics import topic_specs

    three = topic_specs(Config.from_sources({"TOPIC_REPLICATION_FACTOR": "3"}))
    assert {spec.config["min.insync.replicas"] for spec in three} == {"2"}
    assert all("min.insync.replicas" not in spec.config for spec in topic_specs(Config.from_sources({})))
