"""The durable store: atomic versions, streaming uploads that leave nothing on failure, quarantine."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from server.adapters import owners as owners_mod
from server.adapters import store as store_mod
from server.adapters.weights import AdapterKind
from server.adapters.store import AdapterStore
from server.adapters.validate import AdapterLimits
from server.api.auth import Quotas
from server.api.tenancy import UploadQuota
from server.errors import DataLoss, InvalidArgument, NotFound, QuotaExceeded, ResourceExhausted
from tests.unit.adapter_fixtures import BASE, LIMITS, bottleneck_archive, hostile_corpus, peft_archive, tree

CORPUS = hostile_corpus()


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path / "store", BASE, LIMITS)


def test_put_writes_layout_and_loads_back(store):
    archive = peft_archive("lora")
    info = store.put("acme", "summarizer", archive)
    assert (info.tenant, info.name, info.version, info.kind) == ("acme", "summarizer", 1, AdapterKind.LORA)
    assert info.sha256 == hashlib.sha256(archive).hexdigest() and info.size == len(archive)
    assert str(info.key) == "acme/summarizer@1"
    vdir = store.root / "adapters" / "acme" / "summarizer" / "v1"
    assert (vdir / "adapter.zip").read_bytes() == archive
    meta = json.loads((vdir / "meta.json").read_text())
    assert meta == {"kind": "LORA", "sha256": info.sha256, "size": len(archive), "created": info.created,
                    "version": 1}
    w = store.load("acme", "summarizer", 1)
    assert torch.equal(w.lora[(0, "q_proj")].A, store.load("acme", "summarizer", 1).lora[(0, "q_proj")].A)
    assert store.info("acme", "summarizer", 1) == info
    assert tree(store.root / "tmp") == [] and tree(store.root / "trash") == []


def test_streaming_upload_and_versions(store):
    archive = peft_archive("ia3")
    for expected_version in (1, 2, 3):
        with store.begin_upload("acme", "tone", len(archive), hashlib.sha256(archive).hexdigest()) as up:
            for i in range(0, len(archive), 777):
                up.write(archive[i:i + 777])
            assert up.commit().version == expected_version
    assert store.versions("acme", "tone") == [1, 2, 3]
    assert [i.version for i in store.list("acme")] == [1, 2, 3]
    assert store.usage("acme") == store_mod.TenantUsage(adapters=1, versions=3, bytes=3 * len(archive))
    assert store.usage("nobody") == store_mod.TenantUsage(0, 0, 0)


def test_chunk_past_declared_size_fails_fast(store):
    archive = peft_archive("lora")
    before = tree(store.root)
    with pytest.raises(ResourceExhausted, match="declared size of 100"):
        with store.begin_upload("acme", "x", 100) as up:
            up.write(archive[:60])
            up.write(archive[60:120])  # fails here, not at commit
            pytest.fail("write past the declared size was accepted")
    assert tree(store.root) == before


def test_upload_size_limits_checked_up_front(store):
    small = AdapterStore(store.root, BASE, AdapterLimits(max_archive_bytes=1000))
    with pytest.raises(ResourceExhausted, match="the limit is 1000"):
        small.begin_upload("acme", "x", 1001)
    for bad in (0, -1, True, "10"):
        with pytest.raises(InvalidArgument):
            store.begin_upload("acme", "x", bad)
    with pytest.raises(InvalidArgument, match="sha256"):
        store.begin_upload("acme", "x", 10, "abc")
    assert tree(store.root) == []


def test_short_upload_and_sha_mismatch_leave_nothing(store):
    archive = peft_archive("prompt")
    with pytest.raises(InvalidArgument, match=f"after 10 of {len(archive)}"):
        with store.begin_upload("acme", "x", len(archive)) as up:
            up.write(archive[:10])
            up.commit()
    with pytest.raises(DataLoss, match="sha256 mismatch"):
        store.put("acme", "x", archive, sha256="0" * 64)
    assert tree(store.root) == [] and store.versions("acme", "x") == []


@pytest.mark.parametrize("case", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_upload_leaves_store_unchanged(tmp_path, case):
    case_id, build, exc, limits, match = case
    AdapterStore(tmp_path, BASE, LIMITS).put("acme", "good", peft_archive("prompt"))
    store = AdapterStore(tmp_path, BASE, limits)
    before = tree(tmp_path)
    with pytest.raises(exc) as info:
        store.put("acme", "good", build(), sha256="0" * 64 if case_id == "sha256-mismatch" else None)
    assert type(info.value) is exc and match in str(info.value)
    assert tree(tmp_path) == before and store.versions("acme", "good") == [1]


@pytest.mark.parametrize("tenant, name", [("acme", "../evil"), ("../acme", "x"), ("acme", "a/b"), ("Acme", "x"),
                                          ("acme", "\u0430"), ("acme", ""), ("acme", "x" * 65), ("", "x"),
                                          ("acme", ".."), ("acme", "/etc")])
def test_bad_names_rejected_before_any_path_is_built(tmp_path, tenant, name):
    store = AdapterStore(tmp_path / "s", BASE, LIMITS)
    with pytest.raises(InvalidArgument):
        store.put(tenant, name, peft_archive("prompt"))
    with pytest.raises(InvalidArgument):
        store.load(tenant, name, 1)
    assert tree(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failed_commit_cleans_up_without_a_with_block(store):
    archive = peft_archive("lora")[:-40]  # truncated: fails validation inside commit()
    up = store.begin_upload("acme", "x", len(archive))
    up.write(archive)
    with pytest.raises(InvalidArgument):
        up.commit()
    assert tree(store.root) == []
    with pytest.raises(Exception, match="already committed or aborted"):
        up.write(b"more")


def test_exception_after_partial_write_leaves_nothing(store):
    archive = peft_archive("lora")
    with pytest.raises(RuntimeError, match="client went away"):
        with store.begin_upload("acme", "x", len(archive)) as up:
            up.write(archive[: len(archive) // 2])
            assert len(tree(store.root / "tmp")) == 1  # the partial file exists meanwhile
            raise RuntimeError("client went away")
    assert tree(store.root) == []


@pytest.mark.parametrize("fail_at", ["rename", "fsync"])
def test_crash_while_publishing_leaves_nothing(store, monkeypatch, fail_at):
    real_rename, real_fsync, calls = os.rename, os.fsync, []

    def rename(src, dst):
        if str(dst).endswith("v1"):
            raise OSError("disk gone")
        return real_rename(src, dst)

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # after the archive's own fsync, during the staged version
            raise OSError("disk gone")
        return real_fsync(fd)

    monkeypatch.setattr(store_mod.os, fail_at, rename if fail_at == "rename" else fsync)
    with pytest.raises(OSError, match="disk gone"):
        store.put("acme", "x", peft_archive("lora"))
    monkeypatch.undo()
    assert [f for f in tree(store.root) if not f.endswith(".lock")] == [] and store.versions("acme", "x") == []
    assert store.put("acme", "x", peft_archive("lora")).version == 1  # the process lived: nobody saw v1


def test_killed_upload_leftovers_removed_at_scan(store):
    store.put("acme", "kept", peft_archive("prompt"))
    up = store.begin_upload("acme", "x", 10_000)  # the process "dies" mid-upload: no commit, no abort
    up.write(b"\x00" * 5000)
    (store.root / "tmp" / "dead.d").mkdir()
    (store.root / "tmp" / "dead.d" / "adapter.zip").write_bytes(b"partial")
    store.close()  # ... and the kernel drops its presence on the store
    restarted = AdapterStore(store.root, BASE, LIMITS)
    report = restarted.scan()
    assert [str(i.key) for i in report.served] == ["acme/kept@1"] and report.quarantined == ()
    assert tree(store.root / "tmp") == []


def test_scan_quarantines_corrupt_and_serves_the_rest(store, caplog):
    store.put("acme", "a", peft_archive("lora"))
    store.put("acme", "a", peft_archive("ia3"))
    store.put("acme", "b", peft_archive("prompt"))
    store.put("beta", "c", bottleneck_archive())
    flipped = store.root / "adapters" / "acme" / "a" / "v1" / "adapter.zip"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    (store.root / "adapters" / "beta" / "c" / "v1" / "meta.json").write_text("{not json")
    (store.root / "adapters" / "acme" / "stray.txt").write_text("?")
    with caplog.at_level(logging.WARNING, logger="server.adapters.store"):
        report = AdapterStore(store.root, BASE, LIMITS).scan()
    assert sorted(str(i.key) for i in report.served) == ["acme/a@2", "acme/b@1"]
    assert sorted(p for p, _ in report.quarantined) == ["adapters/acme/a/v1", "adapters/acme/stray.txt",
                                                        "adapters/beta/c/v1"]
    assert any("sha256 mismatch" in reason for _, reason in report.quarantined)
    assert sum("quarantined adapter" in r.message for r in caplog.records if r.levelno == logging.WARNING) == 3
    assert store.versions("acme", "a") == [2] and store.versions("beta", "c") == []
    assert len(list((store.root / "quarantine").iterdir())) == 3
    assert store.load("acme", "a", 2).kind is AdapterKind.IA3
    assert store.put("acme", "a", peft_archive("lora")).version == 3


def test_scan_leaves_adapters_for_another_base_in_place(store, caplog):
    store.put("acme", "a", peft_archive("prompt"))
    other = AdapterStore(store.root, BASE.__class__(**{**BASE.__dict__, "hidden_size": 128}), LIMITS)
    report = other.scan()
    assert report.served == () and report.quarantined == () and [p for p, _ in report.unfit] == ["adapters/acme/a/v1"]
    assert store.versions("acme", "a") == [1]


def test_load_detects_tampering(store):
    store.put("acme", "a", peft_archive("prompt"))
    path = store.root / "adapters" / "acme" / "a" / "v1" / "adapter.zip"
    data = bytearray(path.read_bytes())
    data[-30] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match="sha256 mismatch"):
        store.load("acme", "a", 1)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(DataLoss, match="bytes; its metadata says"):
        store.load("acme", "a", 1)
    with pytest.raises(NotFound):
        store.load("acme", "a", 2)


def test_delete_keeps_version_numbers_and_trash_until_purge(store):
    store.put("acme", "a", peft_archive("prompt"))
    store.put("acme", "a", peft_archive("prompt"))
    deleted = store.delete("acme", "a")
    assert deleted.versions == (1, 2) and store.versions("acme", "a") == [] and store.list("acme") == []
    with pytest.raises(NotFound):
        store.load("acme", "a", 1)
    assert store.load_deleted(deleted, 2).kind is AdapterKind.PROMPT_TUNING
    with pytest.raises(NotFound):
        store.delete("acme", "a")
    assert store.put("acme", "a", peft_archive("prompt")).version == 3  # never reuse a version number
    store.purge(deleted)
    assert not deleted.trash.exists()
    assert AdapterStore(store.root, BASE, LIMITS).put("acme", "a", peft_archive("prompt")).version == 4


def test_concurrent_uploads_get_distinct_versions(store):
    archive, versions, errors = peft_archive("prompt"), [], []

    def upload():
        try:
            versions.append(store.put("acme", "busy", archive).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(versions) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------ version numbers are never reused (issue 16, 2)

def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_version_quarantined_at_restart_is_never_reused(store):
    """Issue 16 finding 2: upload twice, corrupt v2, restart (scan quarantines v2), upload -> v3."""
    archive = peft_archive("prompt")
    assert [store.put("acme", "qv", archive).version for _ in range(2)] == [1, 2]
    _corrupt(store.root / "adapters" / "acme" / "qv" / "v2" / "adapter.zip")
    restarted = AdapterStore(store.root, BASE, LIMITS)
    report = restarted.scan()
    assert [p for p, _ in report.quarantined] == ["adapters/acme/qv/v2"]
    assert restarted.put("acme", "qv", archive).version == 3
    again = AdapterStore(store.root, BASE, LIMITS)
    again.scan()
    assert again.put("acme", "qv", archive).version == 4 and again.versions("acme", "qv") == [1, 3, 4]


def test_delete_after_quarantine_then_upload_never_reuses(store):
    """The highest version was quarantined, then the name deleted: the next upload is above both."""
    archive = peft_archive("prompt")
    for _ in range(3):
        store.put("acme", "a", archive)
    _corrupt(store.root / "adapters" / "acme" / "a" / "v3" / "adapter.zip")
    restarted = AdapterStore(store.root, BASE, LIMITS)
    restarted.scan()
    assert restarted.delete("acme", "a").versions == (1, 2)
    assert restarted.put("acme", "a", archive).version == 4


def test_process_killed_inside_delete_never_makes_versions_reusable(store, monkeypatch):
    """kill -9 right after the versions left adapters/ (before any later step of delete): after a
    restart the next upload still gets a fresh number."""
    archive = peft_archive("prompt")
    store.put("acme", "a", archive)
    store.put("acme", "a", archive)
    real_rename = os.rename

    def rename_then_die(src, dst):
        real_rename(src, dst)
        if str(dst).startswith(str(store.root / "trash")):
            raise KeyboardInterrupt("killed")  # nothing after this line of delete runs

    monkeypatch.setattr(store_mod.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        store.delete("acme", "a")
    monkeypatch.undo()
    restarted = AdapterStore(store.root, BASE, LIMITS)
    restarted.scan()
    assert restarted.versions("acme", "a") == []
    assert restarted.put("acme", "a", archive).version == 3


REPO = Path(__file__).resolve().parents[2]


def _python(script: str, *args: object, **kw) -> subprocess.Popen:
    """A real second process running `script` against this checkout's code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


_UPLOADER = """
import sys, time
from pathlib import Path
from server.adapters.store import AdapterStore
from tests.unit.adapter_fixtures import BASE, LIMITS
root, archive, go, count = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]), int(sys.argv[4])
store = AdapterStore(root, BASE, LIMITS)
print("ready", flush=True)
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.005)
for _ in range(count):
    print(store.put("acme", "shared", archive).version, flush=True)
"""


@pytest.mark.slow
def test_two_processes_sharing_a_store_never_hand_out_one_version_twice(tmp_path):
    """Two replicas (real processes, one directory) upload the same name at once, many times."""
    root, archive_path, go = tmp_path / "store", tmp_path / "a.zip", tmp_path / "go"
    archive_path.write_bytes(peft_archive("prompt"))
    AdapterStore(root, BASE, LIMITS)
    count = 25
    procs = [_python(_UPLOADER, root, archive_path, go, count) for _ in range(2)]
    try:
        for p in procs:  # both have imported everything: start them together
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    errors = [err[-2000:] for p, (_, err) in zip(procs, outs) if p.returncode != 0]
    assert errors == [], f"an uploader failed: {errors}"
    got = [int(line) for out, _ in outs for line in out.split()]
    assert len(got) == 2 * count and sorted(got) == list(range(1, 2 * count + 1)), got
    assert AdapterStore(root, BASE, LIMITS).versions("acme", "shared") == list(range(1, 2 * count + 1))


_KILLED_PUBLISHER = """
import os, signal, sys
from pathlib import Path
from server.adapters import store as store_mod
from tests.unit.adapter_fixtures import BASE, LIMITS
store = store_mod.AdapterStore(Path(sys.argv[1]), BASE, LIMITS)
real_rename = os.rename
def rename(src, dst):
    if str(dst).endswith("v2"):  # the version is numbered and staged: die before it appears
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst)
store_mod.os.rename = rename
store.put("acme", "a", Path(sys.argv[2]).read_bytes())
"""


@pytest.mark.slow
def test_kill_9_while_publishing_serves_nothing_and_burns_the_number(store, tmp_path):
    archive = peft_archive("prompt")
    store.put("acme", "a", archive)
    (tmp_path / "a.zip").write_bytes(archive)
    proc = _python(_KILLED_PUBLISHER, store.root, tmp_path / "a.zip")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert tree(store.root / "tmp") != []  # it really died half-way
    store.close()  # the only other process using the store goes away too: scan() may sweep tmp/
    restarted = AdapterStore(store.root, BASE, LIMITS)
    report = restarted.scan()
    assert [str(i.key) for i in report.served] == ["acme/a@1"] and report.quarantined == ()
    assert tree(store.root / "tmp") == [] and restarted.versions("acme", "a") == [1]
    assert restarted.put("acme", "a", archive).version == 3  # 2 may have been seen by nobody, but is never reused


def test_scan_by_another_replica_keeps_its_uploads_and_trash(store):
    """A replica starting on a shared store must not sweep tmp/ and trash/ under a live one."""
    archive = peft_archive("prompt")
    store.put("acme", "old", archive)
    deleted = store.delete("acme", "old")  # still held by an in-flight request of this replica
    up = store.begin_upload("acme", "x", len(archive))
    up.write(archive[:100])
    other = AdapterStore(store.root, BASE, LIMITS)  # another replica starts meanwhile
    other.scan()
    up.write(archive[100:])
    assert up.commit().version == 1 and other.versions("acme", "x") == [1]
    assert store.load_deleted(deleted, 1).kind is AdapterKind.PROMPT_TUNING
    other.close()
    store.close()
    last = AdapterStore(store.root, BASE, LIMITS)  # alone now: leftovers go
    last.scan()
    assert tree(store.root / "tmp") == [] and tree(store.root / "trash") == []


# ------------------------------------------------------------ quotas and leftovers across replicas (issue 20, 8)

def _quota(max_adapters: int = 100, max_adapter_bytes: int = 1 << 30) -> "UploadQuota":
    return UploadQuota("acme", Quotas(max_adapters, max_adapter_bytes, 8, 8))


def _reservations(root: Path) -> list[str]:
    return tree(root / "reservations")


@pytest.fixture
def pair(tmp_path):
    """Two replicas of one store in one process (each flock is on its own open file, so they
    exclude each other as two processes would)."""
    return AdapterStore(tmp_path / "s", BASE, LIMITS), AdapterStore(tmp_path / "s", BASE, LIMITS)


def test_max_adapters_counts_the_other_stores_uploads_in_flight(pair):
    a, b = pair
    archive, quota = peft_archive("prompt"), _quota(max_adapters=2)
    up_x = a.begin_upload("acme", "x", len(archive), quota=quota)
    up_y = b.begin_upload("acme", "y", len(archive), quota=quota)
    for store, name in ((a, "z"), (b, "z")):
        with pytest.raises(QuotaExceeded, match="stores 2 adapters") as e:
            store.begin_upload("acme", name, len(archive), quota=quota)
        assert e.value.quota == "max_adapters"
    # a name already held (in flight elsewhere, or stored) is a new version, not a new adapter
    with b.begin_upload("acme", "x", len(archive), quota=quota) as up:
        up.write(archive)
        assert up.commit().version == 1
    up_x.write(archive)
    assert up_x.commit().version == 2
    held = a.holdings("acme")
    assert (held.stored_names, held.pending_names) == ({"x"}, {"y"})
    assert (held.stored_bytes, held.pending_bytes) == (2 * len(archive), len(archive))
    up_y.abort()
    assert _reservations(a.root) == [] and a.holdings("acme").names == {"x"}
    assert a.put("acme", "z", archive, quota=quota).version == 1
    with pytest.raises(QuotaExceeded):
        b.put("acme", "w", archive, quota=quota)
    assert b.put("acme", "z", archive, quota=quota).version == 2


def test_max_adapter_bytes_counts_stored_and_in_flight_on_every_store(pair):
    a, b = pair
    archive = peft_archive("prompt")
    quota = _quota(max_adapter_bytes=3 * len(archive) + len(archive) // 2)
    a.put("acme", "one", archive, quota=quota)
    up = b.begin_upload("acme", "two", len(archive), quota=quota)
    a.begin_upload("acme", "three", len(archive), quota=quota).abort()   # 3 fit
    held = a.begin_upload("acme", "three", len(archive), quota=quota)
    with pytest.raises(QuotaExceeded, match="would pass quota max_adapter_bytes") as e:
        b.begin_upload("acme", "four", len(archive), quota=quota)
    assert e.value.quota == "max_adapter_bytes"
    up.abort()
    b.begin_upload("acme", "four", len(archive), quota=quota).abort()
    held.abort()
    assert b.holdings("acme").bytes == len(archive)


def test_a_closed_stores_reservations_never_count(pair):
    """A store that goes away (the process died) mid-upload: its reservation is not counted and the
    next check removes it; the other store's stays."""
    a, b = pair
    archive, quota = peft_archive("prompt"), _quota(max_adapters=2)
    a.begin_upload("acme", "x", len(archive), quota=quota).write(archive[:100])
    live = b.begin_upload("acme", "y", len(archive), quota=quota)
    assert len(_reservations(a.root)) == 2
    a.close()
    held = b.holdings("acme")
    assert held.pending_names == {"y"} and held.pending_bytes == len(archive)
    assert len(_reservations(b.root)) == 1
    with b.begin_upload("acme", "z", len(archive), quota=quota) as up:
        up.write(archive)
        up.commit()
    live.write(archive)
    assert live.commit().version == 1 and _reservations(b.root) == []


def test_abort_while_committing_keeps_the_reservation_until_the_version_appears(pair, monkeypatch):
    """The RPC is cancelled while commit() runs in its thread: the reserved place stays taken."""
    a, b = pair
    archive, quota = peft_archive("prompt"), _quota(max_adapters=1)
    up = a.begin_upload("acme", "x", len(archive), quota=quota)
    up.write(archive)
    real_parse = store_mod.parse_upload

    def parse_while_cancelled(*args):
        up.abort()
        with pytest.raises(QuotaExceeded):
            b.begin_upload("acme", "y", len(archive), quota=quota)
        return real_parse(*args)

    monkeypatch.setattr(store_mod, "parse_upload", parse_while_cancelled)
    assert up.commit().version == 1 and _reservations(a.root) == []
    with pytest.raises(QuotaExceeded):
        b.begin_upload("acme", "y", len(archive), quota=quota)


def test_racing_uploads_through_two_stores_store_exactly_the_quota(pair):
    archive, quota, outcomes = peft_archive("prompt"), _quota(max_adapters=3), []
    start = threading.Barrier(8)

    def upload(store: AdapterStore, name: str) -> None:
        start.wait(30)
        try:
            store.put("acme", name, archive, quota=quota)
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("quota")

    threads = [threading.Thread(target=upload, args=(pair[i % 2], f"n{i}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok"] * 3 + ["quota"] * 5
    assert len({i.name for i in pair[0].list("acme")}) == 3 and _reservations(pair[0].root) == []


def test_sweep_removes_a_dead_stores_leftovers_and_keeps_live_ones(tmp_path):
    archive = peft_archive("prompt")
    dead, live, third = (AdapterStore(tmp_path, BASE, LIMITS) for _ in range(3))
    for s, name in ((dead, "d"), (live, "l")):
        s.put("acme", name, archive)
        s.delete("acme", name)    # its trash: still held by the store's requests
    dead_up = dead.begin_upload("acme", "x", len(archive))
    dead_up.write(archive[:100])
    live_up = live.begin_upload("acme", "y", len(archive))
    live_up.write(archive[:100])
    (dead.tmp / "stale.d").mkdir()
    live_trash = next((tmp_path / "trash" / live._owners.id).iterdir())
    dead.close()   # third still has the store open: no one is alone, ownership decides
    removed = third.sweep()
    assert sorted(p.parent.name for p in removed) == ["tmp", "trash"]
    assert {p.name for p in removed} == {dead._owners.id}
    assert not (tmp_path / "owners" / dead._owners.id).exists()
    assert [p.name for p in live.tmp.iterdir()] == [live_up._path.name] and live_trash.is_dir()
    live_up.write(archive[100:])
    assert live_up.commit().version == 1
    assert third.sweep() == [] and tree(tmp_path / "tmp") == []


def test_entries_no_owner_names_wait_for_being_alone_or_old_age(tmp_path):
    """Leftovers of stores older than owners/: kept while another store is open, unless old."""
    s, other = AdapterStore(tmp_path, BASE, LIMITS), AdapterStore(tmp_path, BASE, LIMITS)
    young, old = tmp_path / "tmp" / "young.part", tmp_path / "trash" / ("0" * 32)
    young.write_bytes(b"x")
    old.mkdir()
    stale = time.time() - owners_mod.LEFTOVER_AGE_S - 60
    os.utime(old, (stale, stale))
    assert s.sweep() == [old] and young.exists()
    s.scan()
    assert young.exists()      # other is open
    other.close()
    s.scan()
    assert not young.exists()  # alone


_WRITER = """
import sys, time
from pathlib import Path
from server.adapters.store import AdapterStore
from server.api.auth import Quotas
from server.api.tenancy import UploadQuota
from tests.unit.adapter_fixtures import BASE, LIMITS
root, name, go, archive = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]).read_bytes()
quota = UploadQuota("acme", Quotas(int(sys.argv[5]), 1 << 30, 8, 8)) if len(sys.argv) > 5 else None
up = AdapterStore(root, BASE, LIMITS).begin_upload("acme", name, len(archive), **({"quota": quota} if quota else {}))
up.write(archive[:100])
print("ready", flush=True)
deadline = time.monotonic() + 120
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to go on")
    time.sleep(0.01)
up.write(archive[100:])
print(up.commit().version, flush=True)
"""


def _parts(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tmp").rglob("*.part"))


def _writers(tmp_path, root, *names_and_args):
    """Start one writer subprocess per (name, *extra args); each stops after writing 100 bytes."""
    archive = tmp_path / "a.zip"
    archive.write_bytes(peft_archive("prompt"))
    procs = [_python(_WRITER, root, name, tmp_path / f"go-{name}", archive, *extra) for name, *extra in names_and_args]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()[-2000:]
    return procs


@pytest.mark.slow
def test_kill_9_writer_leftovers_swept_by_another_live_process(store, tmp_path):
    """A writer killed mid-upload leaves a .part; another replica's scan removes it although a live
    writer (a third process) has the store open too, and leaves that writer's .part alone."""
    killed, live = _writers(tmp_path, store.root, ("dead",), ("alive",))
    try:
        assert len(_parts(store.root)) == 2
        killed.kill()
        killed.wait(30)
        before = _parts(store.root)
        AdapterStore(store.root, BASE, LIMITS).scan()   # a replica (re)starting on the shared store
        after = _parts(store.root)
        assert len(after) == 1 and after[0] in before, (before, after)
        (tmp_path / "go-alive").touch()
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0 and out.split() == ["1"], err[-2000:]
        assert store.versions("acme", "alive") == [1] and _parts(store.root) == []
    finally:
        for p in (killed, live):
            p.kill()


@pytest.mark.slow
def test_kill_9_writer_reservation_never_counts(store, tmp_path):
    """max_adapters=2: a killed writer's reservation frees its place; a live writer's holds its own."""
    killed, live = _writers(tmp_path, store.root, ("dead", 2), ("alive", 2))
    try:
        quota = _quota(max_adapters=2)
        with pytest.raises(QuotaExceeded):
            store.begin_upload("acme", "third", 10, quota=quota)
        killed.kill()
        killed.wait(30)
        up = store.begin_upload("acme", "third", 10, quota=quota)
        assert store.holdings("acme").pending_names == {"alive", "third"}
        up.abort()
        (tmp_path / "go-alive").touch()
        out, err = live.communicate(timeout=60)
        assert live.returncode == 0 and out.split()[-1] == "1", err[-2000:]
    finally:
        for p in (killed, live):
            p.kill()
