"""Where livemig's defaults come from: built in, then the file, then LIVEMIG_*, then flags."""

import pytest

from livemig import config
from livemig.errors import UsageError
from livemig.options import Mode


def test_file_then_environment_then_flags(tmp_path):
    (tmp_path / "livemig").mkdir()
    path = tmp_path / "livemig" / "config.toml"
    path.write_text('mode = "postcopy"\nmax_downtime = 0.5\nmax_rounds = 4\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path), "LIVEMIG_MAX_DOWNTIME": "0.2", "LIVEMIG_COMPRESSION_LEVEL": "3"}
    cfg = config.load(env)
    assert cfg.file == path
    assert (cfg.options.mode, cfg.options.max_downtime, cfg.options.max_rounds, cfg.options.compression_level) \
        == (Mode.POSTCOPY, 0.2, 4, 3)
    assert cfg.sources["mode"] == str(path) and cfg.sources["max_downtime"] == "LIVEMIG_MAX_DOWNTIME"
    assert cfg.sources["image_root"] == "default"
    flagged = cfg.with_flags(mode="stopcopy", max_rounds=None)
    assert flagged.options.mode is Mode.STOPCOPY and flagged.sources["mode"] == "flag"
    assert flagged.options.max_rounds == 4 and flagged.sources["max_rounds"] == str(path)


def test_auto_converge_is_on_unless_a_file_a_variable_or_no_throttle_turns_it_off(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("throttle = false\n")
    assert config.load({"HOME": str(tmp_path)}).options.throttle is True
    assert config.load({"LIVEMIG_CONFIG": str(path)}).options.throttle is False
    cfg = config.load({"HOME": str(tmp_path), "LIVEMIG_THROTTLE": "no"})
    assert cfg.options.throttle is False and cfg.sources["throttle"] == "LIVEMIG_THROTTLE"
    # --no-throttle is throttle=False; without it, None: whatever the file or variable said
    assert config.load({"HOME": str(tmp_path)}).with_flags(throttle=False).options.throttle is False
    assert config.load({"LIVEMIG_CONFIG": str(path)}).with_flags(throttle=None).options.throttle is False


def test_no_file_means_the_built_in_defaults(tmp_path):
    cfg = config.load({"HOME": str(tmp_path)})
    assert cfg.file is None and cfg.options == config.Options()
    assert set(cfg.sources.values()) == {"default"}


@pytest.mark.parametrize("text, env, message", [
    ("mood = 1\n", {}, "unknown setting 'mood'"),
    ("mode = \"fast\"\n", {}, "'fast' is not a mode"),
    ("max_rounds = \"many\"\n", {}, "max_rounds in"),
    ("max_downtime = [\n", {}, "config file"),
    ("", {"LIVEMIG_MAX_ROUNDS": "0"}, "LIVEMIG_MAX_ROUNDS: '0' is not above 0"),
    ("", {"LIVEMIG_IMAGE_ROOT": "relative/dir"}, "not an absolute path"),
    ("", {"LIVEMIG_COMPRESSION_LEVEL": "30"}, "zstd level"),
    ("throttle = \"sometimes\"\n", {}, "is not true or false"),
])
def test_bad_settings_are_one_line_usage_errors(tmp_path, text, env, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as e:
        config.load({"LIVEMIG_CONFIG": str(path), **env})
    assert "\n" not in str(e.value)


def test_a_named_config_file_must_exist(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        config.load({"LIVEMIG_CONFIG": str(tmp_path / "nope.toml")})


def test_a_bad_flag_value_is_a_usage_error_too():
    with pytest.raises(UsageError, match="--max-downtime"):
        config.load({"HOME": "/nonexistent"}).with_flags(max_downtime=-1.0)


def test_livemig_config_prints_values_and_sources_and_bad_config_exits_2(tmp_path, monkeypatch, capsys):
    import json

    from livemig import cli
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("LIVEMIG_CONFIG", raising=False)
    monkeypatch.setenv("LIVEMIG_MODE", "stopcopy")
    assert cli.main(["config", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["mode"] == {"value": "stopcopy", "from": "LIVEMIG_MODE"}
    assert out["settings"]["max_rounds"] == {"value": 8, "from": "default"}
    monkeypatch.setenv("LIVEMIG_MODE", "warp")
    assert cli.main(["move", "--pid", "1", "b"]) == 2
    assert capsys.readouterr().err.strip() == "livemig: LIVEMIG_MODE: 'warp' is not a mode " \
        "(auto, precopy, postcopy, hybrid, stopcopy)"


def test_livemig_config_prints_a_config_file_that_loads_back_to_the_same_settings(tmp_path, monkeypatch, capsys):
    from livemig import cli
    # a false flag, a rate, a path with a quote in it: Python's spellings of them are not TOML
    env = {"HOME": str(tmp_path), "LIVEMIG_THROTTLE": "0", "LIVEMIG_MAX_BANDWIDTH": "50M",
           "LIVEMIG_IMAGE_ROOT": '/var/lib/live"mig', "LIVEMIG_MODE": "precopy"}
    for k in ("XDG_CONFIG_HOME", "LIVEMIG_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["config"]) == 0
    (tmp_path / "printed.toml").write_text(capsys.readouterr().out)
    shown = config.load(env)
    back = config.load({"HOME": str(tmp_path), "LIVEMIG_CONFIG": str(tmp_path / "printed.toml")})
    assert (back.options.throttle, back.options.max_bandwidth, back.options.image_root, back.options.mode) == \
        (False, 50 << 20, '/var/lib/live"mig', Mode.PRECOPY)
    assert {k: back.value(k) for k in config.SETTINGS} == {k: shown.value(k) for k in config.SETTINGS}
