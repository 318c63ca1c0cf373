"""Files gradmedic writes (traces, HTML reports): whole or not at all, on disk before we say so, never
through a symbolic link, with ordinary permissions."""

import os
import stat

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._files import write_atomic
from gradmedic.report import Page, write_page


@pytest.fixture(scope="module")
def trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with gm.Monitor(model) as mon:
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            mon.step()
    return mon.trace


def _writers(trace):
    return {"write_page": lambda path: write_page(Page("a report"), path), "Trace.save": trace.save}


@pytest.mark.parametrize("writer", ["write_page", "Trace.save"])
def test_a_link_planted_at_a_predictable_temporary_name_redirects_nothing(tmp_path, trace, writer):
    """The old write_page wrote through ``.NAME.tmp-<pid>``: a link planted there sent the report onto
    another file and left NAME a link to it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.html"
    for name in (f".{target.name}.tmp-{os.getpid()}", f".{target.name}.tmp"):
        (tmp_path / name).symlink_to(victim)
    _writers(trace)[writer](target)
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and target.is_file() and target.stat().st_size > 0


@pytest.mark.parametrize("writer", ["write_page", "Trace.save"])
def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path, trace, writer):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    target = tmp_path / "out.html"
    target.symlink_to(victim)
    _writers(trace)[writer](target)
    assert victim.read_text() == "keep me"
    assert not target.is_symlink() and target.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "victim.txt"]  # no temporary left


@pytest.mark.parametrize("writer", ["write_page", "Trace.save"])
def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, trace, writer, monkeypatch):
    """A power loss after a rename without fsync can leave an empty file under the final name."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync " + ("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return fsync(fd)

    def recording_replace(src, dst):
        events.append("rename")
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    _writers(trace)[writer](tmp_path / "out")
    if os.name == "nt":
        assert events == ["fsync file", "rename"]
    else:
        assert events == ["fsync file", "rename", "fsync directory"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "r.html"
    target.write_text("old report")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_text() == "old report"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_permissions_are_those_of_a_plain_open_and_never_world_writable(tmp_path):
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(write_atomic(tmp_path / "a", b"x").stat().st_mode) == 0o644
        os.umask(0)
        assert stat.S_IMODE(write_atomic(tmp_path / "b", b"x").stat().st_mode) == 0o664
        kept = tmp_path / "kept"
        kept.write_bytes(b"old")
        kept.chmod(0o600)
        assert stat.S_IMODE(write_atomic(kept, b"new").stat().st_mode) == 0o600  # a replaced file keeps its mode
    finally:
        os.umask(old)


def test_a_name_near_the_file_system_limit_still_gets_a_temporary(tmp_path):
    target = tmp_path / ("r" * 250 + ".html")
    assert write_atomic(target, b"page").read_bytes() == b"page"
