"""Near-duplicate audit: a re-shot photo of one part in two splits is named; other photos are not."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from defect_detection import DEFECT, GOOD
from defect_detection.data import near_duplicates as nd
from defect_detection.data.audit import audit_records, check_near_duplicates
from defect_detection.data.records import ImageRecord


def _part(seed: int, size=(384, 192)) -> np.ndarray:
    """A smooth random surface with some fine detail: a different seed is a different part."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (size[1], size[0]), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(4))
    return np.asarray(coarse, np.float32) * 2 - 128 + rng.normal(0, 3, (size[1], size[0]))


def _save(path, pixels) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").save(path)
    return str(path)


def _reshot(pixels: np.ndarray, seed: int) -> np.ndarray:
    """The same part photographed again: new sensor noise, a little brighter."""
    return pixels + 4 + np.random.default_rng(seed).normal(0, 1.5, pixels.shape)


def _line(tmp_path):
    """Six different good parts, one of them re-shot (and its re-shot copy pitted), one byte copy."""
    parts = [_part(s) for s in range(6)]
    paths = [_save(tmp_path / f"good/{i}.png", p) for i, p in enumerate(parts)]
    twin = _save(tmp_path / "defect/pitting/0_again.png", _reshot(parts[0], 99))
    copy = tmp_path / "good/5_copy.png"
    copy.write_bytes((tmp_path / "good/5.png").read_bytes())
    records = [ImageRecord(p, GOOD, "line", "good") for p in paths]
    records += [ImageRecord(twin, DEFECT, "line", "pitting"), ImageRecord(str(copy), GOOD, "line", "good")]
    return records, paths, twin, str(copy)


def test_reshot_part_across_splits_is_named_with_both_files(tmp_path):
    records, paths, twin, copy = _line(tmp_path)
    assignment = {r.path: "train" for r in records} | {twin: "test", copy: "val"}
    found = check_near_duplicates(records, assignment)
    assert [w.check for w in found] == ["near_duplicate_across_splits"]
    assert found[0].paths == (twin, paths[0])  # the pair; the byte copy is check_duplicates' job
    assert "0_again.png (test) ~ 0.png (train)" in found[0].message
    assert "split.make.groups" in found[0].message
    checks = {w.check for w in audit_records(records, assignment)}
    assert {"near_duplicate_across_splits", "duplicate_across_splits"} <= checks


def test_no_warning_when_near_copies_share_a_split_or_one_is_unused(tmp_path):
    records, paths, twin, copy = _line(tmp_path)
    together = {r.path: "train" for r in records} | {paths[1]: "test", paths[2]: "val"}
    assert check_near_duplicates(records, together) == []
    unused = together | {twin: "unused"}
    assert check_near_duplicates(records, unused) == []
    assert check_near_duplicates(records, None) == []


def test_distinct_parts_are_far_from_the_threshold_and_a_reshot_one_is_near(tmp_path):
    records, paths, twin, _ = _line(tmp_path)
    files = [*paths, twin]
    shape = nd.hash_shape(files)
    assert shape == (128, 64)  # long side 128, the images' 2:1 aspect
    hashes = np.stack(nd.difference_hashes(files, shape))
    pairs = nd.near_pairs(hashes, 2 * shape[0] * shape[1], max_fraction=1.0)
    dist = {(i, j): d for i, j, d in pairs}
    assert dist[(0, len(files) - 1)] < nd.MAX_DIFFERENT_BITS  # 0.042 here
    assert min(d for (i, j), d in dist.items() if j != len(files) - 1 or i != 0) > 2 * nd.MAX_DIFFERENT_BITS


def test_near_pairs_match_a_brute_force_count_in_chunks():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (40, 100)).astype(np.uint8)
    bits[7] = bits[3]
    bits[7, :4] ^= 1  # 4 of 100 bits differ
    hashes = np.packbits(bits, axis=1)
    brute = {(i, j): float((bits[i] != bits[j]).mean()) for i in range(40) for j in range(i + 1, 40)}
    for limit in (0.05, 0.45):
        expected = {k for k, d in brute.items() if d <= limit}
        assert {(i, j) for i, j, _ in nd.near_pairs(hashes, 100, limit)} == expected
    assert nd.near_pairs(hashes, 100, 0.05) == [(3, 7, 0.04)]


def test_unreadable_files_are_skipped_not_fatal(tmp_path):
    records, paths, twin, _ = _line(tmp_path)
    bad = tmp_path / "good/broken.png"
    bad.write_bytes(b"not an image")
    records.append(ImageRecord(str(bad), GOOD, "line", "good"))
    assignment = {r.path: "train" for r in records} | {twin: "val", str(bad): "test"}
    assert [w.check for w in check_near_duplicates(records, assignment)] == ["near_duplicate_across_splits"]
