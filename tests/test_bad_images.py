"""Bad image files: each gets a precise reason; error lists all of them before training, skip drops
them and logs the list; unusual but valid modes load as RGB."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from mlflow import MlflowClient
from PIL import Image

from defect_detection import UserError
from defect_detection.data.images import DEFAULT_MAX_PIXELS, load_rgb, set_max_image_pixels
from defect_detection.data.records import read_mvtec
from defect_detection.data.validate import check_image, safe_image_paths, screen_records
from defect_detection.pipeline.builders import build_datamodule
from defect_detection.pipeline.fit import train


@pytest.fixture(autouse=True)
def default_pixel_limit():
    """The pixel limit is process-wide (PIL's); every test starts and ends at the default."""
    set_max_image_pixels(DEFAULT_MAX_PIXELS)
    yield
    set_max_image_pixels(DEFAULT_MAX_PIXELS)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height: a decompression bomb needs no real pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def _noise(path: Path, size: int = 32, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, **save)
    return path


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words its reason must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is a text file, not a PNG\n")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "dangling.png").symlink_to("no-such-file.png")
    return {
        "zero-byte": (folder / "empty.png", "empty file (0 bytes)"),
        "text named .png": (folder / "notes.png", "not an image PIL can identify"),
        "truncated PNG (half)": (_truncate(_noise(folder / "half.png")), "truncated"),
        "truncated PNG (no IEND)": (_truncate(_noise(folder / "tail.png"), 0.98), "truncated"),
        "truncated JPEG": (_truncate(_noise(folder / "half.jpg", 64, quality=90)), "truncated"),
        "decompression bomb": (_png_header_only(folder / "bomb.png", 100_000, 100_000), "too many pixels"),
        "huge dimensions": (_png_header_only(folder / "huge.png", 12_000, 9_000), "too many pixels"),
        "symlink loop": (folder / "loop.png", "symlink loop"),
        "broken symlink": (folder / "dangling.png", "broken symlink"),
    }


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # we refuse, PIL only warns
def test_every_bad_file_gets_a_precise_reason(tmp_path):
    for name, (path, words) in make_bad_files(tmp_path).items():
        reason = check_image(path)
        assert reason and words in reason, (name, reason)
        with pytest.raises(UserError, match=f"Cannot read image {path}"):
            load_rgb(path)  # the decode path says the same


def _modes(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """name -> (file, expected RGB of pixel (0, 0))."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(folder / "gray16.png")
    out["16-bit grayscale"] = (folder / "gray16.png", (156, 156, 156))  # 40000 >> 8
    Image.new("L", (8, 8), 77).save(folder / "gray.png")
    out["grayscale"] = (folder / "gray.png", (77, 77, 77))
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette.save(folder / "palette.png")
    out["palette"] = (folder / "palette.png", (200, 30, 10))
    palette.save(folder / "palette_transparent.png", transparency=1)
    out["palette + transparency"] = (folder / "palette_transparent.png", (0, 0, 0))
    Image.new("RGBA", (8, 8), (200, 100, 50, 255)).save(folder / "rgba.png")
    out["RGBA (opaque)"] = (folder / "rgba.png", (200, 100, 50))
    Image.new("RGBA", (8, 8), (200, 100, 50, 0)).save(folder / "rgba_clear.png")
    out["RGBA (transparent)"] = (folder / "rgba_clear.png", (0, 0, 0))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)
    out["CMYK JPEG"] = (folder / "cmyk.jpg", (255, 0, 0))
    Image.new("1", (8, 8), 1).save(folder / "bilevel.png")
    out["1-bit"] = (folder / "bilevel.png", (255, 255, 255))
    Image.new("F", (8, 8), 0.5).save(folder / "float.tif")
    out["32-bit float TIFF (0..1)"] = (folder / "float.tif", (127, 127, 127))
    return out


def test_unusual_modes_are_valid_and_load_as_rgb(tmp_path):
    for name, (path, rgb) in _modes(tmp_path).items():
        assert check_image(path) is None, name
        im = load_rgb(path)
        assert im.mode == "RGB" and im.size == (8, 8), name
        assert np.allclose(im.getpixel((0, 0)), rgb, atol=3), (name, im.getpixel((0, 0)))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_is_configurable(tmp_path):
    big = _noise(tmp_path / "big.png", 200)
    assert check_image(big) is None
    set_max_image_pixels(10_000)
    assert "too many pixels (40,000, limit 10,000)" in check_image(big)  # PIL's own error at > 2x
    reason = check_image(_noise(tmp_path / "wide.png", 120))  # between 1x and 2x: PIL only warns
    assert "120 x 120 = 14,400, limit 10,000" in reason and "data.max_image_pixels" in reason
    set_max_image_pixels(None)  # no limit: even the 10-gigapixel header passes the size check
    header_only = _png_header_only(tmp_path / "b.png", 100_000, 100_000)
    assert "too many pixels" not in (check_image(header_only) or "")


def _dataset(cfg) -> Path:
    """Generate the synthetic tree of `cfg` and return its disc/ folder."""
    instantiate(cfg.data.records)
    return Path(cfg.data.root) / "disc"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_error_policy_lists_every_bad_file_before_training(cfg_factory):
    cfg = cfg_factory("data.categories=[disc]")
    disc = _dataset(cfg)
    bad = {**make_bad_files(disc / "train" / "good"), "in test": (disc / "test" / "crack" / "x.png", "empty")}
    (disc / "test" / "crack" / "x.png").write_bytes(b"")
    with pytest.raises(UserError) as info:
        build_datamodule(cfg)
    message = str(info.value)
    assert f"{len(bad)} bad image file(s) under data.root=" in message
    for path, words in bad.values():
        assert f"{path}: " in message and words in message.split(f"{path}: ")[1].splitlines()[0], path
    assert "data.on_bad_image=skip" in message


def test_bad_mask_is_reported_and_skip_keeps_its_image(cfg_factory):
    cfg = cfg_factory("data.categories=[disc]", "data.on_bad_image=skip")
    disc = _dataset(cfg)
    mask = disc / "ground_truth" / "crack" / "000_mask.png"
    mask.write_bytes(b"")
    with pytest.raises(UserError, match=rf"{mask}: empty file \(0 bytes\) \(mask\)"):
        screen_records(read_mvtec(disc.parent, ["disc"]), "error", progress=False)
    kept, bad = screen_records(read_mvtec(disc.parent, ["disc"]), "skip", progress=False)
    [record] = [r for r in kept if r.path.endswith("crack/000.png")]
    assert record.mask_path is None and [b.role for b in bad] == ["mask"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_skip_policy_drops_bad_files_and_logs_them_to_the_run(cfg_factory, caplog):
    cfg = cfg_factory("data.categories=[disc]", "data.on_bad_image=skip", "log_model=false",
                      "explain=none", "log_data_summary=false")
    disc = _dataset(cfg)
    bad = make_bad_files(disc / "train" / "good")
    result = train(cfg)
    assert "Skipped 9 bad image(s)" in caplog.text
    client = MlflowClient(cfg.logger.tracking_uri)
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    table = pd.read_csv(client.download_artifacts(result["run_id"], "data/bad_images.csv"))
    assert sorted(table["path"]) == sorted(str(p) for p, _ in bad.values())
    assert list(table.columns) == ["path", "reason", "role", "category", "defect_type"]


def test_symlink_loops_in_the_tree_do_not_hang_the_readers(tmp_path):
    cat = tmp_path / "widget"
    for p in ("train/good/0.png", "train/good/1.png", "test/crack/0.png"):
        _noise(cat / p)
    (cat / "test" / "up").symlink_to("..")  # a folder loop: test/up/test/up/...
    (cat / "test" / "self").symlink_to("self")  # a folder link to itself
    (cat / "train" / "good" / "loop.png").symlink_to("loop.png")
    records = read_mvtec(tmp_path, ["widget"])  # returns: the readers never recurse
    assert {Path(r.path).name for r in records} == {"0.png", "1.png", "loop.png"}
    kept, bad = screen_records(records, "skip", progress=False)
    assert [(Path(b.path).name, b.reason.split(" (")[0]) for b in bad] == [("loop.png", "symlink loop")]
    assert len(kept) == 3


def test_safe_image_paths_refuses_paths_outside_the_input_root(tmp_path):
    inside, outside = tmp_path / "input", tmp_path / "elsewhere"
    _noise(inside / "a.png")
    _noise(inside / "sub" / "b.png")
    secret = _noise(outside / "secret.png")
    assert [p.name for p in safe_image_paths(inside)] == ["a.png", "b.png"]

    (inside / "link.png").symlink_to(secret)
    with pytest.raises(UserError, match=f"{inside / 'link.png'} resolves to {secret}, outside the input"):
        safe_image_paths(inside)
    assert len(safe_image_paths(inside, follow_symlinks=True)) == 3
    (inside / "link.png").unlink()

    (inside / "linked_dir").symlink_to(outside)
    with pytest.raises(UserError, match="secret.png resolves to .*outside the input root"):
        safe_image_paths(inside)
    (inside / "linked_dir").unlink()

    with pytest.raises(UserError, match="outside the input root"):
        safe_image_paths(f"{inside}/*/../../elsewhere/*.png")
    (inside / "loop").symlink_to(inside)  # a folder loop is walked once, never forever
    assert [p.name for p in safe_image_paths(inside)] == ["a.png", "b.png"]
    (inside / "gone.png").symlink_to(inside / "missing.png")
    with pytest.raises(UserError, match="gone.png is a broken symlink"):
        safe_image_paths(inside)
    (inside / "gone.png").unlink()
    with pytest.raises(UserError, match="Input not found"):
        safe_image_paths(tmp_path / "nothing")
    assert safe_image_paths(inside / "a.png") == [inside / "a.png"]
    assert os.path.isabs(safe_image_paths(f"{inside}/*.png")[0])
