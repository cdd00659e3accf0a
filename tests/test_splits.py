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


def _positions(n_positions=15, good=(20, 29), defect=(0, 17), seed=0, root="/d/line"):
    """BSData-like records: part positions photographed repeatedly, good and pitted."""
    import random as _random

    rng = _random.Random(seed)
    out, rows = [], []
    for p in range(n_positions):
        for i in range(rng.randint(*good) + rng.randint(*defect)):
            label = GOOD if i < good[0] or rng.random() < 0.5 else DEFECT
            kind, folder = ("good", "good") if label == GOOD else ("pitting", "defect/pitting")
            name = f"{folder}/01_{p:02d}{i:04d}_pos{p:02d}_crop.jpg"
            out.append(ImageRecord(f"{root}/{name}", label, "line", kind))
            rows.append((name, f"pos{p:02d}"))
    return out, rows


def _write_csv(path, rows, header=("file", "label", "part_position")):
    path.write_text(",".join(header) + "\n" + "".join(f"{f},x,{g}\n" for f, g in rows))
    return path


def _split_of(split):
    return {r.path: name for name in ("train", "val", "test") for r in split[name]}


def test_groups_from_a_csv_never_span_two_splits_and_keep_each_label_near_its_fractions(tmp_path):
    records, rows = _positions(root=str(tmp_path))
    _write_csv(tmp_path / "groups.csv", rows)
    groups = {"csv": "groups.csv", "column": "part_position", "root": str(tmp_path)}
    for seed in range(5):
        split = stratified_split(records, 0.2, 0.2, seed=seed, content_hash=None, groups=groups)
        where = _split_of(split)
        assert len(where) == len(records)
        for key in {g for _, g in rows}:
            assert len({where[str(tmp_path / f)] for f, g in rows if g == key}) == 1, (seed, key)
        for label in (GOOD, DEFECT):
            n = sum(r.label == label for r in records)
            for name in ("val", "test"):
                share = sum(r.label == label for r in split[name]) / n
                assert 0.1 < share < 0.3, (seed, label, name, share)  # 15 groups of ~35: about 3 each
        assert {r.label for r in split.val} == {GOOD, DEFECT} == {r.label for r in split.test}


def test_grouped_split_is_seeded_and_ignores_record_order(tmp_path):
    records, rows = _positions(root=str(tmp_path))
    _write_csv(tmp_path / "groups.csv", rows)
    groups = {"csv": "groups.csv", "column": "part_position", "root": str(tmp_path)}
    a = stratified_split(records, seed=1, content_hash=None, groups=groups)
    b = stratified_split(list(reversed(records)), seed=1, content_hash=None, groups=groups)
    assert [r.path for r in a.test] == [r.path for r in b.test]
    assert {r.path for r in stratified_split(records, seed=2, content_hash=None, groups=groups).test} != {
        r.path for r in a.test}


def test_file_name_regex_groups_like_the_csv(tmp_path):
    records, rows = _positions(root=str(tmp_path))
    _write_csv(tmp_path / "groups.csv", rows)
    by_csv = stratified_split(records, seed=3, content_hash=None,
                              groups={"csv": str(tmp_path / "groups.csv"), "column": "part_position",
                                      "root": str(tmp_path)})
    by_regex = stratified_split(records, seed=3, content_hash=None, groups={"regex": r"_(pos\d+)_crop"})
    assert _split_of(by_csv) == _split_of(by_regex)


def test_ungrouped_files_and_absent_csv_rows_are_named_once(tmp_path, caplog):
    records, rows = _positions(n_positions=6, root=str(tmp_path))
    loose = [ImageRecord(f"{tmp_path}/good/loose_{i}.jpg", GOOD, "line", "good") for i in range(4)]
    _write_csv(tmp_path / "groups.csv", rows + [("good/gone.jpg", "pos00")])
    with caplog.at_level("WARNING"):
        groups = {"csv": "groups.csv", "column": "part_position", "root": str(tmp_path)}
        split = stratified_split(records + loose, seed=0, content_hash=None, groups=groups)
    text = caplog.text
    assert "4 of" in text and "loose_0.jpg" in text and "each is split on its own" in text
    assert "1 file(s) named in" in text and "gone.jpg" in text
    assert len(_split_of(split)) == len(records) + len(loose)


def test_grouping_keeps_identical_files_with_their_group(tmp_path):
    records, rows = _positions(n_positions=8, root=str(tmp_path))
    twin = ImageRecord(f"{tmp_path}/good/twin.jpg", GOOD, "line", "good")  # same bytes as a pos03 file
    first = next(r for r in records if "pos03" in r.path)

    def content(path):
        return "same" if path in (twin.path, first.path) else path

    for seed in range(4):
        split = stratified_split(records + [twin], seed=seed, content_hash=content,
                                 groups={"regex": r"_(pos\d+)_crop"})
        where = _split_of(split)
        assert where[twin.path] == where[first.path]


@pytest.mark.parametrize("groups, message", [
    ({"csv": "g.csv", "regex": "(x)"}, "both set"),
    ({"regex": "pos"}, "no capture group"),
    ({"regex": "(pos"}, "not a valid regular expression"),
    ({"csv": "g.csv"}, "needs split.make.groups.column"),
    ({"csv": "nope.csv", "column": "part_position"}, "Group file not found"),
    ({"csv": "g.csv", "column": "position"}, "no column 'position'.*part_position"),
    ({"csv": "g.csv", "column": "part_position", "file_column": "path"}, "no column 'path'"),
    ({"regex": r"_(nowhere)_"}, "gives none of the .* images a group"),
])
def test_bad_group_settings_name_the_key(tmp_path, groups, message):
    records, rows = _positions(n_positions=4, root=str(tmp_path))
    _write_csv(tmp_path / "g.csv", rows)
    with pytest.raises(UserError, match=message):
        stratified_split(records, content_hash=None, groups={**groups, "root": str(tmp_path)})


def test_a_csv_relative_to_another_root_is_refused_not_ignored(tmp_path):
    records, rows = _positions(n_positions=4, root=str(tmp_path / "data"))
    _write_csv(tmp_path / "g.csv", rows)
    with pytest.raises(UserError, match="none of the .* relative to data.root"):
        groups = {"csv": str(tmp_path / "g.csv"), "column": "part_position", "root": str(tmp_path)}
        stratified_split(records, content_hash=None, groups=groups)


def test_a_csv_giving_one_file_two_groups_is_refused(tmp_path):
    records, rows = _positions(n_positions=4, root=str(tmp_path))
    _write_csv(tmp_path / "g.csv", rows + [(rows[0][0], "elsewhere")])
    with pytest.raises(UserError, match="two groups.*elsewhere"):
        stratified_split(records, content_hash=None,
                         groups={"csv": "g.csv", "column": "part_position", "root": str(tmp_path)})


def test_groups_compose_from_the_real_config_and_reach_the_split(cfg_factory, tmp_path):
    from hydra.utils import instantiate

    records, rows = _positions(root=str(tmp_path))
    _write_csv(tmp_path / "groups.csv", rows)
    cfg = cfg_factory("data=folder", f"data.root={tmp_path}", "split.make.groups.csv=groups.csv",
                      "split.make.groups.column=part_position")
    split = instantiate(cfg.split.make)(records, content_hash=None)
    where = _split_of(split)
    for key in {g for _, g in rows}:
        assert len({where[str(tmp_path / f)] for f, g in rows if g == key}) == 1
    regex = cfg_factory("data=folder", f"data.root={tmp_path}", r"split.make.groups.regex='_(pos\d+)_crop'")
    assert regex.split.make.groups.regex == r"_(pos\d+)_crop"
    assert _split_of(instantiate(regex.split.make)(records, content_hash=None)) == _split_of(
        stratified_split(records, seed=cfg.seed, content_hash=None, groups={"regex": r"_(pos\d+)_crop"}))
    plain = cfg_factory()
    assert plain.split.make.groups.csv is None and plain.split.make.groups.regex is None
