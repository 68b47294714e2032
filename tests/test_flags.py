"""tcp-info's flags: upstream's Go syntax and env fallback, but invalid values are fatal."""
import os
import subprocess

import pytest

from helpers.paths import script
from tcpinfo.base import goflag
from tcpinfo.collector import flags
from tcpinfo.collector.flags import FlagError, HelpRequested, parse


def test_go_syntax_single_and_double_dash_with_equals_or_separate_value():
    config = parse(["-output=/a", "--reps", "7", "--anonymize.ip=netblock",
                    "-tcpinfo.eventsocket", "/s"], {})
    assert (config.output, config.reps, config.anonymize_ip, config.eventsocket) == \
        ("/a", 7, "netblock", "/s")


def test_bool_flags_take_no_separate_value_so_the_next_word_is_an_error_not_ignored():
    # Go would ignore "true -reps=3" and run forever; a stray word is a mistake to report.
    with pytest.raises(FlagError, match="unexpected argument 'true': tcp-info takes only flags"):
        parse(["-trace", "true", "-reps=3"], {})
    assert parse(["-trace=false"], {}).trace is False
    assert parse(["-exclude-local=F"], {}).exclude_local is False


def test_double_dash_ends_flags_and_nothing_may_follow_it():
    assert parse(["-reps=2", "--"], {}).reps == 2
    with pytest.raises(FlagError, match="unexpected argument '-reps=3'"):
        parse(["--", "-reps=3"], {})


def test_list_flags_repeat_and_split_on_commas():
    config = parse(["-exclude-srcport=9100,9990", "-exclude-srcport", "65535",
                    "-exclude-dstip=10.0.0.1,::ffff:10.0.0.2", "-exclude-dstip", "fd00::1"], {})
    assert config.exclude_srcport == [9100, 9990, 65535]
    assert config.exclude_dstip == ["10.0.0.1", "::ffff:a00:2", "fd00::1"]


def test_include_lists_take_prefixes_and_port_ranges_and_budget_takes_a_share_or_percent():
    config = parse(["-include-ip=198.18.0.5/15,fd00::/8", "-include-ip", "::ffff:10.1.2.3/120",
                    "-include-port=443,9000-9099", "-cpu-budget=25%"], {})
    assert config.include_ip == ["198.18.0.0/15", "fd00::/8", "10.1.2.0/24"]
    assert config.include_port == [(443, 443), (9000, 9099)]
    assert config.cpu_budget == 0.25 and parse(["-cpu-budget=1.5"], {}).cpu_budget == 1.5
    assert "include-port=443,9000-9099" in config.arguments
    defaults = parse([], {})
    assert defaults.destroy_events and defaults.kernel_filter and defaults.cpu_budget == 0
    assert defaults.dump_threads == 0 == parse(["-dump-threads=auto"], {}).dump_threads   # auto
    assert parse(["-dump-threads", "2"], {}).dump_threads == 2


@pytest.mark.parametrize("text,value", [("010", 8), ("0x10", 16), ("0o17", 15), ("0b101", 5),
                                        ("1_000", 1000), ("+5", 5), ("0", 0)])
def test_reps_parses_like_go_base_zero(text, value):
    assert parse([f"-reps={text}"], {}).reps == value


@pytest.mark.parametrize("argv,message", [
    (["-reps=08"], "invalid value '08' for flag -reps"),
    (["-reps=1__0"], "invalid value '1__0' for flag -reps"),
    (["-reps= 5"], "invalid value ' 5' for flag -reps"),
    (["-reps=-1"], "invalid value '-1' for flag -reps"),
    (["-trace=yes"], "invalid value 'yes' for flag -trace"),
    (["-exclude-srcport=65536"], "cannot convert port '65536'"),
    (["-exclude-srcport=-1"], "cannot convert port '-1'"),
    (["-exclude-dstip=10.0.0.256"], "cannot convert ip '10.0.0.256'"),
    (["-anonymize.ip=bogus"], "unknown anonymization method 'bogus'"),
    (["-poll-interval=10"], "invalid value '10' for flag -poll-interval"),
    (["-flush-size=0"], "invalid value '0' for flag -flush-size"),
    (["-flush-size=2MiB"], "want -flush-size <= -conn-buffer-limit <= -buffer-limit"),
    (["-prometheusx.listen-address=9990"], "bad listen address '9990'"),
    (["-include-ip=10.0.0.0/33"], "cannot convert network '10.0.0.0/33'"),
    (["-include-port=443-80"], "port range '443-80' is empty"),
    (["-include-port=70000"], "cannot convert port range '70000'"),
    (["-cpu-budget=lots"], "cannot convert CPU budget 'lots'"),
    (["-cpu-budget=-0.5"], "must be between 0 .none. and 64 CPUs"),
    (["-destroy-events=maybe"], "invalid value 'maybe' for flag -destroy-events"),
    (["-dump-threads=0"], "dump threads '0' must be auto or between 1 and 16"),
    (["-dump-threads=many"], "many"),
    (["-strict=sometimes"], "invalid value 'sometimes' for flag -strict"),
    (["-sweep-interval=0"], "invalid value '0' for flag -sweep-interval"),
    (["-active-linger=soon"], "invalid value 'soon' for flag -active-linger"),
    (["-uuid-prefix-file=/nonexistent/prefix"], "No such file or directory"),
    (["-nosuch"], "flag provided but not defined: -nosuch"),
    (["-reps"], "flag needs an argument: -reps"),
    (["---reps=1"], "bad flag syntax: ---reps=1"),
])
def test_invalid_command_line_values_are_errors(argv, message):
    with pytest.raises(FlagError, match=message.replace("(", r"\(")):
        parse(argv, {})


def test_environment_fills_flags_not_given_using_upstreams_variable_names():
    config = parse(["-reps=2"], {"REPS": "9", "OUTPUT": "/o", "EXCLUDE_SRCPORT": "1,2",
                                 "PROMETHEUSX_LISTEN_ADDRESS": ":0", "TCPINFO_EVENTSOCKET": "/e",
                                 "POLL_INTERVAL": "1.5ms", "TRACE": "1"})
    assert (config.reps, config.output, config.exclude_srcport, config.listen_address,
            config.eventsocket, config.poll_interval_ns, config.trace) == \
        (2, "/o", [1, 2], ":0", "/e", 1_500_000, True)
    assert "Not overriding flag -reps with environment variable REPS" in config.notes


@pytest.mark.parametrize("env,message", [
    ({"ANONYMIZE_IP": "bogus"}, "environment variable ANONYMIZE_IP"),
    ({"REPS": "ten"}, "environment variable REPS"),
    ({"UUID_PREFIX_FILE": "/nonexistent"}, "-uuid-prefix-file"),
    ({"EXCLUDE_DSTIP": "localhost"}, "environment variable EXCLUDE_DSTIP"),
])
def test_invalid_environment_values_are_errors_not_silently_ignored(env, message):
    with pytest.raises(FlagError, match=message):
        parse([], env)


def test_uuid_prefix_file_is_taken_verbatim(tmp_path):
    path = tmp_path / "prefix"
    path.write_bytes("mlab1-abc01_1553815964 é".encode())
    assert parse([f"-uuid-prefix-file={path}"], {}).uuid_prefix == "mlab1-abc01_1553815964 é"


@pytest.mark.parametrize("content,message", [
    (b"../../etc/host", "contains '/'"),
    (b"mlab1-abc01_1553815964\n", r"contains '\\n'.*without a final newline"),
    (b"a\tb", r"contains '\\t'"),
    (b"x" * 201, "longer than 200 bytes"),
    (b"\xff", "not UTF-8"),
])
def test_a_uuid_prefix_that_cannot_start_a_file_name_is_refused(tmp_path, content, message):
    path = tmp_path / "prefix"
    path.write_bytes(content)
    with pytest.raises(FlagError, match=message):
        parse([f"-uuid-prefix-file={path}"], {})


def test_a_uuid_prefix_file_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)   # nobody writes: a blocking open would never return
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(FlagError, match="not a regular file|Is a directory"):
            parse([f"-uuid-prefix-file={path}"], {})


@pytest.mark.parametrize("argv,message", [
    (["-poll-interval=10000000h"], "must be at most 24h"),
    (["-rotate-interval=25h"], "must be at most 24h"),
    (["-buffer-limit=65GiB"], "must be at most 64GiB"),
    (["-tcpinfo.eventsocket-queue=1000001"], "between 1 and 1000000"),
    (["-tcpinfo.eventsocket=/" + "s" * 107], "at most 107 bytes"),
    (["-exclude-dstip=" + ",".join(f"10.0.{i // 250}.{i % 250}" for i in range(1025))],
     r"at most 1024 values in all"),
    (["-exclude-srcport=1"] * 1025, r"at most 1024 values in all"),
])
def test_values_beyond_sane_bounds_are_refused_with_the_limit(argv, message):
    with pytest.raises(FlagError, match=message) as caught:
        parse(argv, {})
    assert len(str(caught.value)) < 300   # a long value is cut short in the message


@pytest.mark.parametrize("argv,message", [
    (["-health.labels=peer"], "unknown health label 'peer'"),
    (["-health.labels=service"], "no -health.service names a port range"),
    (["-health.service=https=443"], "-health.service is given but -health.labels has no service"),
    (["-health.max-groups=0"], "must be at least 1"),
    (["-health.sample-interval=-1s"], "want a duration"),
    (["-health.bucket-range=rtt=2:1"], "0 < low < high"),
    (["-remote-write.url=ftp://prometheus/api/v1/write"], "bad remote-write URL"),
    (["-remote-write.url=http://p:9090/w", "-remote-write.interval=2h"], "between 1s and 1h"),
    (["-remote-write.url=http://p:9090/w", "-remote-write.interval=10s",
      "-remote-write.max-age=5s"], "max-age must be at least"),
])
def test_health_and_remote_write_settings_that_cannot_work_are_refused(argv, message):
    with pytest.raises(FlagError, match=message):
        parse(argv, {})


def test_health_and_remote_write_settings_reach_their_configs():
    config = parse(["-health.labels=service,cc", "-health.service=https=443,web=8000-8099",
                    "-health.sample-interval=0", "-remote-write.url=http://p:9090/api/v1/write",
                    "-remote-write.instance=edge-1"], {})
    health = config.health_config()
    assert health.labels == ("service", "cc") and health.sample_interval_ns == 0
    assert [(s.name, s.first, s.last) for s in health.services] == [("https", 443, 443),
                                                                    ("web", 8000, 8099)]
    push = config.remote_write_config()
    assert push is not None and (push.url, push.instance, push.job) == \
        ("http://p:9090/api/v1/write", "edge-1", "tcp-info")
    assert parse([], {}).remote_write_config() is None and parse([], {}).health


def test_the_tiers_default_to_100ms_sweeps_and_a_1s_linger_and_strict_mode_is_one_flag():
    config = parse([], {})
    assert (config.strict, config.sweep_interval_ns, config.active_linger_ns) == \
        (False, 100_000_000, 1_000_000_000)
    config = parse(["-strict", "-sweep-interval=250ms"], {"ACTIVE_LINGER": "3s"})
    assert (config.strict, config.sweep_interval_ns, config.active_linger_ns) == \
        (True, 250_000_000, 3_000_000_000)
    assert "strict mode" in flags.usage().lower()


def test_every_logged_argument_is_a_value_the_flag_accepts_back():
    logged = parse(["-exclude-dstip=10.0.0.1", "-include-port=443,9000-9099",
                    "-cpu-budget=25%"], {}).arguments
    assert "dump-threads=auto" in logged
    for argument in logged:
        name, _, value = argument.partition("=")
        if name == "uuid-prefix-file":
            continue   # empty: no file
        again = parse([f"-{name}={value}"], {})
        flag = next(f for f in flags.FLAGS if f.name == name)
        assert f"{name}={goflag.show(flag, getattr(again, flag.attr))}" == argument


NASTY = ["", " ", "-1", "0", "1e400", "nan", "inf", "0x", "99999999999999999999999999",
         "10000000h", "1.5.5", "x" * 5000, "\n", ",", ",,,", "-", "=", "🙂", "0777777",
         "::", "[::]:99999", "1-0", "auto", "100%", "1_0", "\udcff"]


@pytest.mark.parametrize("flag", flags.FLAGS, ids=lambda f: f.name)
def test_no_value_of_any_flag_or_variable_escapes_as_anything_but_a_flag_error(flag):
    for value in NASTY:
        for argv, env in (([f"-{flag.name}={value}"], {}), ([], {flag.env: value})):
            try:
                parse(argv, env)
            except FlagError as err:   # the one way out, and it names the flag or variable
                assert flag.name in str(err) or flag.env in str(err), err


def test_shell_variable_names_follow_flagx():
    assert goflag.shell_variable_name("prometheusx.listen-address") == \
        "PROMETHEUSX_LISTEN_ADDRESS"
    assert goflag.shell_variable_name("9lives") == "_9LIVES"


def test_durations_parse_and_print_like_go():
    assert goflag.parse_duration("1h2m3.5s") == 3723_500_000_000
    assert goflag.parse_duration(".5ms") == 500_000
    assert [goflag.format_duration(ns) for ns in (10_000_000, 1_500, 600 * 10**9, 90 * 10**9)] == \
        ["10ms", "1.5µs", "10m0s", "1m30s"]


def test_help_is_requested_by_h_and_lists_every_flag_with_its_variable():
    with pytest.raises(HelpRequested):
        parse(["-h"], {})
    text = flags.usage()
    for flag in flags.FLAGS:
        assert f"  -{flag.name}" in text and f"[env {flag.env}]" in text
    assert "trace.pstats" in text


@pytest.mark.parametrize("argv,env", [(["-reps=x"], {}), ([], {"ANONYMIZE_IP": "bogus"}),
                                      (["-undefined"], {})])
def test_the_daemon_exits_2_with_a_one_line_message(argv, env):
    proc = subprocess.run([script("tcp-info"), *argv], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "tcp-info: " in proc.stderr


def test_the_daemon_prints_usage_and_exits_0_for_help():
    proc = subprocess.run([script("tcp-info"), "-help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr.startswith("Usage of tcp-info:")


def run_daemon(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([script("tcp-info"), "-prometheusx.listen-address=", "-reps=1", *argv],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def test_an_event_socket_in_a_missing_directory_names_the_flag_and_the_directory(tmp_path):
    sock = tmp_path / "missing" / "events.sock"
    proc = run_daemon(f"-output={tmp_path / 'out'}", f"-tcpinfo.eventsocket={sock}")
    assert proc.returncode == 1
    assert (f"Cannot start: -tcpinfo.eventsocket '{sock}': directory "
            f"'{tmp_path / 'missing'}' does not exist") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_output_that_is_a_file_is_named_as_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_daemon(f"-output={tmp_path / 'file'}")
    assert proc.returncode == 1
    assert f"Cannot start: -output '{tmp_path / 'file'}' is not a directory" in proc.stderr


@pytest.mark.parametrize("argv,env,message", [
    (["stray"], {}, "unexpected argument 'stray'"),
    ([], {"POLL_INTERVAL": "10000000h"}, "must be at most 24h"),
    (["-exclude-dstip=" + ",".join(f"10.0.{i // 250}.{i % 250}" for i in range(1025))], {},
     "at most 1024 values"),
    (["-uuid-prefix-file=/dev/zero"], {}, "not a regular file"),
])
def test_the_daemon_refuses_unbounded_or_stray_input_in_one_line_with_exit_2(argv, env, message):
    proc = run_daemon(*argv, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
