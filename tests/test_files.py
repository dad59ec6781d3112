"""`pfgm_diffusers.files`: whole files or none, and never a write through a link or outside the folder."""

import json
import os

import pytest

from pfgm_diffusers.files import atomic_write, atomic_write_json, check_file_name, inside, makedirs


def test_atomic_write_replaces_a_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("theirs")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    atomic_write(link, "mine")
    assert victim.read_text() == "theirs" and not link.is_symlink() and link.read_text() == "mine"
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["a.json", "out.txt", "victim.txt"]  # no temporary file left


def test_atomic_write_inside_a_folder_refuses_links_and_paths_outside(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "samples").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=f"'{out}/samples' is a symbolic link \\(to '{elsewhere}'\\)"):
        atomic_write(out / "samples" / "grid.png", b"png", folder=out)
    with pytest.raises(ValueError, match="is a symbolic link"):
        makedirs(out, "samples", "deeper")
    (out / "file.txt").symlink_to(elsewhere / "file.txt")
    with pytest.raises(ValueError, match=f"'{out}/file.txt' is a symbolic link"):
        atomic_write(out / "file.txt", "x", folder=out)
    for outside in (tmp_path / "x.txt", out / ".." / "x.txt"):
        with pytest.raises(ValueError, match="refusing to write"):
            atomic_write(outside, "x", folder=out)
    assert os.listdir(elsewhere) == [] and not (tmp_path / "x.txt").exists()
    assert inside(out, "a", "b.txt") == str(out / "a" / "b.txt")
    assert makedirs(out, "a", "b") == str(out / "a" / "b") and (out / "a" / "b").is_dir()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "", ".", "a//b", "a\\..\\b", 3])
def test_check_file_name_refuses_all_but_plain_relative_names(name):
    with pytest.raises(ValueError, match="is not a plain relative file name"):
        check_file_name(name)
    assert check_file_name("unet_ema/config.json") == "unet_ema/config.json"
