"""Atomic files and folders (loraflow.runtime.atomic_files): a reader sees the old version or the new one, never
half of one and never none; an error while writing leaves the old version and no staging leftovers."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from loraflow.runtime.atomic_files import atomic_file, atomic_folder, write_json_atomic


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_reader_polling_during_folder_replaces_never_finds_the_folder_missing(tmp_path):
    target = tmp_path / "adapter"
    with atomic_folder(target) as staging:
        (staging / "version").write_text("0")
    replaces, done, missing, polls = 200, threading.Event(), [], [0]

    def poll():
        while not done.is_set():
            polls[0] += 1
            try:
                (target / "version").read_text()  # the folder and the file in it, as a loader would open them
            except FileNotFoundError as error:
                missing.append(str(error))

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for version in range(1, replaces + 1):
            with atomic_folder(target) as staging:
                (staging / "version").write_text(str(version))
                (staging / "weights.bin").write_bytes(b"\0" * 4096)
    finally:
        done.set()
        reader.join()
    assert polls[0] > 0 and missing == []
    assert (target / "version").read_text() == str(replaces)
    assert leftovers(tmp_path) == []  # every old folder removed


def test_an_error_while_filling_a_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError, match="save failed"):
        with atomic_folder(target) as staging:
            (staging / "manifest.json").write_text("new")
            raise RuntimeError("save failed")
    assert (target / "manifest.json").read_text() == "old" and leftovers(tmp_path) == []


def test_a_folder_is_created_where_there_was_none(tmp_path):
    with atomic_folder(tmp_path / "new" / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert (tmp_path / "new" / "model" / "config.json").read_text() == "{}"
    assert leftovers(tmp_path / "new") == []


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"loss": 1.0})
    with pytest.raises(OSError):
        with atomic_file(target) as temp:
            temp.write_text('{"loss": 0.')  # a writer that dies half way
            raise OSError("disk full")
    assert target.read_text() == '{\n "loss": 1.0\n}' and leftovers(tmp_path) == []
    with atomic_file(target) as temp:  # any writer fills the temp path
        temp.write_bytes(b'{"loss": 0.5}')
    assert target.read_text() == '{"loss": 0.5}' and leftovers(tmp_path) == []


def test_the_next_write_removes_what_a_killed_writer_left_and_keeps_a_live_writers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()  # reaped: its pid no longer exists
    killed_folder = tmp_path / f".model.{host}.{dead_pid}.0123abcd.staging"
    killed_file = tmp_path / f".metrics.json.{host}.{dead_pid}.0123abcd.part"
    live_folder = tmp_path / f".model.{host}.{1}.0123abcd.staging"  # pid 1 is alive
    for folder in (killed_folder, live_folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    killed_file.write_text('{"loss": 0.')
    with atomic_folder(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    write_json_atomic(tmp_path / "metrics.json", {"loss": 1.0})
    assert leftovers(tmp_path) == [live_folder.name]
