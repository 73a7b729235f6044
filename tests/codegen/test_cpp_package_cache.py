"""The package cache writes atomically: a compile that fails leaves nothing, a compile killed
mid-write leaves a file no lookup reads, and the next compile deletes it (but not the file
of a compile still running). AOTInductor is replaced by a stand-in that writes bytes, so
nothing here compiles C++."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.codegen.cpp import package_cache
from lmforge.codegen.cpp.package_cache import PackageCache, compile_seconds_on_this_machine


def _compile_killed_mid_write() -> int:
    """The pid of a forked process killed (SIGKILL: no cleanup runs) while AOTInductor was
    writing its package."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: starts a compile whose package write never ends
        def writes_then_hangs(exported, package_path, inductor_configs):
            open(package_path, "wb").write(b"half a package")
            os.write(writer, b"w")
            time.sleep(600)

        torch._inductor.aoti_compile_and_package = writes_then_hangs
        try:
            PackageCache("digest").load_or_compile("b1-t1-th1", lambda: None, {})
        finally:
            os._exit(1)
    os.close(writer)
    try:
        assert os.read(reader, 1) == b"w"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(reader)
    return pid


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty lmforge cache, and a stand-in AOTInductor that writes a package's bytes."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda exported, package_path, inductor_configs: open(package_path, "wb").write(b"package"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: f"step from {os.path.basename(path)}")
    return tmp_path / "aoti"


def test_a_failed_compile_leaves_no_file(cache, monkeypatch):
    def writes_then_fails(exported, package_path, inductor_configs):
        open(package_path, "wb").write(b"half a package")
        raise RuntimeError("C++ build failed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", writes_then_fails)
    with pytest.raises(RuntimeError, match="C\\+\\+ build failed"):
        PackageCache("digest").load_or_compile("b1-t1-th1", lambda: None, {})
    assert list((cache / "digest").iterdir()) == []


def test_a_killed_compile_leaves_a_file_no_lookup_reads_and_the_next_compile_removes_it(cache):
    killed = _compile_killed_mid_write()
    left = list((cache / "digest").iterdir())
    assert [path.name for path in left] == [f"b1-t1-th1.{killed}.partial.pt2"]
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = cache / "other" / f"b4-t1-th1.{running.pid}.partial.pt2"  # a compile still writing
        legacy = cache / "other" / "tmpab12cd34.pt2"  # what earlier versions left, an hour old
        live.parent.mkdir()
        live.write_bytes(b"half"), legacy.write_bytes(b"half")
        os.utime(legacy, (time.time() - 7200, time.time() - 7200))
        step, record = PackageCache("digest").load_or_compile("b1-t1-th1", lambda: None, {})
        assert live.exists()
    finally:
        running.kill()
        running.wait()
    assert not legacy.exists() and not left[0].exists()
    assert sorted(path.name for path in (cache / "digest").iterdir()) == ["b1-t1-th1.json", "b1-t1-th1.pt2"]
    assert step == "step from b1-t1-th1.pt2" and record["source"] == "compiled"


def test_records_being_written_are_not_read(cache):
    PackageCache("digest").load_or_compile("b1-t1-th1", lambda: None, {})
    (cache / "digest" / f"b1-tany-th1.{os.getpid()}.partial.json").write_text("{\"bucket\": \"b1-ta")
    records = compile_seconds_on_this_machine("digest")
    assert list(records) == ["b1-t1-th1"] and json.loads((cache / "digest" / "b1-t1-th1.json").read_text())
    assert package_cache.remove_stale_partials(cache) == []  # this process is alive: its file is kept


def test_cpp_products_choose_the_decode_buckets_config_and_their_own_cache_directory(monkeypatch):
    from tiny_models import tiny_model

    import lmforge
    from lmforge.codegen import cpp_backend
    from lmforge.codegen.cpp_backend import INDUCTOR_CONFIG, STATIC_BUCKET_CONFIG, Bucket, CppRunner

    program = lmforge.optimize(tiny_model("llama", num_layers=1), "passes: [{name: cleanup}]\n").program
    configs = []
    monkeypatch.setattr(PackageCache, "load_or_compile",
                        lambda self, name, export, config, on_phase: (configs.append((self.directory.name, config))
                                                                      or (None, {"compile_seconds": 0.0})))
    monkeypatch.setattr(cpp_backend, "describe_record", lambda record: "")
    for products in ("template", "onednn"):
        runner = CppRunner(program, products)
        runner._step(Bucket(batch=1, tokens=1, threads=1), ())
        runner._step(Bucket(batch=1, tokens=None, threads=1), ())
    (template_dir, template_decode), (_, template_prefill), (onednn_dir, onednn_decode), (_, onednn_prefill) = configs
    assert template_decode == STATIC_BUCKET_CONFIG and onednn_decode == INDUCTOR_CONFIG
    assert template_prefill == onednn_prefill == INDUCTOR_CONFIG
    assert onednn_dir == f"{template_dir}-onednn"
