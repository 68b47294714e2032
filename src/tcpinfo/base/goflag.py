"""Go's `flag` command-line syntax with `flagx.ArgsFromEnv`'s environment fallback, for any flag table.

Scripts and container specs written for a Go program must work unchanged on its successor, so this
reproduces that syntax exactly: `-x=v`, `-x v`, `--x`, booleans only as `-b` or `-b=value`, parsing
stops at the first non-flag or after `--`, repeated list flags accumulate and each value is split on
commas, and a flag not given on the command line is read from its environment variable (upper case,
other characters `_`).  Two deliberate differences, each an error where Go goes on with something
nobody asked for: an invalid environment value (Go's flagx ignores it silently) and a word left after
the flags (Go ignores it).  The value parsers here are Go's own (`strconv.ParseBool`, `ParseInt`,
`time.ParseDuration`); which flags a program has, and their bounds, are the program's business.
"""
from __future__ import annotations

import decimal
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MS = 1_000_000
SECOND = 1_000_000_000
MAX_DURATION_NS = 24 * 3600 * SECOND   # longer would overflow timers, and means a mistake
MAX_SIZE = 64 << 30
MAX_LIST_ITEMS = 1024


class FlagError(Exception):
    """A bad command line or environment value: the caller prints it and exits 2."""


class HelpRequested(Exception):
    """-h or -help was given: the caller prints usage() and exits 0, as Go does."""


class VersionRequested(Exception):
    """-version was given: the caller prints its name and version and exits 0."""


# ---------------------------------------------------------------------------------------------
# Value parsers.  Each takes the text and returns the value or raises ValueError(reason).

_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise ValueError("parse error") from None


_GO_INT = re.compile(r"[+-]?(0[xX][_0-9a-fA-F]+|0[oO][_0-7]+|0[bB][_01]+|0[_0-7]*|[1-9][_0-9]*)")


def parse_go_int(text: str) -> int:
    """Go's strconv.ParseInt(text, 0, 64): base prefixes, legacy leading-zero octal, underscores."""
    if not _GO_INT.fullmatch(text):
        raise ValueError("parse error")
    sign, digits = (text[0], text[1:]) if text[0] in "+-" else ("", text)
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXoObB":
        digits = "0o" + digits[1:]          # Go reads 010 as octal 8; Python needs 0o10
    try:
        value = int(sign + digits, 0)       # Python enforces Go's underscore placement rules
    except ValueError:
        raise ValueError("parse error") from None
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError("value out of range")
    return value


_DURATION_UNITS = {"ns": 1, "us": 1000, "µs": 1000, "μs": 1000, "ms": MS, "s": SECOND,
                   "m": 60 * SECOND, "h": 3600 * SECOND}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration ("10ms", "1.5s", "1h2m"), in nanoseconds; must be positive."""
    pos, total = 0, decimal.Decimal(0)
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if part is None:
            break
        total += decimal.Decimal(part[1]) * _DURATION_UNITS[part[2]]
        pos = part.end()
    if pos != len(text) or not text:
        raise ValueError('want a duration such as "10ms", "5s" or "10m"')
    if total < 1:
        raise ValueError("must be positive")
    if total > MAX_DURATION_NS:
        raise ValueError("must be at most 24h")
    return int(total)


def format_duration(ns: int) -> str:
    """Go's time.Duration.String ("10ms", "1.5s", "10m0s"), for usage, logs and Metadata."""
    def decimal_text(value: int, unit: int) -> str:
        whole, frac = divmod(value, unit)
        digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)
    if ns < SECOND:
        for unit, name in ((MS, "ms"), (1000, "µs"), (1, "ns")):
            if ns >= unit or unit == 1:
                return decimal_text(ns, unit) + name
    hours, rest = divmod(ns, 3600 * SECOND)
    minutes, rest = divmod(rest, 60 * SECOND)
    text = decimal_text(rest, SECOND) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    return f"{hours}h" + text if hours else text


_SIZE = re.compile(r"(\d+)(|KiB|MiB|GiB)")
_SIZE_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    """A positive byte count, optionally with a KiB/MiB/GiB suffix."""
    match = _SIZE.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise ValueError('want a positive size such as "65536", "256KiB" or "64MiB"')
    size = int(match[1]) * _SIZE_UNITS[match[2]]
    if size > MAX_SIZE:
        raise ValueError("must be at most 64GiB")
    return size


def format_size(size: int) -> str:
    """A size as parse_size reads it, in the largest unit that divides it."""
    for unit in ("GiB", "MiB", "KiB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def parse_mode(text: str) -> int:
    """File permissions in octal, as chmod takes them (0660, 660)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"invalid file mode {text!r}: want octal such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode {text!r} is outside 0-0777")
    return mode


def format_mode(mode: int) -> str:
    return f"{mode:04o}"


def parse_text(text: str) -> str:
    return text


def parse_count(text: str, what: str, low: int, high: int) -> int:
    """A whole number (Go integer syntax) from low to high."""
    try:
        value = parse_go_int(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} must be a whole number between {low} and {high}") from None
    if value < low:
        raise ValueError(f"{what} {text!r} must be at least {low}")
    if value > high:
        raise ValueError(f"{what} {text!r} must be between {low} and {high}")
    return value


def parse_port(text: str) -> int:
    """A TCP port 0-65535 (upstream parses signed 16-bit and cannot exclude ports >= 32768)."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(f"cannot convert port {text!r}: want 0-65535")
    return int(text)


def parse_port_range(text: str) -> tuple[int, int]:
    """A port ("443") or an inclusive range ("9000-9099")."""
    first, dash, last = text.partition("-")
    try:
        low, high = parse_port(first), parse_port(last if dash else first)
    except ValueError:
        raise ValueError(f"cannot convert port range {text!r}: want a port or first-last "
                         f"within 0-65535") from None
    if low > high:
        raise ValueError(f"port range {text!r} is empty (first > last)")
    return low, high


def parse_duration_or_zero(text: str) -> int:
    """A Go duration, or 0 ("0", "0s"), in nanoseconds: for settings where 0 means "always"."""
    if text in ("0", "0s", "0ms"):
        return 0
    return parse_duration(text)


# ---------------------------------------------------------------------------------------------
# Flags.

@dataclass(frozen=True)
class Flag:
    """One flag: its name after the dash, the attribute of the program's config it sets, and how
    its text becomes a value (`parse`) and a value becomes text again (`show`, for usage and the
    start-up log, so that what is logged can be typed back)."""
    name: str
    attr: str
    parse: Callable[[str], Any]
    usage: str
    kind: str = "value"  # "value", "bool" or "list" (repeatable, comma-split)
    metavar: str = "string"
    show: Callable[[Any], str] = str

    @property
    def env(self) -> str:
        return shell_variable_name(self.name)


def shell_variable_name(flag_name: str) -> str:
    """flagx.MakeShellVariableName: upper case, every char outside [A-Z0-9] becomes '_'."""
    name = re.sub(r"[^A-Z0-9]", "_", flag_name.upper())
    return "_" + name if name[:1].isdigit() else name


def show(flag: Flag, value: object) -> str:
    """A flag's value as the user would type it."""
    if flag.kind == "list":
        return ",".join(flag.show(v) for v in value)  # type: ignore[attr-defined]
    if flag.kind == "bool":
        return "true" if value else "false"
    return flag.show(value)


def usage(prog: str, flags: Sequence[Flag], defaults: object) -> str:
    """Go-style PrintDefaults text, plus the environment variable of each flag."""
    lines = [f"Usage of {prog}:"]
    for flag in sorted(flags, key=lambda f: f.name):
        lines.append(f"  -{flag.name}" + ("" if flag.kind == "bool" else f" {flag.metavar}"))
        value = getattr(defaults, flag.attr)
        default = f" (default {show(flag, value)})" if value else ""  # Go omits zero defaults
        lines.append(f"    \t{flag.usage}{default} [env {flag.env}]")
    lines.append("Every flag not given on the command line is read from its environment variable; "
                 "an invalid value in either is an error (exit status 2).")
    lines.append("-version prints the version and exits.")
    return "\n".join(lines) + "\n"


def quoted(value: str, limit: int = 60) -> str:
    """A value for an error message: quoted, and cut short if long (a list may be kilobytes)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _apply(config: object, flag: Flag, text: str) -> None:
    """Flag.Set: scalars overwrite, lists append each comma-separated item (blank items skipped)."""
    if flag.kind == "list":
        items = [item.strip() for item in text.split(",")]
        values = getattr(config, flag.attr)
        values.extend(flag.parse(item) for item in items if item)
        if len(values) > MAX_LIST_ITEMS:
            raise ValueError(f"at most {MAX_LIST_ITEMS} values in all")
    else:
        setattr(config, flag.attr, flag.parse(text))


def _parse_command_line(config: object, by_name: Mapping[str, Flag],
                        args: Sequence[str]) -> tuple[set[str], list[str]]:
    """Go's FlagSet.Parse: returns the names set and the words left after the flags."""
    given: set[str] = set()
    rest = list(args)
    while rest:
        arg = rest[0]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            rest.pop(0)
            break
        name = arg[2:] if arg[1] == "-" else arg[1:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {arg}")
        rest.pop(0)
        name, has_value, value = name.partition("=")
        flag = by_name.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested()
            if name == "version":
                raise VersionRequested()
            raise FlagError(f"flag provided but not defined: -{name}")
        if flag.kind == "bool" and not has_value:
            value = "true"
        elif not has_value:
            if not rest:
                raise FlagError(f"flag needs an argument: -{name}")
            value = rest.pop(0)
        try:
            _apply(config, flag, value)
        except ValueError as err:
            raise FlagError(f"invalid value {quoted(value)} for flag -{name}: {err}") from None
        given.add(name)
    return given, rest


def parse(flags: Sequence[Flag], config: object, argv: Sequence[str],
          environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Sets `config` from the arguments (without the program name), then from the environment for
    flags not given.  Returns the words left after the flags and notes for the log (environment
    values that a command-line flag overrode)."""
    given, rest = _parse_command_line(config, {f.name: f for f in flags}, argv)
    notes = []
    for flag in flags:
        if flag.env not in environ:
            continue
        if flag.name in given:
            notes.append(f"Not overriding flag -{flag.name} with environment variable {flag.env}")
            continue
        value = environ[flag.env]
        try:
            _apply(config, flag, value)
        except ValueError as err:
            raise FlagError(f"invalid value {quoted(value)} for environment variable {flag.env} "
                            f"(flag -{flag.name}): {err}") from None
    return rest, notes
