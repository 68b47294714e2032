"""Reading any archive takes bounded memory: zstd output a batch of blocks at a time, lines no
longer than --max-line-bytes; truncation, corruption, skippable frames and every split point of
the input still handled exactly."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from helpers.csvtool import MeasuredRun, expected_csv, plain, run, run_measured
from helpers.paths import ARCHIVES, FINWAIT
from tcpinfo.archive import reader as archive
from tcpinfo.archive.reader import ArchiveError, iter_text, read_archive

MB = 1024  # ru_maxrss is in KiB
RSS_BOUND_KIB = 100 * MB


# --- zstd frames built by hand (RFC 8878), so each block type is certainly present -----------

MAGIC = archive.ZSTD_MAGIC.to_bytes(4, "little")
HEADER = MAGIC + bytes((0x00, 0x38))
"""Descriptor 0 (no content size, checksum or dictionary), window descriptor 0x38 (128 KiB)."""


def block(kind: int, size: int, payload: bytes, last: bool = False) -> bytes:
    return (last | kind << 1 | size << 3).to_bytes(3, "little") + payload


def raw(data: bytes, last: bool = False) -> bytes:
    return block(0, len(data), data, last)


def rle(byte: bytes, count: int, last: bool = False) -> bytes:
    return block(1, count, byte, last)


def skippable(data: bytes, nibble: int = 0) -> bytes:
    return (archive.SKIPPABLE_MAGIC + nibble).to_bytes(4, "little") + len(data).to_bytes(4, "little") + data


def lines_of(stream: BinaryIO, max_line_bytes: int = archive.MAX_LINE_BYTES) -> list:
    """(line number, line or None) per line, from ``iter_text``'s blocks."""
    out: list = []
    for first, text, _ in iter_text(stream, "test", max_line_bytes):
        if text is None:
            out.append((first, None))
        else:
            out.extend(enumerate(text.split(b"\n")[:-1], first))
    return out


def numbered(lines: list) -> list:
    return list(enumerate(lines, 1))


def mixed_stream() -> tuple[bytes, list[bytes], list[int]]:
    """Skippable frames, compressed frames with and without checksum and content size, and a
    hand-built frame of raw and RLE blocks; returns (data, its lines, offsets where a frame ends)."""
    text = plain(FINWAIT)
    half = text.index(b"\n", len(text) // 2) + 1
    parts = [
        skippable(b"pzstd-like index"),
        zstandard.ZstdCompressor(write_checksum=True).compress(text[:half]),
        skippable(b"", 0xF),
        HEADER + raw(b"raw line\n") + rle(b"r", 70_000) + raw(b"\n") + rle(b"\n", 3) + raw(b"end\n", last=True),
        zstandard.ZstdCompressor(write_content_size=False).compress(text[half:]),
    ]
    ends, pos = [], 0
    for part in parts:
        pos += len(part)
        ends.append(pos)
    lines = (text[:half] + b"raw line\n" + b"r" * 70_000 + b"\n\n\n\nend\n" + text[half:]).splitlines()
    return b"".join(parts), lines, ends


# --- the zstd walker -------------------------------------------------------------------------

@pytest.mark.parametrize("read_size", [1, 2, 3, 5, 7, 4096, archive.READ])
@pytest.mark.parametrize("step", [1, 100_000, archive.STEP])
def test_frames_split_across_reads_at_every_point_decode_exactly(monkeypatch, read_size: int,
                                                                 step: int) -> None:
    monkeypatch.setattr(archive, "READ", read_size)
    monkeypatch.setattr(archive, "STEP", step)  # 1: every block is its own batch
    data, lines, _ = mixed_stream()
    assert lines_of(io.BytesIO(data)) == numbered(lines)


def test_batches_are_bounded_even_for_blocks_that_regenerate_nothing(monkeypatch) -> None:
    monkeypatch.setattr(archive, "STEP", 3000)
    empties = HEADER + raw(b"") * 100_000 + rle(b"x", 10) * 1000 + raw(b"\n", last=True)
    batches = [bytes(batch) for batch in archive._frame_batches(archive._Input(io.BytesIO(empties), b""))]
    assert b"".join(batches) == empties and max(map(len, batches)) <= 3000 + len(HEADER)
    assert lines_of(io.BytesIO(empties)) == [(1, b"x" * 10_000)]


def test_a_file_starting_with_a_skippable_frame_is_read_as_zstd(tmp_path: Path) -> None:
    path = tmp_path / "pzstd.jsonl.zst"
    path.write_bytes(skippable(bytes(12)) + FINWAIT.read_bytes())
    result = run(str(path))
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)


@pytest.mark.parametrize("archive_path", ARCHIVES, ids=lambda p: p.name)
def test_every_test_data_archive_reads_as_libzstd_decodes_it(archive_path: Path) -> None:
    with open(archive_path, "rb") as stream:
        assert lines_of(stream) == numbered(plain(archive_path).splitlines())


def test_every_cut_of_a_multi_frame_file_is_reported_unless_it_falls_between_frames() -> None:
    data, lines, ends = mixed_stream()
    for cut in range(4, len(data)):  # 1-3 bytes cannot be told from plain text
        got: list = []
        try:
            for first, text, _ in iter_text(io.BytesIO(data[:cut]), "cut.zst"):
                got.extend(enumerate(text.split(b"\n")[:-1], first))
        except ArchiveError as exc:
            assert cut not in ends, (cut, exc)
            assert "truncated" in exc.message, (cut, exc)
            assert exc.line == len(got) + 1, (cut, exc)   # names the line it was reading
        else:
            assert cut in ends, cut
        assert got == numbered(lines)[:len(got)], cut   # whatever came out is right


@pytest.mark.parametrize("name, data, message", [
    ("truncated-header", HEADER[:5], "truncated"),
    ("truncated-block", HEADER + raw(b"a\n") + raw(b"half a block", last=True)[:8], "truncated"),
    ("truncated-rle", HEADER + rle(b"x", 5, last=True)[:3], "truncated"),
    ("truncated-checksum", zstandard.ZstdCompressor(write_checksum=True).compress(b"a\nb\n")[:-2], "truncated"),
    ("truncated-skippable", HEADER + raw(b"a\n", last=True) + skippable(b"0123456789")[:-3], "truncated"),
    ("trailing-garbage", HEADER + raw(b"a\n", last=True) + b"garbage!", "not a zstd frame"),
    ("reserved-block-type", HEADER + block(3, 4, b"abcd", last=True), "reserved block type"),
    ("bad-checksum", zstandard.ZstdCompressor(write_checksum=True).compress(b"a\nb\n")[:-1] + b"?", "checksum"),
])
def test_broken_zstd_is_one_error_naming_file_and_line(tmp_path: Path, name: str, data: bytes,
                                                       message: str) -> None:
    path = tmp_path / f"{name}.jsonl.zst"
    path.write_bytes(data)
    with pytest.raises(ArchiveError) as caught:
        list(read_archive(str(path)))
    assert caught.value.name == str(path) and caught.value.line >= 1
    assert message in caught.value.message.lower()
    result = run(str(path))
    assert result.returncode == 1 and result.stderr.decode().startswith(f"csvtool: {path}:")


def test_empty_file_and_plain_jsonl_read_as_before(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(read_archive(str(tmp_path / "empty.jsonl"))) == []
    (tmp_path / "plain.jsonl").write_bytes(plain(FINWAIT))
    assert list(read_archive(str(tmp_path / "plain.jsonl"))) == numbered(plain(FINWAIT).splitlines())


# --- line length -----------------------------------------------------------------------------

LIMIT = 64


def test_lines_longer_than_the_limit_are_reported_in_place_at_every_split(monkeypatch) -> None:
    lengths = [0, 1, 32, 33, 34, 63, 64, 65, 66, 128, 129, 130, 1000, 5000]
    rng = random.Random(7)
    lines = [bytes([97 + i % 26]) * rng.choice(lengths) for i in range(400)]
    text = b"\n".join(lines)  # the last line has no newline
    expected = numbered([line if len(line) <= LIMIT else None for line in lines])
    cctx = zstandard.ZstdCompressor()
    frames = b"".join(cctx.compress(text[i:i + 3000]) for i in range(0, len(text), 3000))
    for step in (1, 7, LIMIT, LIMIT + 1, 4096, archive.STEP):
        monkeypatch.setattr(archive, "STEP", step)
        assert lines_of(io.BytesIO(text), LIMIT) == expected, step
        assert lines_of(io.BytesIO(frames), LIMIT) == expected, step


def test_a_line_of_exactly_max_line_bytes_converts_and_one_more_byte_is_bad_input(tmp_path: Path) -> None:
    good = plain(FINWAIT).splitlines(keepends=True)
    # JSON allows trailing spaces: a real record padded to exactly the limit
    padded = good[3].rstrip(b"\n") + b" " * (archive.MAX_LINE_BYTES - len(good[3]) + 1)
    assert len(padded) == archive.MAX_LINE_BYTES
    path = tmp_path / "padded.jsonl"
    path.write_bytes(b"".join(good[:3]) + padded + b"\n" + b"".join(good[4:]))
    result = run(str(path))
    assert result.returncode == 0 and result.stdout == expected_csv(FINWAIT)
    path.write_bytes(b"".join(good[:3]) + padded + b" \n" + b"".join(good[4:]))
    result = run(str(path))
    assert result.returncode == 1
    assert result.stderr.decode() == (
        f"csvtool: {path}:4: line longer than {archive.MAX_LINE_BYTES} bytes (--max-line-bytes)\n")


@pytest.mark.parametrize("schema", [[], ["--schema", "modern"], ["--json"]], ids=["upstream", "modern", "json"])
def test_max_line_bytes_flag_sets_the_limit_and_skip_bad_skips_the_long_line(tmp_path: Path, schema) -> None:
    good = plain(FINWAIT).splitlines(keepends=True)
    path = tmp_path / "long-line.jsonl"
    path.write_bytes(b"".join(good[:3]) + b'{"x":"' + b"x" * 5000 + b'"}\n' + b"".join(good[3:]))
    result = run(*schema, "--max-line-bytes", "4096", str(path))
    assert result.returncode == 1
    assert result.stderr.decode() == f"csvtool: {path}:4: line longer than 4096 bytes (--max-line-bytes)\n"
    skipped = run(*schema, "--max-line-bytes", "4096", "--skip-bad", str(path))
    assert skipped.returncode == 0 and skipped.stderr == b"csvtool: skipped 1 bad line\n"
    assert skipped.stdout == run(*schema, str(FINWAIT)).stdout


@pytest.mark.parametrize("value", ["0", "-5", "lots"])
def test_max_line_bytes_must_be_a_positive_integer(value: str) -> None:
    result = run("--max-line-bytes", value, str(FINWAIT))
    assert result.returncode == 2 and b"--max-line-bytes" in result.stderr and value.encode() in result.stderr


# --- peak RSS of the real process ------------------------------------------------------------

def single_frame_archive(path: Path, size: int) -> int:
    """An upstream archive's header, then its records repeated to ``size`` bytes, through ONE zstd
    stream (what upstream's per-connection zstd process writes on a long flow), written streaming.
    Returns the number of data records."""
    header, body = plain(FINWAIT).split(b"\n", 1)
    repeats = size // len(body)
    with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as out:
        out.write(header + b"\n")
        for _ in range(repeats):
            out.write(body)
    return repeats * body.count(b"\n")


def test_a_small_single_frame_file_bigger_than_the_bound_converts_in_under_100_mb_in_every_schema(
        tmp_path: Path) -> None:
    gigabyte, big = tmp_path / "1GB.jsonl.zst", tmp_path / "110MB.jsonl.zst"
    records = single_frame_archive(gigabyte, 1_000_000_000), single_frame_archive(big, 110_000_000)
    assert gigabyte.stat().st_size < 200_000
    # The Python converters of the modern schema and JSON do ~25-35k rows/s, so they get 110 MB
    # (more than the bound: a reader holding a frame's output fails; the 1 GB case was measured
    # by hand); the three run side by side.
    runs = [MeasuredRun(str(gigabyte)), MeasuredRun("--schema", "modern", str(big)),
            MeasuredRun("--json", str(big))]
    upstream, modern, json_lines = (run.result(timeout=300) for run in runs)
    for result in upstream, modern, json_lines:
        assert result.returncode == 0, result.stderr
        assert result.peak_rss_kib < RSS_BOUND_KIB, result
    assert upstream.rows == 2 + records[0]  # header, metadata row, records
    assert modern.rows == 1 + records[1] and json_lines.rows == records[1]


def sparse_line_file(path: Path, before: list[bytes], size: int, after: list[bytes]) -> None:
    """Lines ``before``, one line of ``size`` NUL bytes (a hole: no disk), then ``after``."""
    with open(path, "wb") as fh:
        fh.write(b"".join(before))
        fh.seek(size, io.SEEK_CUR)
        fh.write(b"\n" + b"".join(after))


def test_a_200_mb_line_is_bad_input_in_bounded_memory_and_skip_bad_continues_after_it(tmp_path: Path) -> None:
    good = plain(FINWAIT).splitlines(keepends=True)
    path = tmp_path / "huge-line.jsonl"
    sparse_line_file(path, good[:10], 200_000_000, good[10:])
    failed = run_measured(str(path))
    assert failed.returncode == 1 and failed.stderr == (
        f"csvtool: {path}:11: line longer than {archive.MAX_LINE_BYTES} bytes (--max-line-bytes)\n")
    assert failed.peak_rss_kib < RSS_BOUND_KIB, failed
    skipped = run_measured("--skip-bad", str(path))
    assert skipped.returncode == 0 and skipped.stderr == "csvtool: skipped 1 bad line\n"
    assert skipped.rows == expected_csv(FINWAIT).count(b"\n")
    assert skipped.peak_rss_kib < RSS_BOUND_KIB, skipped


def test_a_200_mb_line_without_newline_is_bad_input_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "no-newline.jsonl"
    with open(path, "wb") as fh:
        fh.truncate(200_000_000)
    result = run_measured(str(path))
    assert result.returncode == 1 and result.stderr.startswith(f"csvtool: {path}:1: line longer than")
    assert result.peak_rss_kib < RSS_BOUND_KIB, result


@pytest.mark.parametrize("args, stdin, name", [(["/dev/zero"], os.devnull, "/dev/zero"),
                                               ([], "/dev/zero", "<stdin>")], ids=["argument", "stdin"])
def test_dev_zero_ends_with_the_line_length_error_in_bounded_memory(args: list[str], stdin: str, name: str) -> None:
    result = run_measured(*args, stdin=stdin, timeout=30)
    assert result.returncode == 1 and result.stderr == (
        f"csvtool: {name}:1: line longer than {archive.MAX_LINE_BYTES} bytes (--max-line-bytes)\n")
    assert result.peak_rss_kib < RSS_BOUND_KIB, result


def test_a_small_zstd_file_of_4_gib_of_zeros_is_bad_input_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "zeros.jsonl.zst"
    zeros = bytes(1 << 20)
    with open(path, "wb") as fh, zstandard.ZstdCompressor().stream_writer(fh) as out:
        for _ in range(4096):
            out.write(zeros)
    assert path.stat().st_size < 140_000
    result = run_measured(str(path))
    assert result.returncode == 1 and result.stderr.startswith(f"csvtool: {path}:1: line longer than")
    assert result.peak_rss_kib < RSS_BOUND_KIB, result
    skipped = run_measured("--skip-bad", str(path))  # decompresses all 4 GiB, holding none of it
    assert skipped.returncode == 0 and skipped.stderr == "csvtool: skipped 1 bad line\n"
    assert skipped.peak_rss_kib < RSS_BOUND_KIB, skipped
