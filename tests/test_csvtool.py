"""The csvtool console script, run as a subprocess: upstream byte identity, extras, bad input."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import zstandard

from helpers.csvtool import bad_inputs, expected_csv, plain, run, run_measured
from helpers.paths import ARCHIVES, FINWAIT, NDT, TESTDATA
from lab.bench.csvtool import write_archive


def rows(output: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(output.decode())))


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_default_output_is_byte_identical_to_upstream(archive: Path) -> None:
    result = run(str(archive))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_csv(archive)


def test_no_argument_reads_plain_jsonl_from_stdin_like_upstream() -> None:
    result = run(stdin=plain(FINWAIT))
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)


def test_final_line_without_newline_is_still_converted() -> None:
    result = run(stdin=plain(FINWAIT).rstrip(b"\n"))
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)


def test_dash_reads_stdin_and_detects_zstd() -> None:
    result = run("-", stdin=FINWAIT.read_bytes())
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)


def test_module_entry_point_matches_console_script(tmp_path: Path) -> None:
    # Run outside the checkout: `python -m` puts the cwd first on sys.path, and the source tree
    # of a fresh clone has no compiled core.
    result = subprocess.run([sys.executable, "-m", "tcpinfo.csvtool.cli", str(FINWAIT)],
                            capture_output=True, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)


def test_multi_frame_zstd_file_reads_across_frames(tmp_path: Path) -> None:
    data = plain(FINWAIT)
    half = data.index(b"\n", len(data) // 2) + 1
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(cctx.compress(data[:half]) + cctx.compress(data[half:]))
    assert run(str(tmp_path / "two.jsonl.zst")).stdout == expected_csv(FINWAIT)


def test_several_files_and_directories_give_one_header_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    (tmp_path / "b" / "deeper" / FINWAIT.name).symlink_to(FINWAIT)
    (tmp_path / "a.jsonl.zst").symlink_to(NDT)
    (tmp_path / "notes.txt").write_text("not an archive")
    result = run(str(tmp_path))
    assert result.returncode == 0, result.stderr
    ndt, fin = expected_csv(NDT), expected_csv(FINWAIT)
    assert result.stdout == ndt + fin.split(b"\n", 1)[1]
    assert run(str(FINWAIT), str(NDT)).stdout == fin + ndt.split(b"\n", 1)[1]


def test_modern_schema_has_uuid_correct_names_and_no_metadata_row() -> None:
    result = run("--schema", "modern", str(NDT))
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert len(table) == 891  # records only
    first = table[0]
    assert first["uuid"] == "ndt-7hhhv_1559749627_0000000000062D84"
    assert first["timestamp"] == "2019-07-01T00:00:12.092Z"
    assert (first["idm.src"], first["idm.sport"], first["idm.cookie"]) == ("63.243.240.101", "33475", str(0x62D84))
    assert (first["tcp.snd_wscale"], first["tcp.rcv_wscale"]) == ("8", "7")
    assert first["tcp.last_ack_recv"] == "8" and first["skmeminfo.sndbuf"] == "46080"
    assert first["tcp.rcv_ooopack"] == "" and first["tcp.snd_wnd"] == ""  # 224 bytes: not sent
    assert first["class_id"] == "" and first["vegas.rtt"] == ""


def test_modern_schema_shows_every_field_a_new_kernel_sent() -> None:
    archive = sorted((TESTDATA / "kernel-6.18").glob("*.jsonl.zst"))[0]
    first = rows(run("--schema", "modern", str(archive)).stdout)[0]
    for column in ("tcp.snd_wnd", "tcp.rcv_wnd", "tcp.total_rto_time", "tcp.received_ce_bytes",
                   "tcp.accecn_opt_seen", "cgroup_id", "sockopt", "class_id", "mark", "bbr.min_rtt"):
        assert first[column] != "", column


def test_json_lines_output_omits_absent_fields() -> None:
    result = run("--json", str(NDT))
    lines = result.stdout.splitlines()
    assert len(lines) == 891
    first = orjson.loads(lines[0])
    assert first["uuid"] == "ndt-7hhhv_1559749627_0000000000062D84"
    assert first["tcp.rtt"] == 172227 and first["tcp.max_pacing_rate"] == 2**64 - 1
    assert "tcp.snd_wnd" not in first and "vegas.rtt" not in first


@pytest.mark.parametrize("case", ["truncated-zstd.jsonl.zst", "corrupt-frame.jsonl.zst", "not-json.jsonl",
                                  "wrong-types.jsonl", "attribute-type.jsonl", "attribute-list.jsonl",
                                  "short-idm.jsonl",
                                  "empty-cong.jsonl", "bad-base64.jsonl", "empty-record.jsonl",
                                  "missing.jsonl.zst"])
@pytest.mark.parametrize("schema", ["upstream", "modern"])
def test_bad_input_is_one_line_error_naming_file_and_line(tmp_path: Path, case: str, schema: str) -> None:
    path, line = bad_inputs(tmp_path)[case]
    result = run("--schema", schema, str(path))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"csvtool: {path}:{line}: " if line else f"csvtool: {path}: ")


def test_skip_bad_skips_bad_lines_and_reports_the_count(tmp_path: Path) -> None:
    good = plain(FINWAIT).splitlines(keepends=True)
    data = b"".join(good[:3]) + b"nope\n" + b"".join(good[3:]) + b'{"RawIDM":"AAAA"}\n'
    (tmp_path / "mixed.jsonl").write_bytes(data)
    result = run("--skip-bad", str(tmp_path / "mixed.jsonl"))
    assert result.returncode == 0
    assert result.stderr == b"csvtool: skipped 2 bad lines\n"
    assert result.stdout == expected_csv(FINWAIT)


def test_one_million_records_convert_in_bounded_memory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TCPINFO_TESTDATA", str(TESTDATA))   # the benchmark archive's source records
    small = tmp_path / "small.jsonl.zst"
    big = tmp_path / "big.jsonl.zst"
    write_archive(small, 1_000)
    write_archive(big, 1_000_000)
    small_run, big_run = run_measured(str(small)), run_measured(str(big))
    assert small_run.returncode == big_run.returncode == 0, big_run.stderr
    assert big_run.rows == 1 + 1_000_000  # header and one row per record
    # The decompressed input is ~580 MB; a streaming converter stays within a few tens of MB of
    # what it needs for a thousand records (memo tables are capped; measured: +10 MiB).
    assert big_run.peak_rss_kib < small_run.peak_rss_kib + 32 * 1024, (small_run, big_run)


def test_a_line_spanning_many_chunks_and_a_last_line_without_newline_are_read_whole(tmp_path):
    from tcpinfo.archive import reader as archive
    long_line = b"x" * (archive.STEP * 5 + 17)
    lines = [b"first", long_line, b"", b"middle", long_line[:-5] + b"end"]
    path = tmp_path / "long.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines)))   # no final newline
    assert list(archive.read_archive(str(path), len(long_line))) == list(enumerate(lines, 1))
    plain = tmp_path / "long.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    assert list(archive.read_archive(str(plain), len(long_line))) == list(enumerate(lines, 1))
