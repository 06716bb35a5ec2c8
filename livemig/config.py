"""Defaults a user or a site sets once: a TOML file, then environment variables, then flags.

Lowest to highest: livemig's built-in defaults; the file ($LIVEMIG_CONFIG, else
$XDG_CONFIG_HOME/livemig/config.toml, else ~/.config/livemig/config.toml); LIVEMIG_*
variables; the command line. Every effective value remembers where it came from, so
that `livemig config` can say why a migration behaved as it did.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import service_address
from .errors import UsageError
from .options import Mode, Options
from .wire.bandwidth import parse_rate, parse_size


def _mode(v) -> Mode:
    try:
        return Mode(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a mode ({', '.join(m.value for m in Mode)})") from None


def _positive(kind):
    def parse(v):
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            # ValueError, as every refusal of a setting: _parsed and its callers catch that
            raise ValueError(f"{v!r} is not a number")  # noqa: TRY004
        x = kind(v)
        if x <= 0:
            raise ValueError(f"{v!r} is not above 0")
        return x
    return parse


def _level(v) -> int:
    if v in ("auto", 0, "0"):
        return 0        # chosen per move (wire/compression.py)
    x = _positive(int)(v)
    if x > 19:
        raise ValueError(f"{v!r} is not a zstd level from 1 to 19, nor auto")
    return x


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{v!r} is not true or false")


def _path(v) -> str:
    if not isinstance(v, str) or not os.path.isabs(v):
        raise ValueError(f"{v!r} is not an absolute path")
    return v


def _addresses(v) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [a for a in v.replace(",", " ").split() if a]
    if not isinstance(v, (list, tuple)) or not all(isinstance(a, str) for a in v):
        raise ValueError(f"{v!r} is not a list of addresses (ADDR/PREFIX)")
    try:
        return tuple(service_address.parse(a) for a in v)
    except UsageError as e:
        raise ValueError(e.message) from None


_FLAGS = {"move_addresses": "--move-address"}      # a setting whose flag is not its name, dashed


# name in the file and on Options -> (parse, what it is)
SETTINGS = {
    "mode": (_mode, "strategy: auto, precopy, postcopy, hybrid or stopcopy"),
    "max_downtime": (_positive(float), ("seconds the workload may stand still: a promise, the move refused before the freeze "
                                    "if its downtime would be longer; unset: pre-copy aims at 0.3 s")),
    "max_rounds": (_positive(int), "pre-copy rounds at most"),
    "throttle": (_bool, "auto-converge: slow the workload's CPU when pre-copy does not converge"),
    "fill": (_bool, "stop-and-copy: the pages into the target's memory, placed while the copy runs"),
    "write_protect": (_bool, ("without soft-dirty, pre-copy tracks writes by userfaultfd write-protection "
                              "(a system call run in each process); false: by page hashes")),
    "replay": (_bool, ("with tcp_established: what clients send while the workload is frozen is given to the copy "
                       "that runs next; false: left to their retransmissions")),
    "compression_level": (_level, ("zstd level of everything on the wire, 1 to 19; auto (0): chosen per move from "
                                   "the link's rate and the source CPU's")),
    "max_bandwidth": (parse_rate, ("bytes a second one move sends at most, over all its streams "
                                   "(K, M, G: powers of 1024; e.g. \"50M\"); unset: no cap")),
    "trial": (_bool, ("a trial restore on the target before the freeze (a process tree's or a runc container's images "
                      "without its pages, thrown away); the workload stands still some 100 ms per GiB for it")),
    "image_root": (_path, "where the private image directories live, on both hosts"),
    "carry_files_max": (parse_size, ("bytes of a process tree's files the target lacks (a log, a pid file) carried "
                                     "over while it is frozen, all together; more refuse the move (K, M, G)")),
    "move_addresses": (_addresses, ("service addresses (ADDR/PREFIX) that move with every workload moved: a list, "
                                    "or in the variable, separated by commas")),
    "bootstrap": (_bool, ("the target runs this livemig, brought over ssh where it is not there yet; false: the "
                          "livemig installed there")),
    "connect_timeout": (_positive(float), "seconds to reach a host over SSH"),
    "reconnect_timeout": (_positive(float), ("seconds to reach the target again once the link broke while "
                                             "its copy runs, before that copy is given up")),
}


def toml_value(v: bool | float | str | tuple[str, ...]) -> str:
    """v as TOML writes it: `livemig config`'s output is a config file (Python's spelling
    of True, or of a string with a quote in it, is not)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, tuple):
        return json.dumps(list(v))     # an array of strings is written alike in both
    return json.dumps(v)     # a JSON string, \uXXXX escapes and all, is a TOML basic string


def as_toml(cfg: Config, path: Path) -> str:
    """The effective settings as a config file that loads back to them, each with where it
    came from and what it is; an unset one as a comment."""
    lines = [f"# {path}" + ("" if cfg.file else " (not present)") + "; LIVEMIG_<NAME> overrides it; "
             "flags override both"]
    for k, (_, what) in SETTINGS.items():
        v = cfg.value(k)
        setting = f"# {k} unset" if v is None else f"{k} = {toml_value(v)}"
        lines.append(setting.ljust(40) + f"# {cfg.sources[k]}: {what}")
    return "\n".join(lines)


def env_name(name: str) -> str:
    return "LIVEMIG_" + name.upper()


@dataclass(frozen=True)
class Config:
    """The effective defaults, and where each came from ("default", a file, a variable, "flag")."""
    options: Options = field(default_factory=Options)
    sources: dict[str, str] = field(default_factory=lambda: dict.fromkeys(SETTINGS, "default"))
    file: Path | None = None     # the file read, if any

    def value(self, name: str):
        v = getattr(self.options, name)
        return v.value if isinstance(v, Mode) else v

    def with_flags(self, **flags) -> Config:
        """Flags given on the command line win; None means not given."""
        given = {k: _parsed(k, v, _FLAGS.get(k, "--" + k.replace("_", "-"))) for k, v in flags.items() if v is not None}
        return Config(replace(self.options, **given), {**self.sources, **dict.fromkeys(given, "flag")}, self.file)


def default_path(env=os.environ) -> Path:
    if env.get("LIVEMIG_CONFIG"):
        return Path(env["LIVEMIG_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME", "/root"), ".config")
    return Path(base) / "livemig" / "config.toml"


def load(env=os.environ) -> Config:
    """Built-in defaults, then the file, then the environment. UsageError names what is wrong."""
    path = default_path(env)
    values, sources, read = {}, dict.fromkeys(SETTINGS, "default"), None
    try:
        text = path.read_text()
    except FileNotFoundError:
        if env.get("LIVEMIG_CONFIG"):
            raise UsageError(f"config file {path} (LIVEMIG_CONFIG) does not exist") from None
        text = None
    except OSError as e:
        raise UsageError(f"cannot read the config file {path}: {e.strerror}") from None
    if text is not None:
        read = path
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {path}: {e}") from None
        for k, v in table.items():
            if k not in SETTINGS:
                raise UsageError(f"config file {path}: unknown setting {k!r} (known: {', '.join(SETTINGS)})")
            values[k], sources[k] = _parsed(k, v, f"{k} in {path}"), str(path)
    for k in SETTINGS:
        if env.get(env_name(k)):
            values[k], sources[k] = _parsed(k, env[env_name(k)], env_name(k)), env_name(k)
    return Config(replace(Options(), **values), sources, read)


def _parsed(name: str, value, where: str):
    try:
        return SETTINGS[name][0](value)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None
