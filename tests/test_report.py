"""`fedmed report RUN`: report.html, one page that opens from disk, drawn from what a
finished run recorded."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import pytest

from fedmed import config as config_mod
from fedmed.run.directory import RunDirectory

from .conftest import TINY, assert_clean_failure, fedmed
from .inprocess import run_in_process


@pytest.fixture(scope="module")
def run(cache_dir, tmp_path_factory) -> Path:
    """Three hospitals with DP-SGD (sigma given: no calibration to wait for) and a label skew, 2 rounds."""
    out = tmp_path_factory.mktemp("report-runs")
    cfg = config_mod.load(None, [*TINY, "privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp", "skew.labels=dirichlet", "skew.beta=0.5"],
                          {"data.cache_dir": cache_dir, "output.dir": str(out)})  # fmt: skip
    return run_in_process(cfg)


@pytest.fixture(scope="module")
def page(run) -> str:
    result = fedmed("report", run)
    assert result.returncode == 0, result.stderr
    return (run / "report.html").read_text(encoding="utf-8")


def test_the_report_opens_from_disk_with_nothing_fetched(page):
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # every image inline
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 7 and all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)


def test_the_report_shows_every_section_the_run_recorded(page, run):
    summary = RunDirectory(run).summary()
    text = html.unescape(page)
    for title in ("Learning curves", "Confusion matrix", "ROC curves", "Calibration", "Per class", "Fairness across hospitals", "Privacy", "Data per hospital", "Timing", "Settings that differ from the defaults"):
        assert title in text, title
    assert f"<td>global test accuracy</td><td>{summary['test']['accuracy']:.3f}</td>" in page
    assert all(site in text for site in summary["per_hospital"])
    assert f"worst: {summary['fairness']['worst_hospital']}".lower() in text.lower()
    assert "<tr><td>privacy.mode</td><td>'sample'</td><td>'off'</td></tr>" in text  # a setting that differs from the default


def test_the_report_names_no_data_path(page, cache_dir):
    assert cache_dir not in page  # the run's config redacts paths to data


def test_a_folder_without_a_finished_run_is_refused_in_one_line(tmp_path):
    assert_clean_failure(fedmed("report", tmp_path), "holds no finished run")
    assert_clean_failure(fedmed("report", tmp_path / "missing"), "is not a folder")
