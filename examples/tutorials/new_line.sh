# --8<-- [start:practice]
# no photos yet? a practice line: good/ (60 parts) and defect/<type>/ (3 types x 12), 128 px
python examples/practice_line.py practice/line
# --8<-- [end:practice]
# --8<-- [start:look]
# look at the data first: counts per split, the audit, sample grids (nothing is trained)
defect-data data=folder data.root=practice/line data.category=line
# --8<-- [end:look]
# --8<-- [start:train]
# 1. train: the auto recipe reads the data, trains its candidates, chooses on val
defect-train experiment=auto data=folder data.root=practice/line data.category=line auto.budget_minutes=10 2>&1 | tee auto.log
# --8<-- [end:train]
# --8<-- [start:promote]
# 2. promote the winner auto names in its last line ("Promote it: defect-promote run_id=...")
defect-promote run_id=$(grep -o 'defect-promote run_id=[0-9a-f]*' auto.log | tail -1 | cut -d= -f2)
# --8<-- [end:promote]
# --8<-- [start:predict]
# 3. score new parts with the champion: predictions.csv, and every part in the prediction log
python examples/practice_line.py practice/today --stream 50
defect-predict images=practice/today
# --8<-- [end:predict]
# --8<-- [start:serve]
# ... or serve the champion over HTTP on 127.0.0.1:5001 (until Ctrl-C)
make serve
# --8<-- [end:serve]
