"""An app's configuration: the daemon's file, TOML text or a dict, with
the same FLOWGATE__ environment overrides and the same refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

import flowgate

TOML = """
[http]
bind = ""
[[exchanges]]
name = "shop"
[[queues]]
name = "orders"
bindings = [{ exchange = "shop", routing_key = "order.created" }]
[[stages]]
name = "reserve"
queue = "orders"
handler = "reserve"
prefetch = 20
"""


def test_a_file_text_and_dict_load_the_same(tmp_path: Path) -> None:
    path = tmp_path / "flowgate.toml"
    path.write_text(TOML)
    for app in (
        flowgate.App(path),
        flowgate.App(str(path)),
        flowgate.App.from_toml(TOML),
        flowgate.App.from_dict(
            {
                "http": {"bind": ""},
                "exchanges": [{"name": "shop"}],
                "queues": [
                    {
                        "name": "orders",
                        "watermark": None,
                        "bindings": [{"exchange": "shop", "routing_key": "order.created"}],
                    }
                ],
                "stages": [
                    {"name": "reserve", "queue": "orders", "handler": "reserve", "prefetch": 20}
                ],
            }
        ),
    ):
        assert app.config.stages == [("reserve", "orders", "reserve")]
        assert app.config.queues == ["orders"]


def test_flowgate_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.toml"
    path.write_text(TOML)
    monkeypatch.setenv("FLOWGATE_CONFIG", str(path))
    assert flowgate.App().config.queues == ["orders"]
    monkeypatch.delenv("FLOWGATE_CONFIG")
    with pytest.raises(flowgate.ConfigError):
        flowgate.App()


def test_environment_overrides_apply_as_for_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWGATE__STAGES__0__PREFETCH", "70000")
    with pytest.raises(flowgate.ConfigError) as e:
        flowgate.App.from_toml(TOML)
    assert e.value.key == "stages[0].prefetch"


def test_refusals_name_the_key() -> None:
    with pytest.raises(flowgate.ConfigError) as e:
        flowgate.App.from_toml(TOML + "[bogus]\n")
    assert e.value.key == "bogus"
    assert isinstance(e.value, ValueError)
    with pytest.raises(flowgate.ConfigError) as e:
        flowgate.App.from_dict({"stages": [{"name": "s"}]})
    assert "queue" in str(e.value)
    with pytest.raises(TypeError):
        flowgate.App.from_dict({"http": {"bind": object()}})


async def test_a_stage_whose_handler_nobody_registered_is_refused_at_start() -> None:
    app = flowgate.App.from_toml(TOML)
    with pytest.raises(flowgate.ConfigError) as e:
        await app.start()
    assert e.value.key == "stages[0].handler"
    assert not app.running


def test_a_name_is_registered_once() -> None:
    app = flowgate.App.from_toml(TOML)
    app.handler("reserve")(lambda m: None)
    with pytest.raises(ValueError):
        app.handler("reserve")(lambda m: None)
