import pytest

from worker.normalize.routing import destinations_for

ALL = ["amplitude", "amberflo", "reteno", "brevo"]


@pytest.mark.parametrize(
    ("integrations", "expected"),
    [
        ({}, ALL),
        ({"All": True}, ALL),
        ({"All": False}, []),
        ({"All": False, "Amplitude": True}, ["amplitude"]),
        ({"All": False, "amberflo": {"someOption": 1}}, ["amberflo"]),  # an options object enables
        ({"Brevo": False}, ["amplitude", "amberflo", "reteno"]),
        ({"All": True, "Reteno": False, "Mixpanel": False}, ["amplitude", "amberflo", "brevo"]),
    ],
)
def test_integrations_object_decides(integrations, expected):
    assert destinations_for(integrations, ALL) == expected


def test_the_destinations_setting_limits_everything():
    assert destinations_for({"Reteno": True}, ["amplitude"]) == ["amplitude"]
