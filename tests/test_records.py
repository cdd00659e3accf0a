from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_detection import DEFECT, GOOD, UserError
from defect_detection.data.images import load_rgb
from defect_detection.data.records import check_records, read_folder, read_mvtec
from defect_detection.data.synthetic import DEFECT_TYPES, generate_synthetic


def _img(path: Path, mode: str = "RGB", size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), 128 if mode in ("L", "P") else (10, 200, 30, 255)[: len(mode)]).save(path)
    return path


def test_synthetic_counts_and_masks(synthetic_root):
    records = read_mvtec(synthetic_root, ["disc", "plate", "mesh"])
    assert len(records) == 3 * (6 + 4 + 3 * len(DEFECT_TYPES))
    defects = [r for r in records if r.label == DEFECT]
    assert len(defects) == 3 * 3 * len(DEFECT_TYPES)
    assert all(r.mask_path and Path(r.mask_path).is_file() for r in defects)
    assert all(r.mask_path is None for r in records if r.label == GOOD)
    assert {r.defect_type for r in defects} == set(DEFECT_TYPES)


def test_synthetic_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", ["disc"], 2, 1, 1, 32, seed=3)
    b = generate_synthetic(tmp_path / "b", ["disc"], 2, 1, 1, 32, seed=3)
    for path in sorted(a.rglob("*.png")):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(b / path.relative_to(a))))


def test_small_faint_synthetic_defects_shrink_their_masks_and_keep_the_goods(tmp_path):
    base = generate_synthetic(tmp_path / "a", ["plate"], 2, 1, 3, 64, seed=1)
    small = generate_synthetic(tmp_path / "b", ["plate"], 2, 1, 3, 64, seed=1, defect_scale=0.5,
                               defect_contrast=0.5)
    area = {root: sum(int((np.asarray(Image.open(m)) > 0).sum()) for m in root.rglob("*_mask.png"))
            for root in (base, small)}
    assert 0 < area[small] < 0.6 * area[base]
    for good in sorted((base / "plate" / "train" / "good").glob("*.png")):  # same parts, same rng
        twin = small / good.relative_to(base)
        assert np.array_equal(np.asarray(Image.open(good)), np.asarray(Image.open(twin)))
    with pytest.raises(ValueError, match="defect_scale=0"):
        generate_synthetic(tmp_path / "c", ["plate"], defect_scale=0)


def test_elongated_synthetic_parts_have_full_size_masks_and_defects_along_the_long_side(tmp_path):
    import json

    root = generate_synthetic(tmp_path / "strip", ["plate", "disc"], 2, 1, 4, 32, seed=2, width=512,
                              defect_scale=0.5)
    for image in sorted(root.rglob("*.png")):
        assert Image.open(image).size == (512, 32), image  # PIL: (width, height), masks included
    centres = []
    for mask_path in sorted(root.rglob("*_mask.png")):
        ys, xs = np.nonzero(np.asarray(Image.open(mask_path)))
        assert 0 < len(xs) < 100  # a few pixels, not a stretched square defect
        centres.append(xs.mean())
    assert max(centres) - min(centres) > 128  # spread along the strip, not only in its first square
    assert json.loads((root / ".synthetic.json").read_text())["width"] == 512


def test_synthetic_width_defaults_keep_square_data_and_its_marker(tmp_path):
    import json

    a = generate_synthetic(tmp_path / "a", ["disc", "plate"], 2, 1, 2, 32, seed=3)
    b = generate_synthetic(tmp_path / "b", ["disc", "plate"], 2, 1, 2, 32, seed=3, width=32)
    assert "width" not in json.loads((a / ".synthetic.json").read_text())  # earlier markers stay valid
    assert (a / ".synthetic.json").read_text() == (b / ".synthetic.json").read_text()
    for path in sorted(a.rglob("*.png")):
        assert Image.open(path).size == (32, 32)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(b / path.relative_to(a))))


@pytest.mark.parametrize("width", [16, 100.5, "wide", True])
def test_bad_synthetic_width_names_the_key_and_the_range(tmp_path, width):
    with pytest.raises(ValueError, match=r"width=.*whole number of pixels >= image_size \(32\)"):
        generate_synthetic(tmp_path / "c", ["plate"], image_size=32, width=width)


def test_synthetic_generated_by_two_processes_at_once_is_complete(tmp_path):
    """Parallel sweep trials on a fresh checkout generate the same root at the same time."""
    import multiprocessing

    root, args = tmp_path / "syn", (["disc", "plate"], 10, 2, 3, 64)
    ctx = multiprocessing.get_context("fork")  # both start at once: generation outlasts the fork
    procs = [ctx.Process(target=generate_synthetic, args=(root, *args)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert len(read_mvtec(root, ["disc", "plate"])) == 2 * (10 + 2 + 3 * len(DEFECT_TYPES))
    assert len(list(root.rglob("*_mask.png"))) == 2 * 3 * len(DEFECT_TYPES)
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]  # no temporary folder left behind


def test_mvtec_reader_modes_masks_and_missing_ground_truth(tmp_path):
    cat = tmp_path / "widget"
    _img(cat / "train/good/000.png", "L")
    _img(cat / "train/good/001.png", "RGBA")
    _img(cat / "test/good/000.png")
    _img(cat / "test/crack/000.png")
    _img(cat / "test/crack/001.png")
    _img(cat / "ground_truth/crack/000_mask.png", "L")
    _img(cat / "test/hole/000.png")  # no ground_truth/hole at all
    records = read_mvtec(tmp_path, ["widget"])
    by_name = {(r.defect_type, Path(r.path).name): r for r in records}
    assert by_name[("crack", "000.png")].mask_path.endswith("000_mask.png")
    assert by_name[("crack", "001.png")].mask_path is None
    assert by_name[("hole", "000.png")].mask_path is None
    assert by_name[("good", "000.png")].source_split == "test"
    for r in records:
        im = load_rgb(r.path)
        assert im.mode == "RGB" and im.size == (16, 16)


def test_mvtec_reader_unknown_category_names_it(tmp_path):
    _img(tmp_path / "widget/train/good/000.png")
    with pytest.raises(UserError, match="gadget.*widget"):
        read_mvtec(tmp_path, ["gadget"])


def test_missing_root_names_path(tmp_path):
    with pytest.raises(UserError, match="does-not-exist"):
        read_mvtec(tmp_path / "does-not-exist", ["bottle"])


def test_folder_layout(tmp_path):
    _img(tmp_path / "good/a.png")
    _img(tmp_path / "good/b.jpg")
    _img(tmp_path / "defect/scratch/c.png")
    _img(tmp_path / "defect/d.png")
    records = read_folder(tmp_path, category="line1")
    assert sorted((r.label, r.defect_type) for r in records) == [
        (GOOD, "good"), (GOOD, "good"), (DEFECT, "defect"), (DEFECT, "scratch")]
    check_records(records, str(tmp_path))


def test_one_class_dataset_is_refused(tmp_path):
    _img(tmp_path / "good/a.png")
    (tmp_path / "defect").mkdir()
    with pytest.raises(UserError, match="No defect images"):
        check_records(read_folder(tmp_path), str(tmp_path))


def test_configured_reader_errors_surface_unwrapped(tmp_path):
    from omegaconf import OmegaConf

    from defect_detection.data.records import records_from_config

    cfg = OmegaConf.create({"_target_": "defect_detection.data.records.read_mvtec",
                            "root": str(tmp_path / "missing"), "categories": ["bottle"]})
    with pytest.raises(UserError, match="missing"):
        records_from_config(cfg)


def test_synthetic_line_options_portrait_jitter_grey_few_masks_and_kinds(tmp_path):
    import json

    root = generate_synthetic(tmp_path / "line", ["plate", "disc"], 4, 2, 5, 32, seed=1, height=80,
                              height_jitter=6, grey=True, mask_fraction=0.4, defect_types=["crack", "spot"],
                              defect_scale=0.5)
    records = read_mvtec(root, ["plate", "disc"])
    sizes = {Image.open(r.path).size for r in records}
    assert {w for w, _ in sizes} == {32} and {h for _, h in sizes} <= set(range(80, 87)) and len(sizes) > 3
    assert {Image.open(r.path).mode for r in records} == {"L"}
    defects = [r for r in records if r.label == DEFECT]
    assert {r.defect_type for r in defects} == {"crack", "spot"} and len(defects) == 2 * 2 * 5
    masked = [r for r in defects if r.mask_path]
    assert len(masked) == 2 * 4  # round(0.4 x 10) per category
    for r in masked:
        assert Image.open(r.mask_path).size == Image.open(r.path).size
    ys = [np.nonzero(np.asarray(Image.open(r.mask_path)))[0].mean() for r in masked]
    assert max(ys) > 40  # defects lie anywhere along the tall side, not only in its first square
    marker = json.loads((root / ".synthetic.json").read_text())
    assert marker["height"] == 80 and marker["height_jitter"] == 6 and marker["grey"] is True
    assert marker["mask_fraction"] == 0.4 and marker["defect_types"] == ["crack", "spot"]
    again = generate_synthetic(tmp_path / "again", ["plate", "disc"], 4, 2, 5, 32, seed=1, height=80,
                               height_jitter=6, grey=True, mask_fraction=0.4, defect_types=["crack", "spot"],
                               defect_scale=0.5)
    for path in sorted(root.rglob("*.png")):
        assert path.read_bytes() == (again / path.relative_to(root)).read_bytes()


def test_synthetic_line_option_defaults_keep_earlier_markers(tmp_path):
    import json

    root = generate_synthetic(tmp_path / "a", ["disc"], 2, 1, 1, 32, seed=3, height=32, height_jitter=0,
                              grey=False, mask_fraction=1.0, defect_types=list(DEFECT_TYPES))
    assert set(json.loads((root / ".synthetic.json").read_text())) == {
        "categories", "n_train_good", "n_test_good", "n_per_defect", "image_size", "seed"}


@pytest.mark.parametrize("option, message", [
    ({"height": 16}, r"height=16: must be a whole number of pixels >= image_size \(32\)"),
    ({"height_jitter": -1}, "height_jitter=-1"),
    ({"mask_fraction": 1.5}, r"mask_fraction=1.5: must be in \[0, 1\]"),
    ({"defect_types": ["dent"]}, r"defect_types=\['dent'\]"),
    ({"defect_types": []}, r"defect_types=\[\]"),
])
def test_bad_synthetic_line_options_name_the_key(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "c", ["plate"], image_size=32, **option)
