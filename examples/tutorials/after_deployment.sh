# --8<-- [start:setup]
# a champion to start from (skip with your own): a practice line, one training run, promoted
python examples/practice_line.py practice/line
defect-train data=folder data.root=practice/line data.category=line
defect-promote
# --8<-- [end:setup]
# --8<-- [start:predict]
# a shift of parts: scored by the champion, every part written to the prediction log
python examples/practice_line.py practice/shift1 --stream 200 --seed 1
defect-predict images=practice/shift1
# --8<-- [end:predict]
# --8<-- [start:monitor]
# is the line still what the champion was validated on? (exit 0: no alarm)
defect-monitor window.last=200 defect_share=0.1
# --8<-- [end:monitor]
# --8<-- [start:drift]
# the next shift: the lamp is 30 % dimmer and a new defect type (a dent) appears
python examples/practice_line.py practice/shift2 --stream 200 --seed 2 --lighting 0.7 --new-type-share 0.5
defect-predict images=practice/shift2
defect-monitor window.last=200 defect_share=0.1 || echo "defect-monitor exit code $?: alarm"
# --8<-- [end:drift]
# --8<-- [start:review]
# the operator answers the queue: flagged, borderline, a random audit sample of passed parts
defect-review                                  # http://127.0.0.1:5002 ; Ctrl-C when done
# --8<-- [end:review]
# --8<-- [start:practice-review]
# practice parts only: play the operator from the truth in their file names
python examples/practice_review.py
# --8<-- [end:practice-review]
# --8<-- [start:export]
# the judged parts as a dataset: train/ to learn from, holdout/ (30 %) to judge the next model on
defect-review export=reviewed/batch1
# --8<-- [end:export]
# --8<-- [start:retrain]
# the challenger: the same recipe, the reviewed parts added to the train split only
defect-train data=folder data.root=practice/line data.category=line "data.extra_roots=[$PWD/reviewed/batch1/train]" 2>&1 | tee retrain.log
challenger=$(sed -n 's/^run: \([0-9a-f]\{32\}\).*/\1/p' retrain.log)   # the id after "run:" in its summary
# --8<-- [end:retrain]
# --8<-- [start:challenge]
# challenger against champion on the same parts; promote=true goes through the promotion guard
defect-challenge challenger=runs:/$challenger/model holdout=reviewed/batch1/holdout
defect-challenge challenger=runs:/$challenger/model holdout=reviewed/batch1/holdout promote=true
# --8<-- [end:challenge]
