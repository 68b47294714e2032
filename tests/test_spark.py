"""--engine spark on a local Spark (pyspark + a JRE): the export writes exactly what the
single-host export writes (every column of every row, the schema, the partitions), bad input
gets the same one-line error, and the summary computed as a Spark DataFrame is tcpinfo
summary's; the dataset may be an s3:// URL (moto's S3 server), for both engines; and the
README's spark-submit line runs on a standalone cluster (a master and a worker, separate JVMs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from helpers.csvtool import plain
from helpers.dataset import sorted_rows
from helpers.extra import assert_missing_module_is_one_line
from helpers.paths import FINWAIT, NDT, TESTDATA, script
from helpers.s3 import moto_server
from helpers.sparkcluster import spark_home, standalone_cluster

TCPINFO = script("tcpinfo")


def _java() -> None:
    """A JRE, or (outside CI, which installs one: .ci/run) a skip saying how to get one."""
    if shutil.which("java") is None:
        if os.environ.get("CI"):
            pytest.fail("java is missing in CI: apt-get install -y openjdk-17-jre-headless")
        pytest.skip("no java (Debian: apt-get install -y openjdk-17-jre-headless)")


@pytest.fixture(scope="module")
def spark():
    """One local Spark for the module (two cores: more than one task at a time)."""
    _java()
    from tcpinfo.analysis.spark import running

    with running("local[2]") as session:
        yield session


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, shaped_run) -> Path:
    """A tree of several hosts' archives: the test data (upstream's and Linux 6.18's, with and
    without headers) and the archives the real collector wrote."""
    root = tmp_path_factory.mktemp("fleet")
    for archive in sorted(TESTDATA.glob("*/*.jsonl.zst")):
        (root / archive.parent.name).mkdir(exist_ok=True)
        shutil.copy(archive, root / archive.parent.name / archive.name)
    shutil.copytree(shaped_run.out, root / "collector")
    return root


def _paths(root: Path) -> list[str]:
    from tcpinfo.archive.reader import expand_paths

    return expand_paths([str(root)])


def test_spark_export_writes_exactly_what_the_single_host_export_writes(tmp_path: Path, spark, fleet) -> None:
    from tcpinfo.analysis import export
    from tcpinfo.analysis import spark as engine

    paths = _paths(fleet)
    host, _ = export.export(paths, tmp_path / "host")
    counts, files = engine.export(spark, paths, str(tmp_path / "spark"))
    assert counts.rows == host.rows > 1_000 and counts.skipped == 0
    assert files > len(list((tmp_path / "host").rglob("*.parquet")))  # the tasks cut the files
    partitions = {p.parent.relative_to(tmp_path / "host") for p in (tmp_path / "host").rglob("*.parquet")}
    assert partitions == {p.parent.relative_to(tmp_path / "spark") for p in (tmp_path / "spark").rglob("*.parquet")}
    assert any("host=test-host" in str(p) for p in partitions)
    want, got = sorted_rows(tmp_path / "host"), sorted_rows(tmp_path / "spark")
    assert got.schema == want.schema
    for name in want.schema.names:  # every column, named when one differs
        assert got[name].equals(want[name]), name


def test_spark_export_in_m_labs_row_shape_equals_the_single_host_one(tmp_path: Path, spark, fleet) -> None:
    from tcpinfo.analysis import export
    from tcpinfo.analysis import spark as engine

    paths = [p for p in _paths(fleet) if "collector" in p or "mlab" in p]
    export.export(paths, tmp_path / "host", shape="mlab")
    engine.export(spark, paths, str(tmp_path / "spark"), shape="mlab")
    want, got = sorted_rows(tmp_path / "host"), sorted_rows(tmp_path / "spark")
    assert want.num_rows == len(paths)  # one row per archive
    # ParseInfo.ParseTime is when each export ran; everything else is the archives'
    assert got.drop_columns(["ParseInfo"]).equals(want.drop_columns(["ParseInfo"]))


def test_bad_input_under_spark_is_the_single_host_one_line_error(tmp_path: Path, spark) -> None:
    from tcpinfo.analysis import spark as engine
    from tcpinfo.csvtool.convert import BadInput

    good = plain(FINWAIT).splitlines(keepends=True)
    path = tmp_path / "mixed.jsonl"  # a header and two records, then a line that is not JSON
    path.write_bytes(b"".join(good[:3]) + b"nope\n" + b"".join(good[3:]))
    single = subprocess.run([TCPINFO, "export", "-o", str(tmp_path / "host"), str(path)], capture_output=True)
    assert single.returncode == 1
    with pytest.raises(BadInput) as raised:
        engine.export(spark, [str(NDT), str(path)], str(tmp_path / "spark"))
    assert f"tcpinfo: {raised.value}\n" == single.stderr.decode()
    assert "mixed.jsonl:4: not JSON" in single.stderr.decode()
    # rows before the bad line are kept, as by the single-host export
    assert sorted_rows(tmp_path / "spark").num_rows == 891 + sorted_rows(tmp_path / "host").num_rows == 893


def test_summary_as_a_spark_dataframe_is_tcpinfo_summarys(tmp_path: Path, spark, fleet) -> None:
    from tcpinfo.analysis import export
    from tcpinfo.analysis import spark as engine
    from tcpinfo.analysis.query import connect, summaries

    export.export(_paths(fleet), tmp_path / "ds")
    with connect([str(tmp_path / "ds")], []) as con:
        want = list(summaries(con))
    got = list(engine.summaries(spark, [str(tmp_path / "ds")]))
    assert len(want) > 140 and got == want
    assert {"network", "receive_window", "send_buffer", "application"} <= {row["why_slow"] for row in got}


def test_the_cli_exports_to_s3_with_either_engine_and_summarizes_with_spark(tmp_path: Path, fleet) -> None:
    """The console script end to end: --engine spark and the single-host export write the same
    dataset into an S3 bucket (moto's server), `sql` and `summary` read it there, and
    `summary --engine spark` prints what `summary` prints."""
    _java()
    paths = [str(fleet / "mlab"), str(fleet / "collector")]
    with moto_server() as s3:
        def run(*args: str) -> subprocess.CompletedProcess:
            result = subprocess.run([TCPINFO, *args], capture_output=True, env=s3.env, timeout=300)
            assert result.returncode == 0, result.stderr
            return result

        run("export", "-o", s3.url("host"), *paths)
        run("export", "--engine", "spark", "--master", "local[2]", "-o", "s3://tcpinfo-test/spark", *paths)
        fs = s3.filesystem()
        want, got = sorted_rows("tcpinfo-test/host", fs), sorted_rows("tcpinfo-test/spark", fs)
        assert want.num_rows > 1_000 and got.equals(want)
        # the same check of a non-empty output as for a directory
        again = subprocess.run([TCPINFO, "export", "-o", s3.url("host"), *paths], capture_output=True, env=s3.env)
        assert again.returncode == 2 and "not empty" in again.stderr.decode()
        # sql and summary read the dataset in the bucket (through pyarrow: no DuckDB extension)
        on_s3 = run("summary", "--format", "json", s3.url("spark"))
        count = run("sql", "--format", "csv", "SELECT count(*) AS n, count(DISTINCT date) AS days FROM snapshots",
                    s3.url("host"))
        days = {d for d in want["date"].to_pylist() if d is not None}  # the null partition is NULL, as SQL counts
        assert count.stdout.decode().splitlines() == ["n,days", f"{want.num_rows},{len(days)}"]
        empty = subprocess.run([TCPINFO, "sql", "SELECT 1", s3.url("nothing")], capture_output=True, env=s3.env)
        assert empty.returncode == 2 and "no Parquet files there" in empty.stderr.decode()
    on_host = run_plain("summary", "--format", "json", *paths)
    assert on_s3.stdout == on_host.stdout
    on_spark = run_plain("summary", "--engine", "spark", "--master", "local[2]", "--format", "json", *paths)
    assert on_spark.stdout == on_host.stdout and len(on_host.stdout.splitlines()) > 140
    assert all(orjson.loads(line)["why_slow"] for line in on_spark.stdout.splitlines())


def test_the_readmes_spark_submit_line_exports_on_a_standalone_cluster_what_one_host_writes(tmp_path: Path,
                                                                                            fleet) -> None:
    """A cluster as on real machines: a master and a worker, each its own JVM, the tasks in an
    executor the worker starts.  spark-submit of tcpinfo's CLI module (the README's line, less the
    packed venv: the executors here have this Python) writes the single-host export's dataset,
    and `summary --engine spark --master spark://...` prints `summary`'s lines."""
    _java()
    from tcpinfo.analysis import cli

    paths = [str(fleet / "mlab"), str(fleet / "collector")]
    run_plain("export", "-o", str(tmp_path / "host"), *paths)
    with standalone_cluster(tmp_path / "cluster") as cluster:
        env = {**cluster.env, "PYSPARK_DRIVER_PYTHON": sys.executable}
        submitted = subprocess.run([str(spark_home() / "bin" / "spark-submit"), "--master", cluster.url,
                                    cli.__file__, "export", "--engine", "spark", "-o", str(tmp_path / "spark"),
                                    *paths], capture_output=True, env=env, timeout=600)
        assert submitted.returncode == 0, submitted.stderr.decode()[-4000:]
        summary = subprocess.run([TCPINFO, "summary", "--engine", "spark", "--master", cluster.url, "--format",
                                  "json", str(tmp_path / "spark")], capture_output=True, env=env, timeout=600)
        assert summary.returncode == 0, summary.stderr.decode()[-4000:]
        apps = sorted(cluster.work_dir.glob("app-*"))
    assert len(apps) == 2 and all(any(app.glob("*/stderr")) for app in apps)  # both ran in the worker's executors
    want, got = sorted_rows(tmp_path / "host"), sorted_rows(tmp_path / "spark")
    assert want.num_rows > 1_000 and got.equals(want)
    assert summary.stdout == run_plain("summary", "--format", "json", str(tmp_path / "host")).stdout


def run_plain(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([TCPINFO, *args], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_spark_engine_without_pyspark_is_one_line_naming_the_install_command(tmp_path: Path) -> None:
    assert_missing_module_is_one_line("pyspark", ["export", "--engine", "spark", "-o", str(tmp_path / "x"), str(NDT)],
                                      tmp_path)
