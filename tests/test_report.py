"""tcpinfo report: the page renders in headless Chromium (plots drawn, no console errors), from
test-data archives and, found by UUID, from archives the real collector writes; its summary
line is tcpinfo summary's."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import orjson

from helpers.chromium import render, require_chromium
from helpers.extra import assert_missing_module_is_one_line
from helpers.paths import FINWAIT, NDT, script

TCPINFO = script("tcpinfo")
AXES_PER_CONNECTION = 5
"""RTT, cwnd, delivery rate, bytes, and the limitation bar."""
PAGE_FACTS = (
    "document.querySelectorAll('section').length",
    "document.querySelectorAll('section svg g[id^=\"axes_\"]').length",
    # each figure's box on the page: [x, y, width, height]
    "[...document.querySelectorAll('section svg')].map(s => {const r = s.getBoundingClientRect();"
    " return [r.x, r.y, r.width, r.height];})",
    "document.querySelectorAll('[src], link[href]:not([href^=\"data:\"])').length",
)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TCPINFO, *args], capture_output=True, timeout=300)


def report(page: Path, *args: str) -> str:
    result = run("report", "-o", str(page), *args)
    assert result.returncode == 0, result.stderr
    return page.read_text()


def pixels(png: bytes):
    """The screenshot as an H x W x 3 array of 0-1 floats."""
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]


def assert_renders_plots(page: Path, connections: int) -> None:
    """Chromium shows ``connections`` sections, each with its five plot areas drawn, and logs
    no error (console, exception, failed load); the page loads nothing from elsewhere."""
    rendered = render(page, PAGE_FACTS)
    sections, axes, boxes, external = rendered.values
    assert rendered.errors == []
    assert (sections, axes, external) == (connections, AXES_PER_CONNECTION * connections, 0)
    image = pixels(rendered.screenshot)
    assert (image < 0.9).any(axis=2).mean() > 0.02  # not blank
    x, y, width, height = map(int, boxes[0])  # the first timeline, on screen: lines drawn in it
    assert width > 600 and height > 500
    plot = image[y:y + height, x:x + width]
    assert (plot < 0.9).any(axis=2).mean() > 0.03
    rtt_blue = (abs(plot - (0x1F / 255, 0x77 / 255, 0xB4 / 255)) < 0.1).all(axis=2)
    assert rtt_blue.sum() > 200  # the RTT line (matplotlib's first colour)


def test_the_page_check_sees_console_errors_exceptions_and_failed_loads(tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="missing.png"><script>console.error("boom"); nosuch();</script>')
    errors = render(bad).errors
    assert len(errors) == 3, errors
    assert any("boom" in e for e in errors) and any("nosuch" in e for e in errors)
    assert any("missing.png" in e for e in errors)


def test_report_of_a_test_data_archive_renders_its_plots_and_summary_line(tmp_path: Path) -> None:
    require_chromium()
    text = report(tmp_path / "ndt.html", str(NDT))
    (summary,) = map(orjson.loads, run("summary", "--format", "json", str(NDT)).stdout.splitlines())
    assert f"why slow: {summary['why_slow']}" in text and summary["why_slow"] == "receive_window"
    assert f"{summary['bytes_acked']:,} B acked" in text and "2 segments" in text  # its 2 retransmits
    assert summary["evidence"] in text
    assert_renders_plots(tmp_path / "ndt.html", 1)


def test_several_archives_make_one_page_with_a_section_and_a_contents_entry_each(tmp_path: Path) -> None:
    require_chromium()
    text = report(tmp_path / "two.html", str(NDT), str(FINWAIT))
    assert text.count('<li><a href="#connection-') == 2
    assert_renders_plots(tmp_path / "two.html", 2)


def test_report_by_uuid_finds_the_collectors_archives_and_renders_them(tmp_path: Path, shaped_run) -> None:
    require_chromium()
    flows = shaped_run.flows
    text = report(tmp_path / "flows.html", "--search", str(shaped_run.out), *(f.uuid for f in flows.values()))
    for kind, flow in flows.items():  # the same class as tcpinfo summary and the collector
        section = text.split(f"<h2>{flow.uuid}</h2>", 1)[1].split("</section>", 1)[0]
        assert f"why slow: {kind}" in section
    assert_renders_plots(tmp_path / "flows.html", len(flows))


def test_an_unknown_uuid_or_a_missing_output_directory_is_a_one_line_error(tmp_path: Path) -> None:
    missing = run("report", "--search", str(tmp_path), "-o", str(tmp_path / "x.html"), "nosuch_1_0000000000000001")
    err = missing.stderr.decode()
    assert missing.returncode == 1 and err.count("\n") == 1
    assert err.startswith("tcpinfo: nosuch_1_0000000000000001: ") and "--search" in err
    nowhere = run("report", "-o", str(tmp_path / "no" / "x.html"), str(NDT))
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr.decode()
    assert not (tmp_path / "x.html").exists()


def test_report_without_matplotlib_is_one_line_naming_the_install_command(tmp_path: Path) -> None:
    assert_missing_module_is_one_line("matplotlib", ["report", "-o", str(tmp_path / "x.html"), str(NDT)], tmp_path)
