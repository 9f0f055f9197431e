"""The log: levels and their switches, lines on stderr from the main process only, progress as status lines
in a log file (no carriage-return bars), and worker warnings said by the training process."""

from __future__ import annotations

import logging

import pytest

from pipelines.logs import Progress
from tests.fixtures import cli


def _pretrain(corpus, out, *extra):
    return ("pretrain", "--shards", corpus / "shards", "--targets", corpus / "targets.zarr", "--model", "cae2_debug",
            "--out", out, "--steps", "2", "--batch-size", "4", "--workers", "0", "--allow-random-teacher", "--lr",
            "1e-3", *extra)


def test_levels_quiet_verbose_and_the_environment(corpus, tmp_path, monkeypatch):
    normal = cli(*_pretrain(corpus, tmp_path / "a"))
    assert normal.returncode == 0 and "pretrain: cae2_debug on 1 process(es)" in normal.stderr
    quiet = cli("--quiet", *_pretrain(corpus, tmp_path / "b"))
    assert quiet.returncode == 0 and quiet.stderr == "" and "finished 2 steps" in quiet.stdout
    monkeypatch.setenv("CAE2_LOG_LEVEL", "warning")
    assert cli(*_pretrain(corpus, tmp_path / "c")).stderr == ""
    monkeypatch.setenv("CAE2_LOG_LEVEL", "DEBUG")
    assert "pretrain: cae2_debug" in cli(*_pretrain(corpus, tmp_path / "d")).stderr
    monkeypatch.setenv("CAE2_LOG_LEVEL", "chatty")
    res = cli("models")
    assert res.returncode == 2 and res.stderr.startswith("error: CAE2_LOG_LEVEL='CHATTY' is not a log level")
    monkeypatch.delenv("CAE2_LOG_LEVEL")
    res = cli("--quiet", "--verbose", "models")
    assert res.returncode == 2 and "--quiet and --verbose" in res.stderr


def test_off_rank_0_only_warnings_are_said_and_they_name_the_rank(monkeypatch, capsys):
    log = logging.getLogger("pipelines.test")
    cli("models")  # the log set up as by any command
    monkeypatch.setenv("RANK", "1")
    log.info("a line every rank would say")
    log.warning("only this rank saw this")
    err = capsys.readouterr().err
    assert err == "[rank 1] WARNING: only this rank saw this\n"


def test_progress_in_a_log_file_is_a_status_line_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    progress = Progress(10, unit="step", name="pretrain", every=0.0)  # stderr is captured: not a terminal
    for _ in range(4):
        progress.update(1, note="loss 0.5")
    progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("pretrain: 1/10 steps (10%), ") and "steps/s, ETA " in lines[0]
    assert lines[-1].startswith("pretrain: 4/10 steps (40%)") and lines[-1].endswith("; loss 0.5")
    assert not any("\r" in line for line in lines)


@pytest.mark.parametrize("every", [3600.0])
def test_progress_says_nothing_between_its_status_lines(caplog, every):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    progress = Progress(5, every=every)
    for _ in range(5):
        progress.update()
    assert not caplog.records  # none yet: the first line is due after `every` seconds
    progress.close()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["progress: 5/5 steps (100%)"]
