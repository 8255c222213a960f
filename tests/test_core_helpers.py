"""paths, io and device: the small helpers everything else relies on."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cirlib.core import device, io, paths
from cirlib.core.cache import read_keyed_tensor


def test_project_root_from_env_and_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.ROOT_ENV, str(tmp_path))
    assert paths.project_root() == tmp_path.resolve()
    assert paths.data_dir(quick=True) == tmp_path.resolve() / "data" / "quick"
    assert paths.figures_dir(quick=False) == tmp_path.resolve() / "figures"
    assert paths.figures_dir(quick=True).is_dir() and paths.figures_dir(quick=True).parent.name == "quick"
    monkeypatch.delenv(paths.ROOT_ENV)
    assert (paths.project_root() / "cirlib" / "core" / "paths.py").is_file()


def test_atomic_path_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    io.write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in target.parent.iterdir()] == ["a.json"], "no temporary file may be left behind"


def test_fingerprint_is_order_independent_for_keys_and_sensitive_to_values(tmp_path: Path) -> None:
    assert io.fingerprint({"a": 1, "b": 2}) == io.fingerprint({"b": 2, "a": 1})
    assert io.fingerprint({"a": 1}) != io.fingerprint({"a": 2})
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert io.file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_device_selection() -> None:
    assert device.get_device("cpu") == torch.device("cpu")
    assert device.get_device(torch.device("cpu")) == torch.device("cpu")
    auto = device.get_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-bf16"])
def test_cpu_autocast_follows_native_bf16(monkeypatch, native: bool) -> None:
    """bf16 only on CPUs that have it in hardware; fp32 elsewhere and whenever amp is off."""
    monkeypatch.delenv(device.PRECISION_ENV, raising=False)  # simulate the default switch
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: native)
    cpu = torch.device("cpu")
    x = torch.ones(2, 2)
    with device.autocast(cpu):
        assert (x @ x).dtype == (torch.bfloat16 if native else torch.float32)
    with device.autocast(cpu, enabled=False):
        assert (x @ x).dtype == torch.float32
    assert device.precision(cpu) == ("cpu-bfloat16" if native else "cpu-float32")
    assert device.precision(cpu, enabled=False) == "cpu-float32"
    assert device.amp_dtype(torch.device("mps")) is None
    assert not device.grad_scaler(cpu).is_enabled()  # bf16 needs no loss scaling


def test_native_cpu_bf16_matches_torch_probes() -> None:
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert device.native_cpu_bf16() == expected


def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    path = io.write_text(tmp_path / "p.txt", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~io._UMASK


def test_precision_switch_forces_fp32(monkeypatch) -> None:
    """$CIRLIB_PRECISION=fp32 turns autocast off even on a bf16 CPU, and is part of the precision key."""
    monkeypatch.setattr(device, "native_cpu_bf16", lambda: True)
    cpu = torch.device("cpu")
    monkeypatch.setenv(device.PRECISION_ENV, "fp32")
    assert device.amp_dtype(cpu) is None and device.precision(cpu) == "cpu-float32"
    x = torch.ones(2, 2)
    with device.autocast(cpu):
        assert (x @ x).dtype == torch.float32
    monkeypatch.setenv(device.PRECISION_ENV, "auto")
    assert device.precision(cpu) == "cpu-bfloat16"
    monkeypatch.setenv(device.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="CIRLIB_PRECISION"):
        device.amp_dtype(cpu)


def test_atomic_writes_keep_the_usual_permissions(tmp_path: Path) -> None:
    """Writers that replace the temporary file (safetensors' save_file makes it 0600) do not leak that mode."""
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    with io.atomic_path(tmp_path / "w.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    io.write_json(tmp_path / "a.json", {"x": 1})
    for name in ("w.safetensors", "a.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_stale_temporaries_are_swept_by_the_next_write(tmp_path: Path) -> None:
    """A SIGKILLed writer leaves its temporary file; the next atomic write to the folder removes it."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = io._HOST
    orphan = tmp_path / f".ckpt.safetensors.{host}-{dead.pid}.abcd1234.tmp"  # owner gone
    live = tmp_path / f".other.json.{host}-{os.getpid()}.efgh5678.tmp"  # a write in progress here
    old = tmp_path / ".legacy.json.ijkl9012.tmp"  # no owner recorded, hours old
    fresh = tmp_path / ".recent.json.mnop3456.tmp"  # no owner recorded, may be in progress
    unrelated = tmp_path / "notes.tmp"
    for p in (orphan, live, old, fresh, unrelated):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 2 * io.STALE_TMP_AGE_S,) * 2)
    io.write_json(tmp_path / "a.json", {"x": 1})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["a.json", live.name, fresh.name, unrelated.name])


def test_eval_mode_restores_each_flag_and_ignores_none() -> None:
    from cirlib.core.tensors import eval_mode

    a, b = torch.nn.Dropout(), torch.nn.Dropout()
    b.eval()
    with eval_mode(a, None, b):
        assert not a.training and not b.training
    assert a.training and not b.training
    with pytest.raises(RuntimeError), eval_mode(a):
        raise RuntimeError("flags come back on errors too")
    assert a.training


def test_row_chunks_cover_rows_once_within_budget() -> None:
    from cirlib.core.tensors import row_chunks

    chunks = list(row_chunks(10, 4, chunk_elements=12))
    assert [(s.start, s.stop) for s in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [(s.start, s.stop) for s in row_chunks(3, 100, chunk_elements=10)] == [(0, 1), (1, 2), (2, 3)]
    assert list(row_chunks(0, 5)) == []
    with pytest.raises(ValueError):
        list(row_chunks(-1, 5))


def test_cache_key_entry_save_and_load(tmp_path: Path) -> None:
    from cirlib.core import cache, digests

    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    key = cache.cache_key({"size": 3}, [src])
    # the key of every cache entry written since CACHE_VERSION 2: keeping it keeps old entries valid
    assert key == io.fingerprint({"version": cache.CACHE_VERSION, "size": 3, "files": digests.sized_digests([src])})
    assert cache.cache_key({"size": 4}, [src]) != key
    entry = cache.cache_entry(tmp_path / "c", "test", "things", ".txt", {"size": 3}, [src])
    assert entry.file == tmp_path / "c" / f"things-{key}.txt" and entry.key == key
    assert entry.load(lambda f: f.read_text()) is None  # absent: no warning, nothing to read
    entry.save(lambda tmp: tmp.write_text("cached"))
    assert entry.load(lambda f: f.read_text()) == "cached"

    def distrust(f: Path) -> str:
        raise ValueError("wrong shape")

    with pytest.warns(UserWarning, match=r"test cache .*things-.* is unusable \(wrong shape\); recomputing"):
        assert entry.load(distrust) is None
    src.write_bytes(b"abd")  # same size, other bytes
    assert cache.cache_key({"size": 3}, [src]) != key


def test_generator_meta_round_trip_and_errors(tmp_path: Path) -> None:
    from cirlib.data.synth import meta

    root = tmp_path / "root"
    with pytest.raises(FileNotFoundError, match=r"root/cirlib_meta.json not found"):
        meta.read_meta(root)
    assert meta.peek_meta(root) is None
    root.mkdir()
    written = {"generator": "g/1", "fingerprint": "f", "attributes": {"img": {"colour": "red"}}}
    assert meta.write_meta(root, written) == root / meta.META_FILE
    assert meta.read_meta(root, {"g/1"}) == written == meta.peek_meta(root)
    with pytest.raises(ValueError, match=r"cirlib_meta.json: field 'generator' is 'g/1', expected 'h/2'"):
        meta.read_meta(root, {"h/2"})
    (root / meta.META_FILE).write_text(json.dumps({"generator": "g/1", "attributes": []}))
    with pytest.raises(ValueError, match=r"cirlib_meta.json: field 'attributes' must be an object"):
        meta.read_meta(root)
    (root / meta.META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"cirlib_meta.json: not valid UTF-8 JSON"):
        meta.read_meta(root)
    assert meta.peek_meta(root) is None


def test_tensor_digest_keys_values_and_shape() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert io.tensor_digest(x) == io.tensor_digest(x.clone().double())  # the fp32 values, not the dtype
    assert io.tensor_digest(x) != io.tensor_digest(x.view(2, 3))  # same bytes, another shape
    assert io.tensor_digest(x) != io.tensor_digest(x + 1e-3)
    assert io.tensor_digest(x, x) != io.tensor_digest(x)


def test_read_keyed_tensor_checks_key_shape_and_dtype(tmp_path: Path) -> None:
    file = tmp_path / "t.safetensors"
    save_file({"tokens": torch.ones(3, 4)}, str(file), metadata={"key": "k1"})
    assert read_keyed_tensor(file, "k1", "tokens", (3, None), torch.float32).shape == (3, 4)
    for key, shape, dtype, message in (("k2", (3, None), torch.float32, "key does not match"),
                                       ("k1", (2, None), torch.float32, r"expected \(2, '\*'\)"),
                                       ("k1", (3, 4, 1), torch.float32, "holds"),
                                       ("k1", (3, 4), torch.float16, "float16")):
        with pytest.raises(ValueError, match=message):
            read_keyed_tensor(file, key, "tokens", shape, dtype)


def test_cache_entry_tensor_round_trip_and_mismatch(tmp_path: Path) -> None:
    from cirlib.core.cache import cache_entry

    entry = cache_entry(tmp_path, "feature", "t", ".safetensors", {"model": "m"}, [])
    assert entry.load_tensor("features", (3, None), torch.float32) is None  # absent: nothing to warn about
    values = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert entry.save_tensor("features", values) == entry.file
    assert torch.equal(entry.load_tensor("features", (3, None), torch.float32), values)
    assert [p.name for p in tmp_path.iterdir()] == [entry.file.name]  # no temporary file left
    other = cache_entry(tmp_path, "feature", "t", ".safetensors", {"model": "other"}, [])
    other.file.write_bytes(entry.file.read_bytes())  # a file whose key names other inputs
    with pytest.warns(UserWarning, match="key does not match"):
        assert other.load_tensor("features", (3, None), torch.float32) is None
    with pytest.warns(UserWarning, match="expected"):
        assert entry.load_tensor("features", (4, None), torch.float32) is None
