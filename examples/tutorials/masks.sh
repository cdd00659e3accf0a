# --8<-- [start:practice]
# a practice line whose defects come with masks: masks/<type>/<stem>_mask.png
python examples/practice_line.py practice/masked --masks
defect-data data=folder data.root=practice/masked data.category=masked
# --8<-- [end:practice]
# --8<-- [start:train]
# the segmenter (image labels + masks) and, to compare, the classifier (image labels only)
defect-train detector=segmenter data=folder data.root=practice/masked data.category=masked experiment_name=masks
defect-train detector=classifier data=folder data.root=practice/masked data.category=masked experiment_name=masks
# how few masks are enough: the segmenter with the masks of a quarter of the train defects
defect-train detector=segmenter detector.mask_fraction=0.25 data=folder data.root=practice/masked \
    data.category=masked experiment_name=masks
# --8<-- [end:train]
# --8<-- [start:compare]
# the three runs side by side, ranked on val; the cam_* columns score the maps against the masks
defect-compare experiment_name=masks sweep=null \
    "metrics=[val/auroc,test/auroc,test/recall,test/fp,test/cam_pointing_game,test/cam_pixel_auroc]"
# --8<-- [end:compare]
