# --8<-- [start:practice]
# a practice line with 80 good parts and only 4 photos of each defect type
python examples/practice_line.py practice/good_only --good 80 --per-defect 4
# --8<-- [end:practice]
# --8<-- [start:train]
# PatchCore learns from the good training parts alone; max_train_defects=0 keeps every defect
# photo out of training (val and test keep theirs: val's set the threshold, test's measure it)
defect-train detector=patchcore data=folder data.root=practice/good_only data.category=good_only \
    split.make.max_train_defects=0
# --8<-- [end:train]
# --8<-- [start:auto]
# the same choice, made by the rules: with no train defect, auto runs PatchCore only
defect-train experiment=auto data=folder data.root=practice/good_only data.category=good_only \
    split.make.max_train_defects=0
# --8<-- [end:auto]
# --8<-- [start:use]
# promote it and look at where it sees the defects: the patch-distance map on each photo
defect-promote
defect-explain model=models:/defect-classifier@champion inputs=practice/good_only/defect
# --8<-- [end:use]
