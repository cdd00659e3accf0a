"""The decoded-image cache: keys, invalidation, identical pixels in every mode, safe disk writes."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from defect_detection import UserError
from defect_detection.data import cache as cache_mod
from defect_detection.data.cache import (
    DecodeOnAccess,
    MemmapImages,
    cache_key,
    cached_images,
    decode_images,
)
from defect_detection.data.geometry import load_resized
from defect_detection.data.records import ImageRecord, read_mvtec
from defect_detection.data.transforms import build_eval_transform

SIZE = 32


@pytest.fixture
def images(tmp_path, synthetic_root):
    """A private copy of a few synthetic images (tests edit them), plus one RGBA and one gray."""
    records = read_mvtec(synthetic_root, ["disc"])[:6]
    out = []
    for i, r in enumerate(records):
        dst = tmp_path / "imgs" / f"{i}.png"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy(r.path, dst)
        out.append(ImageRecord(str(dst), r.label, r.category, r.defect_type))
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (50, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs/rgba.png")
    Image.fromarray(rng.integers(0, 256, (45, 45), dtype=np.uint8), "L").save(tmp_path / "imgs/gray.png")
    out += [ImageRecord(str(tmp_path / f"imgs/{n}.png"), 0, "disc", "good") for n in ("rgba", "gray")]
    return out


def _stack(store) -> torch.Tensor:
    return torch.stack([store[i] for i in range(len(store))])


def _uncached(path: str, size: int = SIZE) -> torch.Tensor:
    return torch.from_numpy(np.array(load_resized(path, size))).permute(2, 0, 1)


def _rewrite(path: str, seed: int) -> None:
    """A real edit of the file: new pixels, new mtime."""
    arr = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_key_changes_with_file_and_resolution(images):
    paths = [r.path for r in images]
    identity, content = cache_key(paths, SIZE)
    assert cache_key(paths, SIZE) == (identity, content)
    assert cache_key(paths, SIZE * 2)[0] != identity  # another resolution is another entry
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched_identity, touched_content = cache_key(paths, SIZE)
    assert touched_identity == identity and touched_content != content  # same entry, stale contents
    with pytest.raises(UserError, match="Cannot read image"):
        cache_key([*paths, paths[0] + ".missing"], SIZE)


@pytest.mark.parametrize("mode", ["memory", "disk", "none"])
def test_every_mode_gives_the_uncached_pixels(images, tmp_path, mode):
    store = cached_images(images, SIZE, mode, tmp_path / "cache")
    expected = torch.stack([_uncached(r.path) for r in images])
    got = _stack(store)
    assert got.dtype == torch.uint8 and got.shape == (len(images), 3, SIZE, SIZE)
    assert torch.equal(got, expected)


def test_eval_transform_identical_to_uncached_path_and_close_to_predictor(images, tmp_path):
    from defect_detection.models.inference import BasePredictor

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = build_eval_transform(SIZE, mean, std)
    cached = cached_images(images, SIZE, "disk", tmp_path / "cache")
    uncached = DecodeOnAccess([r.path for r in images], SIZE)
    for i in range(len(images)):
        assert torch.equal(transform(cached[i]), transform(uncached[i]))

    predictor = BasePredictor()
    predictor.meta = {"image_size": SIZE, "mean": list(mean), "std": list(std)}
    x = predictor.preprocess([r.path for r in images])
    ours = torch.stack([transform(cached[i]) for i in range(len(images))])
    torch.testing.assert_close(x, ours, rtol=0, atol=1e-5)  # same pixels, float rounding only


def test_disk_cache_is_reused_then_invalidated(images, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = cached_images(images, SIZE, "disk", cache_dir)
    assert isinstance(first, MemmapImages)
    files = sorted(cache_dir.glob("*.npy"))
    assert len(files) == 1 and (cache_dir / ".gitignore").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("a matching cache must not decode again")

    with monkeypatch.context() as patch:
        patch.setattr(cache_mod, "load_rgb", no_decoding)
        again = cached_images(images, SIZE, "disk", cache_dir)
        assert again.path == first.path and torch.equal(_stack(again), _stack(first))

    _rewrite(images[2].path, seed=1)
    changed = cached_images(images, SIZE, "disk", cache_dir)
    assert changed.path != first.path
    assert sorted(cache_dir.glob("*.npy")) == [changed.path]  # the stale entry is replaced
    assert torch.equal(changed[2], _uncached(images[2].path))
    assert not torch.equal(changed[2], first[2]) and torch.equal(changed[0], first[0])

    bigger = cached_images(images, SIZE * 2, "disk", cache_dir)
    assert bigger[0].shape == (3, SIZE * 2, SIZE * 2)
    assert len(list(cache_dir.glob("*.npy"))) == 2  # resolutions are separate entries


def test_no_half_written_file_is_trusted(images, tmp_path):
    cache_dir = tmp_path / "cache"
    good = cached_images(images, SIZE, "disk", cache_dir)
    reference = _stack(good)
    # a truncated final file (e.g. a full disk outside our atomic write) is rejected and rebuilt
    data = good.path.read_bytes()
    good.path.write_bytes(data[: len(data) // 2])
    rebuilt = cached_images(images, SIZE, "disk", cache_dir)
    assert torch.equal(_stack(rebuilt), reference)
    # a run that dies mid-decode publishes nothing and leaves no temp file behind
    broken = tmp_path / "imgs" / "broken.png"
    broken.write_bytes(b"not a png")
    bad = [*images, ImageRecord(str(broken), 1, "disc", "spot")]
    with pytest.raises(UserError, match="broken.png"):
        cached_images(bad, SIZE, "disk", cache_dir)
    identity, content = cache_key([r.path for r in bad], SIZE)
    assert not (cache_dir / f"{identity}-{content}.npy").exists()
    assert not list(cache_dir.glob("*.tmp"))
    # a leftover temp file with the right name pattern is never opened as the cache
    (cache_dir / f".{identity}-{content}.999.deadbeef.tmp").write_bytes(b"garbage")
    broken.unlink()
    assert torch.equal(_stack(cached_images(images, SIZE, "disk", cache_dir)), reference)


def test_memmap_store_pickles_without_its_pixels(images, tmp_path):
    store = cached_images(images, SIZE, "disk", tmp_path / "cache")
    store[0]  # open the memmap
    state = pickle.dumps(store)
    assert len(state) < 1000  # workers reopen the file instead of receiving a copy
    assert torch.equal(pickle.loads(state)[1], store[1])


def test_bad_mode_and_missing_dir_are_user_errors(images):
    with pytest.raises(UserError, match="data.cache='ram'"):
        cached_images(images, SIZE, "ram")
    with pytest.raises(UserError, match="data.cache_dir"):
        cached_images(images, SIZE, "disk", None)
    assert decode_images([], SIZE).shape == (0, 3, SIZE, SIZE)


def test_datamodule_disk_cache_from_config_matches_memory(cfg_factory, tmp_path):
    from defect_detection.pipeline.builders import build_datamodule

    cfg = cfg_factory("data.cache=disk")
    assert cfg.data.num_workers == (0 if not torch.cuda.is_available() else cfg.data.num_workers)
    assert isinstance(cfg.data.num_workers, int) and isinstance(cfg.data.pin_memory, bool)
    disk = build_datamodule(cfg)
    disk.setup("fit")
    assert list((tmp_path / ".cache" / "decoded").glob("*.npy"))  # under paths.root_dir by default
    memory = build_datamodule(cfg_factory("data.cache=memory"))
    memory.setup("fit")
    for stage in ("val", "test"):
        a, b = disk.datasets[stage], memory.datasets[stage]
        assert [r.path for r in disk.records(stage)] == [r.path for r in memory.records(stage)]
        for i in range(len(a)):
            xa, ya, ia = a[i]
            xb, yb, ib = b[i]
            assert torch.equal(xa, xb) and ya == yb and ia == ib == i
            record = disk.records(stage)[i]
            assert ya == record.label


def test_loader_workers_read_the_disk_cache(cfg_factory):
    from defect_detection.pipeline.builders import build_datamodule

    dm = build_datamodule(cfg_factory("data.cache=disk", "data.num_workers=1", "data.batch_size=4"))
    dm.setup("fit")
    loader = dm.val_dataloader()
    assert loader.num_workers == 1 and loader.persistent_workers
    seen = torch.cat([batch.index for batch in loader])
    assert sorted(seen.tolist()) == list(range(len(dm.datasets["val"])))


def test_lightning_fit_keeps_frozen_batchnorm_in_eval(cfg_factory):
    """Lightning 2.x never calls .train() in fit: the module must, or frozen BN trains (and is slower)."""
    import pytorch_lightning as pl

    from defect_detection.pipeline.builders import build_datamodule, build_module

    cfg = cfg_factory("logger=none", "backbone.pretrained=false")
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm.class_counts("train"))
    seen: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(sum(bn.training for bn in pl_module._frozen_bn))

    assert module._frozen_bn and all(bn.training for bn in module._frozen_bn)  # a fresh module
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[Spy()])
    trainer.fit(module, datamodule=dm)
    assert seen == [0]
