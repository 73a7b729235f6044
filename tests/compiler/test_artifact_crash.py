"""`kill -9` of `lmforge compile` while it writes the artifact: the output path then holds the
previous artifact byte for byte, or a complete new one, never a mix; the killed writer's staging
directory is recognised as stale and removed."""

import fcntl
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_models import tiny_model

import lmforge
from lmforge.compiler.artifact import FORMAT_VERSION, REQUIRED_FILES, read_manifest
from lmforge.compiler import atomic_dir
from lmforge.compiler.atomic_dir import remove_stale_staging, staging_name_pattern

POLL_SECONDS = 0.002
REPOSITORY = Path(__file__).resolve().parents[2]


def previous_artifact(path: Path) -> dict[str, str]:
    """A small artifact that passes the hash checks; returns its files' digests."""
    path.mkdir()
    for name in REQUIRED_FILES:
        (path / name).write_text(f"previous {name}\n")
    files = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in REQUIRED_FILES}
    manifest = {
        "format_version": FORMAT_VERSION, "architecture": "llama", "history": [], "files": files,
        "meta": {"num_layers": 1, "kv_cache": [], "dtype": "float32"}, "generation": {"eos_token_ids": []},
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return snapshot(path)


def snapshot(path: Path) -> dict[str, str]:
    files = (p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def wait_for(condition, process: subprocess.Popen) -> bool:
    while process.poll() is None:
        if condition():
            return True
        time.sleep(POLL_SECONDS)
    return False


def staging_of(out: Path) -> Path | None:
    pattern = staging_name_pattern(out)
    return next((p for p in out.parent.iterdir() if pattern.fullmatch(p.name)), None)


def kill_at(process: subprocess.Popen, out: Path, anchor: str | None, jitter: float, killed: dict) -> None:
    """Kill -9 once the staging directory (and `anchor` inside it) exists, after a random jitter."""
    if not wait_for(lambda: staging_of(out) is not None, process):
        return
    staging = staging_of(out)
    if anchor is not None and not wait_for(lambda: staging is None or (staging / anchor).exists(), process):
        return
    time.sleep(random.uniform(0, jitter))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        killed[out.name] = anchor or "staging"


def test_kill_during_compile_leaves_previous_or_complete_artifact(tmp_path):
    checkpoint, recipe = tmp_path / "checkpoint", tmp_path / "recipe.yaml"
    tiny_model("llama").save_pretrained(checkpoint)
    recipe.write_text("passes: []\n")
    # three moments of the writing window: weights and export, the remaining files, the swap
    anchors = {"out_early": (None, 0.5), "out_files": ("program.json", 0.05), "out_swap": ("manifest.json", 0.02)}
    before, processes, threads, killed = {}, {}, [], {}
    for name, (anchor, jitter) in anchors.items():
        before[name] = previous_artifact(tmp_path / name)
        processes[name] = subprocess.Popen(
            [sys.executable, "-c", "from lmforge.cli import main; main()", "compile", str(checkpoint),
             "--recipe", str(recipe), "--output", str(tmp_path / name), "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPOSITORY,
        )
        arguments = (processes[name], tmp_path / name, anchor, jitter, killed)
        threads.append(threading.Thread(target=kill_at, args=arguments))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for process in processes.values():
        process.wait(timeout=60)
    assert killed, "no compile was killed while writing: the test checked nothing"
    for name in anchors:
        out = tmp_path / name
        if snapshot(out) != before[name]:  # killed after the swap: the new artifact, complete
            read_manifest(out)
            assert lmforge.load(out).program.meta["num_layers"] == 2
        remove_stale_staging(out)
        assert staging_of(out) is None


def test_only_unlocked_staging_directories_of_the_target_are_removed(tmp_path):
    target = tmp_path / "out"
    stale, busy = tmp_path / ".out.partial-0123abcd", tmp_path / ".out.partial-89abcdef"
    unrelated = [tmp_path / ".out.partial-mine", tmp_path / ".other.partial-0123abcd", tmp_path / "out.partial-0123abcd"]
    for path in [stale, busy, *unrelated]:
        path.mkdir()
    (stale / "weights.safetensors").write_text("half written")
    holder = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)  # a writer still at work holds this lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert remove_stale_staging(target) == [stale]
    finally:
        os.close(holder)
    assert busy.is_dir() and all(path.is_dir() for path in unrelated)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replacing_leaves_only_the_new_content(tmp_path, monkeypatch, exchange):
    if not exchange:  # file systems without RENAME_EXCHANGE
        monkeypatch.setattr(atomic_dir, "_exchange", lambda first, second: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir.staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
        atomic_dir.replace_with(staging, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]
