"""Section 7 (weights, fetch): weights in and out with their metadata, atomic writes, the manifest,
the device choice, and fetching through Pooch from a loopback server or a mirror folder."""
import hashlib
import json
import logging
import os
import pathlib
import shutil
import stat
import time
import warnings

import pooch
import pytest
import torch
from safetensors.torch import save_file

import ddpm_mini as dm
from conftest import TINY_UNET, randomize, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def test_save_and_load_round_trip_with_metadata(tmp_path):
    model = randomize(dm.UNet(**TINY_UNET))
    path = dm.save_weights(model, tmp_path / "m.safetensors", prediction="v", step=12)
    other = dm.UNet(**TINY_UNET)
    meta = dm.load_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert meta["prediction"] == "velocity" and meta["step"] == "12" and meta["format"] == "ddpm-mini"
    rebuilt, meta = dm.load_model(path)
    assert meta["unet"]["channels"] == [8, 16] and meta["schedule"]["T"] == 1000
    assert meta["unet"] == model.config and meta["schedule"] == dm.DEFAULT_SCHEDULE.config()  # decoded from JSON
    assert meta["step"] == "12" and meta["version"] == dm.__version__  # other entries stay strings
    assert not rebuilt.training and torch.equal(rebuilt.conv_in.conv.weight, model.conv_in.conv.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind
    with pytest.raises(ValueError, match=".safetensors"):
        dm.save_weights(model, tmp_path / "m.pt")


def test_save_weights_in_half_precision(tmp_path):
    """dtype=torch.float16 halves the file (the shipped teaching models); loading casts back to float32."""
    model = randomize(dm.UNet(**TINY_UNET), seed=4)
    full = dm.save_weights(model, tmp_path / "full.safetensors", prediction="flow")
    half = dm.save_weights(model, tmp_path / "half.safetensors", dtype=torch.float16, prediction="flow")
    state, _ = dm._read_state_dict(half)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert 0.45 < half.stat().st_size / full.stat().st_size < 0.55
    loaded, meta = dm.load_model(half)
    assert meta["prediction"] == "flow" and meta["unet"] == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float())
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        dm.save_weights(model, tmp_path / "bad.safetensors", dtype=torch.int8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors", "half.safetensors"]


@pytest.mark.parametrize("prefix", ["", "module.", "model.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_torch_checkpoints_with_prefixes(tmp_path, prefix, wrap):
    model = randomize(dm.UNet(**TINY_UNET), seed=3)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save(state if wrap is None else {wrap: state, "step": 5}, tmp_path / "w.pt")
    other = dm.UNet(**TINY_UNET)
    dm.load_weights(other, tmp_path / "w.pt")
    assert torch.equal(other.out[2].conv.weight, model.out[2].conv.weight)


def test_plain_monai_state_dict_loads(tmp_path):
    """The published files are MONAI DiffusionModelUNet state dicts without prefix or metadata."""
    monai_nets = pytest.importorskip("monai.networks.nets")
    kwargs = dict(TINY_UNET)
    ref = randomize(monai_nets.DiffusionModelUNet(**kwargs), seed=4).eval()
    save_file(ref.state_dict(), str(tmp_path / "plain.safetensors"))
    ours = dm.UNet(**kwargs).eval()
    assert dm.load_weights(ours, tmp_path / "plain.safetensors") == {}
    x, t = torch.randn(1, 1, 8, 8, 8), torch.tensor([10])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-4, atol=1e-6)


def test_strict_errors_name_the_problems(tmp_path):
    model = dm.UNet(**TINY_UNET)
    state = dict(model.state_dict())
    del state["conv_in.conv.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["out.2.conv.weight"] = torch.zeros(2, 8, 3, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        dm.load_weights(model, tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "missing keys: conv_in.conv.bias" in message and "unexpected keys: extra.weight" in message
    assert "out.2.conv.weight: file (2, 8, 3, 3, 3) vs model (1, 8, 3, 3, 3)" in message
    with pytest.raises(FileNotFoundError):
        dm.load_weights(model, tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported weights file"):
        dm.load_weights(model, tmp_path / "w.npz")


class Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse first."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="may contain code"):
        dm.load_weights(dm.UNet(**TINY_UNET), tmp_path / "evil.pt")
    assert not marker.exists()


def test_weights_record_the_schedule_and_load_model_decodes_it(tmp_path):
    """save_weights records the schedule it is given (default: DEFAULT_SCHEDULE); load_model decodes
    "unet", "schedule" and "shape", and gives files without a schedule the default's config."""
    model = randomize(dm.UNet(**TINY_UNET), seed=6)
    short = dm.Schedule(T=500, beta_end=0.03)
    path = dm.save_weights(model, tmp_path / "short.safetensors", schedule=short, prediction="flow", shape=[8, 8, 8])
    _, meta = dm.load_model(path)
    assert meta["schedule"] == short.config() and dm.Schedule.from_config(meta["schedule"]) == short
    assert meta["shape"] == [8, 8, 8] and meta["prediction"] == "flow"
    assert json.loads(dm.load_weights(dm.UNet(**TINY_UNET), path)["schedule"]) == short.config()  # stored as JSON
    # a file with a U-Net config but no schedule (e.g. written by an older version)
    save_file(model.state_dict(), str(tmp_path / "old.safetensors"), metadata={"unet": json.dumps(model.config)})
    rebuilt, meta = dm.load_model(tmp_path / "old.safetensors")
    assert meta["schedule"] == dm.DEFAULT_SCHEDULE.config() and meta["unet"] == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))
    # a checkpoint folder: its EMA weights
    folder = tmp_path / "ckpt"
    dm.save_weights(model, folder / "ema.safetensors", schedule=short, prediction="v")
    assert dm.weights_file(folder) == folder / "ema.safetensors"
    assert dm.load_model(folder)[1]["schedule"] == short.config()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither ema.safetensors nor a complete checkpoint"):
        dm.load_model(tmp_path / "empty")


def test_atomic_write_uses_a_fresh_temporary_beside_the_target(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path / "sub" and tmp.exists()  # created (exclusively) before write runs
        tmp.write_text("new")
    target = tmp_path / "sub" / "v.nii.gz"
    assert dm._atomic_write(target, write) == target and target.read_text() == "new"
    dm._atomic_write(target, write)
    tmp = seen[0].name
    assert tmp.startswith(".v.nii.gz.") and tmp.endswith(".tmp.nii.gz")  # suffixes kept: writers pick the format
    assert seen[0] != seen[1]  # mkstemp: a new, unpredictable name each time
    umask = os.umask(0o027)
    try:                       # the permissions of a plain open(), not mkstemp's 0600
        dm._atomic_write(target, write)
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
    finally:
        os.umask(umask)
    def fails(tmp):
        tmp.write_text("partial")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        dm._atomic_write(target, fails)
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["v.nii.gz"]


def test_device_choice_and_torchrun(monkeypatch):
    """As given, else CUDA when available, else the CPU; under torchrun (WORLD_SIZE > 1) a CUDA device
    without an index becomes this process's GPU (LOCAL_RANK)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # as on a GPU machine (nothing runs there)
    assert dm._device("cpu") == torch.device("cpu") and dm._device("cuda") == torch.device("cuda")
    assert dm._device() == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dm._device("cuda") == torch.device("cuda", 1) and dm._device(torch.device("cuda")) == torch.device("cuda", 1)
    assert dm._device("cuda:0") == torch.device("cuda", 0) and dm._device("cpu") == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert dm._device("cuda") == torch.device("cuda")


# ----------------------------------------------------------------------------- the manifest


def test_read_manifest_accepts_a_byte_order_mark_and_names_its_errors(tmp_path, monkeypatch):
    rows = [dict(name="a", kind="volume", url="https://example.org/a.nii.gz", hash="", verified="false"),
            dict(name="b", kind="weights", url="https://example.org/b.safetensors", hash="sha256:" + "1" * 64,
                 verified="true", size=" 12 ")]
    write_manifest(tmp_path / "bom.csv", rows, encoding="utf-8-sig")  # as Excel saves it
    assert (tmp_path / "bom.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
    read = dm.read_manifest(tmp_path / "bom.csv")
    assert list(read) == ["a", "b"] and set(read["a"]) == set(dm.MANIFEST_COLUMNS)
    assert read["b"]["size"] == "12" and read["b"]["hash"] == "sha256:" + "1" * 64  # cells stripped
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(tmp_path / "bom.csv"))
    assert dm.manifest_path() == tmp_path / "bom.csv" and list(dm.read_manifest()) == ["a", "b"]
    write_manifest(tmp_path / "twice.csv", rows + rows[:1])
    with pytest.raises(ValueError, match="'a' appears twice"):
        dm.read_manifest(tmp_path / "twice.csv")
    (tmp_path / "bare.csv").write_text("name,kind\na,volume\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['url', 'hash'\]"):
        dm.read_manifest(tmp_path / "bare.csv")
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(tmp_path / "none.csv"))
    with pytest.raises(FileNotFoundError, match="DDPM_MINI_MANIFEST"):
        dm.read_manifest()
    monkeypatch.delenv("DDPM_MINI_MANIFEST")
    assert dm.manifest_path() == pathlib.Path(dm.__file__).resolve().with_name("data_manifest.csv")
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    assert dm.cache_dir() == tmp_path / "cache"


# ----------------------------------------------------------------------------- fetch


@pytest.fixture
def assets(tmp_path, http_server, monkeypatch):
    """Two small files on a loopback server and a manifest that points at them."""
    root, base = http_server
    (root / "a.bin").write_bytes(b"alpha" * 1000)
    (root / "b.bin").write_bytes(b"beta" * 1000)
    sha = {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in ("a.bin", "b.bin")}
    md5 = hashlib.md5((root / "b.bin").read_bytes()).hexdigest()
    rows = [
        dict(name="a", kind="volume", group="g", url=f"{base}/a.bin", hash=f"sha256:{sha['a.bin']}", verified="true", license="CC0"),
        dict(name="b", kind="volume", group="g", url=f"{base}/b.bin?versionId=xyz", hash=f"md5:{md5}", verified="true", license="CC0"),
        dict(name="wrong", kind="volume", url=f"{base}/a.bin", hash="sha256:" + "0" * 64, verified="true", license="CC0"),
        dict(name="unverified", kind="weights", url=f"{base}/b.bin", hash="", verified="false", license="?"),
        dict(name="ref_only", kind="source", url="", hash="", verified="false", license="DUA"),
    ]
    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, rows)
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(manifest))
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPM_MINI_MIRROR", raising=False)
    return root, base, tmp_path / "cache"


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_fetch_right_hash_then_cache(assets):
    root, base, cache = assets
    path = dm.fetch("a")
    assert path.read_bytes() == (root / "a.bin").read_bytes()
    assert path.parent == cache / "a"
    (root / "a.bin").unlink()  # served from the cache now
    assert dm.fetch("a") == path
    assert dm.fetch("b").name == "b.bin"  # query string dropped, md5 checked


def test_fetch_prefers_the_bundled_copy(assets, tmp_path):
    """A file shipped in weights/ beside the manifest (a checkout, an installed copy) is used, after its
    hash is checked, without any download; without it the url is fetched (Colab)."""
    root, base, cache = assets
    bundled = tmp_path / "weights" / "a.bin"
    bundled.parent.mkdir()
    shutil.copy(root / "a.bin", bundled)
    (root / "a.bin").rename(root / "a.away")           # the server no longer has it
    assert dm.fetch("a").resolve() == bundled.resolve() and files_in(cache) == []
    bundled.write_bytes(b"edited")
    with pytest.raises(ValueError, match=r"a: the bundled file .*a\.bin does not match the manifest hash sha256:"):
        dm.fetch("a")
    bundled.unlink()
    (root / "a.away").rename(root / "a.bin")
    assert dm.fetch("a").parent == cache / "a"           # no bundled copy: downloaded


def test_fetch_wrong_hash_leaves_nothing(assets):
    _, _, cache = assets
    with pytest.raises(ValueError, match="does not match the manifest hash"):
        dm.fetch("wrong")
    assert files_in(cache) == []


def test_fetch_unreachable_names_asset_and_mirror(assets, monkeypatch, closed_port, tmp_path):
    _, _, cache = assets
    monkeypatch.setenv("DDPM_MINI_MIRROR", f"http://127.0.0.1:{closed_port}/assets")
    with pytest.raises(ConnectionError, match=r"'a'.*DDPM_MINI_MIRROR"):
        dm.fetch("a")
    assert files_in(cache) == []


def test_fetch_unverified_warns_once(assets):
    """One warning of the kit's own; Pooch's developer hint (use this hash as known_hash) is not shown."""
    dm._WARNED_UNVERIFIED.discard("unverified")
    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    pooch.get_logger().addHandler(handler)
    try:
        with pytest.warns(UserWarning, match="not verified"):
            dm.fetch("unverified")
    finally:
        pooch.get_logger().removeHandler(handler)
    assert any("Downloading data from" in m for m in shown) and not any("known_hash" in m for m in shown), shown
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.fetch("unverified")


@pytest.mark.parametrize("cells,message", [
    (dict(name="../evil"), r"the name '\.\./evil' is not allowed"),
    (dict(name="a/b"), r"the name 'a/b' is not allowed"),
    (dict(hash="sha256:xyz"), r"x: the hash 'sha256:xyz' is not algorithm:hexdigest"),
    (dict(hash="md5:" + "0" * 31), "x: the hash 'md5:0+' is not algorithm:hexdigest"),
    (dict(hash="crc32:deadbeef"), "x: the hash 'crc32:deadbeef' is not algorithm:hexdigest"),
    (dict(size="12 MB"), r"x: the size '12 MB' is not a number of bytes"),
])
def test_manifest_cells_are_checked_when_read(tmp_path, cells, message):
    """A row that would write outside the cache, or whose hash or size is malformed, is blamed on the manifest."""
    row = {**dict(name="x", kind="volume", url="https://example.invalid/x.bin", hash="", verified="false"), **cells}
    with pytest.raises(ValueError, match=f"manifest .*m.csv: {message}"):
        dm.read_manifest(write_manifest(tmp_path / "m.csv", [row]))


def test_fetch_refuses_a_wrong_size_and_trusts_on_first_use(assets, tmp_path):
    """A download whose size differs from the manifest's is refused and not cached. A file without a published
    hash gets its sha256 recorded at the first download; a later change to the cached file is refused."""
    root, base, cache = assets
    size = (root / "b.bin").stat().st_size
    write_manifest(tmp_path / "manifest.csv", [
        dict(name="short", kind="volume", url=f"{base}/b.bin", hash="", size=str(size + 10), verified="false"),
        dict(name="tofu", kind="volume", url=f"{base}/b.bin", hash="", size=str(size), verified="false")])
    dm._WARNED_UNVERIFIED.update({"short", "tofu"})
    with pytest.raises(ValueError, match=f"short: the file from .*b.bin has {size} bytes, the manifest says {size + 10}"):
        dm.fetch("short")
    assert files_in(cache) == []
    path = dm.fetch("tofu")
    assert files_in(cache) == ["tofu/b.bin", "tofu/b.bin.sha256"]
    assert (cache / "tofu" / "b.bin.sha256").read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert dm.fetch("tofu") == path                                # unchanged: served from the cache
    path.write_bytes(b"x" * size)                                   # same size, other bytes
    with pytest.raises(ValueError, match="tofu: the cached file .* is not the one first downloaded"):
        dm.fetch("tofu")


def test_fetch_removes_the_temporary_of_a_killed_download(assets):
    """Pooch streams into a tmp* file beside the target and renames it when complete: a kill leaves only that
    temporary, which is never served; the next fetch removes it once it is 10 minutes old."""
    root, base, cache = assets
    (cache / "a").mkdir(parents=True)
    stale, fresh = cache / "a" / "tmpkilled", cache / "a" / "tmprunning"
    for f in (stale, fresh):
        f.write_bytes(b"alph")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    path = dm.fetch("a")
    assert path.read_bytes() == (root / "a.bin").read_bytes()
    assert not stale.exists() and fresh.exists()                   # another process may still be writing that one


def test_fetch_errors(assets):
    with pytest.raises(ValueError, match="unknown asset 'nope'.*a, b"):
        dm.fetch("nope")
    with pytest.raises(ValueError, match="cannot be fetched"):
        dm.fetch("ref_only")


def test_mirror_folder_and_url(assets, monkeypatch, tmp_path):
    root, base, cache = assets
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.bin").write_bytes((root / "a.bin").read_bytes())
    (mirror / "b.bin").write_bytes(b"tampered")
    monkeypatch.setenv("DDPM_MINI_MIRROR", str(mirror))
    assert dm.fetch("a").read_bytes() == (root / "a.bin").read_bytes()
    with pytest.raises(ValueError, match="does not match"):
        dm.fetch("b")
    assert files_in(cache) == ["a/a.bin"]
    monkeypatch.setenv("DDPM_MINI_MIRROR", base + "/")
    assert dm.fetch("b").read_bytes() == (root / "b.bin").read_bytes()


def test_fetch_group(assets):
    paths = dm.fetch_group("g", progress=False)
    assert [p.name for p in paths] == ["a.bin", "b.bin"]
    with pytest.raises(ValueError, match="no fetchable assets in group 'zz'"):
        dm.fetch_group("zz")


def test_load_pretrained_through_the_manifest(tmp_path, http_server, monkeypatch):
    """load_pretrained fetches medforj_<prediction>, builds UNet(**MEDFORJ_UNET) and loads it strictly."""
    root, base = http_server
    reference = randomize(dm.UNet(**dm.MEDFORJ_UNET), seed=9, scale=0.02)
    save_file(reference.state_dict(), str(root / "MedForj-weights-flow_ema.safetensors"))
    rows = dm.read_manifest(pathlib.Path(dm.__file__).with_name("data_manifest.csv"))
    write_manifest(tmp_path / "m.csv", rows.values())
    monkeypatch.setenv("DDPM_MINI_MANIFEST", str(tmp_path / "m.csv"))
    monkeypatch.setenv("DDPM_MINI_MIRROR", base)
    monkeypatch.setenv("DDPM_MINI_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="not verified"):
        dm._WARNED_UNVERIFIED.discard("medforj_flow")
        model = dm.load_pretrained("flow", device="cpu")
    assert not model.training
    assert torch.equal(model.middle_block.attention.attn.to_q.weight, reference.middle_block.attention.attn.to_q.weight)


def test_damaged_or_foreign_weights_files_are_clear_errors(tmp_path):
    """Empty, cut-short and renamed files, and metadata that is not JSON, names unknown keywords or asks for a
    far larger U-Net than the file holds (which would allocate gigabytes), are ValueErrors naming the file."""
    good = dm.save_weights(randomize(dm.UNet(**TINY_UNET), seed=1), tmp_path / "good.safetensors", prediction="flow")
    data = good.read_bytes()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickle.safetensors")          # another format, renamed
    for name in ("empty", "short", "pickle"):
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a readable .safetensors file"):
            dm.load_model(tmp_path / f"{name}.safetensors")
    state = {k: v.contiguous() for k, v in dm.UNet(**TINY_UNET).state_dict().items()}
    for unet, message in (("{not json", "its unet/schedule/shape metadata is not valid JSON"),
                          (json.dumps(dict(TINY_UNET, colour="red")), r"its 'unet' metadata must be UNet keywords .*got \['colour'\]"),
                          (json.dumps(dict(TINY_UNET, channels=[4096, 8192])), "its 'unet' metadata describes .* parameters, the file holds")):
        save_file(state, str(tmp_path / "bad.safetensors"), metadata={"unet": unet})
        with pytest.raises(ValueError, match=f"bad.safetensors: {message}"):
            dm.load_model(tmp_path / "bad.safetensors")
