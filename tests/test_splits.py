from collections import Counter

import pytest

from defect_detection import DEFECT, GOOD, UserError
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import seed_protocol_split, stratified_split


def _records(n_train_good=209, n_test_good=20, defects=(("broken_large", 20), ("broken_small", 22),
                                                         ("contamination", 21)), category="bottle"):
    out = [ImageRecord(f"/d/{category}/train/good/{i:03d}.png", GOOD, category, "good", None, "train")
           for i in range(n_train_good)]
    out += [ImageRecord(f"/d/{category}/test/good/{i:03d}.png", GOOD, category, "good", None, "test")
            for i in range(n_test_good)]
    for kind, n in defects:
        out += [ImageRecord(f"/d/{category}/test/{kind}/{i:03d}.png", DEFECT, category, kind, None, "test")
                for i in range(n)]
    return out


def test_stratified_has_no_overlap_and_covers_everything():
    records = _records() + _records(category="cable")
    split = stratified_split(records, 0.2, 0.2, seed=0)
    paths = [r.path for s in ("train", "val", "test") for r in split[s]]
    assert len(paths) == len(set(paths)) == len(records)


def test_stratified_keeps_class_and_category_ratios():
    records = _records() + _records(n_train_good=50, category="cable")
    split = stratified_split(records, 0.2, 0.2, seed=0)
    for name in ("val", "test"):
        counts = Counter((r.category, r.label) for r in split[name])
        for (category, label), n in Counter((r.category, r.label) for r in records).items():
            assert abs(counts[(category, label)] - 0.2 * n) <= 1


def test_stratified_is_deterministic_and_seeded():
    records = _records()
    a, b = stratified_split(records, seed=1), stratified_split(list(reversed(records)), seed=1)
    assert [r.path for r in a.test] == [r.path for r in b.test]
    assert [r.path for r in stratified_split(records, seed=2).test] != [r.path for r in a.test]


def test_seed_protocol_reproduces_bottle_counts():
    split = seed_protocol_split(_records())
    assert (len(split.train), len(split.val)) == (218, 54)  # 209 good + 63 defects, 80/20
    assert split.leaky and split.test == split.val
    assert not any(r.source_split == "test" and r.label == GOOD for s in ("train", "val") for r in split[s])


def test_bad_fractions_are_refused():
    with pytest.raises(UserError, match="sum must be below 1"):
        stratified_split(_records(), 0.5, 0.5)
    with pytest.raises(UserError, match="val_fraction=-0.1"):
        stratified_split(_records(), -0.1, 0.2)


def test_empty_split_names_the_split():
    with pytest.raises(UserError, match="val split is empty"):
        stratified_split(_records(n_train_good=2, n_test_good=0, defects=(("x", 2),)), 0.2, 0.2)


def test_max_train_defects_keeps_a_seeded_few_and_leaves_val_and_test_as_they_were():
    records = _records() + _records(n_train_good=50, category="cable")
    full = stratified_split(records, 0.2, 0.2, seed=3)
    few = stratified_split(records, 0.2, 0.2, seed=3, max_train_defects=5)
    for name in ("val", "test"):
        assert [r.path for r in few[name]] == [r.path for r in full[name]]
    kept = [r for r in few.train if r.label == DEFECT]
    assert len(kept) == 5 and {r.path for r in kept} <= {r.path for r in full.train}
    assert [r.path for r in few.train if r.label == GOOD] == [r.path for r in full.train if r.label == GOOD]
    again = stratified_split(records, 0.2, 0.2, seed=3, max_train_defects=5)
    assert [r.path for r in again.train] == [r.path for r in few.train]
    assert [r.path for r in stratified_split(records, 0.2, 0.2, seed=4, max_train_defects=5).train
            if r.label == DEFECT] != [r.path for r in kept]
    good_only = stratified_split(records, 0.2, 0.2, seed=3, max_train_defects=0)
    assert good_only.train and not any(r.label == DEFECT for r in good_only.train)
    assert len(stratified_split(records, 0.2, 0.2, seed=3, max_train_defects=10_000).train) == len(full.train)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_bad_max_train_defects_names_the_key(bad):
    with pytest.raises(UserError, match="split.max_train_defects=.*whole number >= 0"):
        stratified_split(_records(), 0.2, 0.2, max_train_defects=bad)
