"""Registry: name / name@N resolution, refcounts, hot swap under threads, delete while in use."""
from __future__ import annotations

import threading

import pytest
import torch

from server.adapters.cache import AdapterCache
from server.adapters.refs import AdapterKey, parse_tenant_ref as tref
from server.adapters.registry import AdapterRef, AdapterRegistry
from server.adapters.store import AdapterStore
from server.errors import InvalidArgument, NotFound
from tests.unit.adapter_fixtures import BASE, LIMITS, bottleneck_archive, peft_archive, tree


@pytest.fixture
def store(tmp_path):
    return AdapterStore(tmp_path, BASE, LIMITS)


def test_resolve_latest_and_pinned(store):
    reg = AdapterRegistry(store)
    reg.put("acme", "a", peft_archive("prompt"))
    reg.put("acme", "a", peft_archive("lora"))
    latest = reg.resolve(tref("acme", "a"))
    assert latest == AdapterRef(AdapterKey("acme", "a", 2), latest.kind, "a") and latest.kind.value == "LORA"
    pinned = reg.resolve(tref("acme", "a@1"))
    assert (pinned.key.version, pinned.kind.value, str(pinned.key)) == (1, "PROMPT_TUNING", "acme/a@1")
    assert reg.in_flight(AdapterKey.parse("acme/a@2")) == 1 and reg.in_flight(AdapterKey.parse("acme/a@1")) == 1
    reg.release(latest)
    reg.release(pinned)
    assert reg.in_flight(AdapterKey.parse("acme/a@2")) == 0
    with pytest.raises(ValueError, match="not held"):
        reg.release(pinned)
    with pytest.raises(Exception):
        latest.display = "x"  # frozen


def test_not_found_never_reveals_other_tenants(store):
    reg = AdapterRegistry(store)
    reg.put("acme", "secret", peft_archive("prompt"))
    messages = set()
    for tenant, ref in [("beta", "secret"), ("beta", "nothing"), ("acme", "secret@2"), ("nobody", "secret@1")]:
        with pytest.raises(NotFound) as info:
            reg.resolve(tref(tenant, ref))
        messages.add(str(info.value).replace(ref, "<ref>"))
    assert messages == {"adapter '<ref>' not found"}
    with pytest.raises(NotFound):
        reg.delete("beta", "secret")
    assert reg.list("beta") == [] and [str(i.key) for i in reg.list("acme")] == ["acme/secret@1"]


@pytest.mark.parametrize("tenant, ref", [("acme", "../a"), ("acme", "a@0"), ("acme", "A"), ("ACME", "a"),
                                         ("acme", "a@x"), ("acme", ""), ("a/b", "a"), ("acme", "\u0430")])
def test_resolve_validates_input(store, tenant, ref):
    with pytest.raises(InvalidArgument):
        AdapterRegistry(store).resolve(tref(tenant, ref))


def test_parse_key():
    assert AdapterKey.parse("acme/a.b@12") == AdapterKey("acme", "a.b", 12)
    assert str(AdapterKey("acme", "a.b", 12)) == "acme/a.b@12"
    for bad in ("acme/a", "acme@1", "acme/a@0", "../a@1", "acme/a/b@1"):
        with pytest.raises(InvalidArgument):
            AdapterKey.parse(bad)


def test_streaming_upload_publishes_on_commit_only(store):
    reg = AdapterRegistry(store)
    archive = peft_archive("ia3")
    with pytest.raises(RuntimeError):
        with reg.begin_upload("acme", "s", len(archive)) as up:
            up.write(archive[:100])
            raise RuntimeError("cancelled")
    with pytest.raises(NotFound):
        reg.resolve(tref("acme", "s"))
    with reg.begin_upload("acme", "s", len(archive)) as up:
        up.write(archive)
        assert up.commit().version == 1
    assert reg.resolve(tref("acme", "s")).version == 1


def test_built_from_scan_serves_only_verified(store):
    store.put("acme", "a", peft_archive("prompt"))
    store.put("acme", "b", peft_archive("prompt"))
    path = store.root / "adapters" / "acme" / "b" / "v1" / "adapter.zip"
    path.write_bytes(path.read_bytes()[:-5])
    reg = AdapterRegistry(store, store.scan().served)
    assert reg.resolve(tref("acme", "a")).version == 1
    with pytest.raises(NotFound):
        reg.resolve(tref("acme", "b"))


def test_publish_of_a_version_deleted_meanwhile_is_ignored(store):
    reg = AdapterRegistry(store)
    info = store.put("acme", "a", peft_archive("prompt"))  # committed, not yet published ...
    store.delete("acme", "a")  # ... and deleted before the publish
    reg.publish(info)
    with pytest.raises(NotFound):
        reg.resolve(tref("acme", "a"))


def _first_value(weights) -> float:
    return float(weights.bottleneck[(0, "attn")].down[0, 0])


def test_hot_swap_under_concurrent_resolves(store):
    reg = AdapterRegistry(store)
    versions = {reg.put("acme", "hot", bottleneck_archive(seed=0)).version: 0}
    stop, errors, seen = threading.Event(), [], []

    def request_loop():
        last = 0
        while not stop.is_set():
            try:
                ref = reg.resolve(tref("acme", "hot"))
                first = _first_value(reg.load(ref.key))
                second = _first_value(reg.load(ref.key))  # a newer upload landed meanwhile, maybe
                if first != second or ref.version < last:
                    errors.append(f"holder of {ref.key} saw {first} then {second} (last {last})")
                seen.append((ref.version, first))
                last = ref.version
                reg.release(ref)
            except Exception as e:  # any failed resolve is a bug
                errors.append(repr(e))

    threads = [threading.Thread(target=request_loop) for _ in range(4)]
    for t in threads:
        t.start()
    for seed in (1, 2, 3):
        info = reg.put("acme", "hot", bottleneck_archive(seed=seed))
        versions[info.version] = seed
        after = reg.resolve(tref("acme", "hot"))  # every request resolved after the upload uses it
        assert after.version == info.version
        reg.release(after)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    values = {v: _first_value(reg.load(AdapterKey("acme", "hot", v))) for v in versions}
    assert len(set(values.values())) == 4  # the versions really differ
    assert all(values[version] == value for version, value in seen)  # each ref saw its own version
    assert all(reg.in_flight(f"acme/hot@{v}") == 0 for v in versions)


def test_delete_while_in_use(store):
    reg = AdapterRegistry(store)
    freed = []

    def drain():
        while not reg.freed.empty():
            freed.append(str(reg.freed.get_nowait()))
    reg.put("acme", "a", peft_archive("prompt"))
    reg.put("acme", "a", peft_archive("prompt"))
    held = reg.resolve(tref("acme", "a"))  # v2, a running request
    assert reg.delete("acme", "a") == (1, 2)
    drain()
    assert freed == ["acme/a@1"]  # nobody held v1: freed at once
    with pytest.raises(NotFound):
        reg.resolve(tref("acme", "a"))
    with pytest.raises(NotFound):
        reg.resolve(tref("acme", "a@2"))
    assert reg.list("acme") == []
    weights = reg.load(held.key)  # the running request can still (re)load its weights
    assert weights.prompt_embeds.shape == (6, BASE.hidden_size)
    assert len(list((store.root / "trash").iterdir())) == 1
    reg.release(held)
    drain()
    assert freed == ["acme/a@1", "acme/a@2"]
    assert tree(store.root / "trash") == []
    with pytest.raises(NotFound):
        reg.load(held.key)  # nobody may use it any more
    assert reg.put("acme", "a", peft_archive("prompt")).version == 3
    assert reg.resolve(tref("acme", "a")).version == 3


def test_last_release_frees_cache_memory(store):
    reg_box = []
    written = {}
    cache = AdapterCache(num_slots=2, max_host_entries=4, max_host_bytes=1 << 20,
                         load_from_disk=lambda key: reg_box[0].load(key),
                         write_slot=lambda slot, w: written.__setitem__(slot, w))
    reg = AdapterRegistry(store)

    def engine_drains_freed():   # what the engine loop does each iteration
        while not reg.freed.empty():
            cache.invalidate(reg.freed.get_nowait())
    reg_box.append(reg)
    reg.put("acme", "a", peft_archive("prompt"))
    ref = reg.resolve(tref("acme", "a"))
    slot = cache.acquire(ref.key)
    assert slot is not None and cache.stats().host_entries == 1
    reg.delete("acme", "a")  # in use: nothing freed yet
    engine_drains_freed()
    assert cache.slot_of(ref.key) == slot
    cache.release(ref.key)  # the engine finishes the request ...
    reg.release(ref)  # ... and drops its ref: freed -> invalidate
    engine_drains_freed()
    stats = cache.stats()
    assert cache.slot_of(ref.key) is None and stats.host_entries == 0 and stats.host_bytes == 0
    with pytest.raises(NotFound):
        cache.acquire(ref.key)


def test_concurrent_resolve_release_keeps_counts(store):
    reg = AdapterRegistry(store)
    reg.put("acme", "a", peft_archive("prompt"))

    def worker():
        for _ in range(200):
            reg.release(reg.resolve(tref("acme", "a")))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    held = reg.resolve(tref("acme", "a@1"))
    for t in threads:
        t.join()
    assert reg.in_flight(AdapterKey.parse("acme/a@1")) == 1
    reg.release(held)
    assert reg.in_flight(AdapterKey.parse("acme/a@1")) == 0
    assert torch.is_tensor(reg.load(AdapterKey.parse("acme/a@1")).prompt_embeds)
