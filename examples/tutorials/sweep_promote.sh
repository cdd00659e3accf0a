# --8<-- [start:practice]
python examples/practice_line.py practice/line
# --8<-- [end:practice]
# --8<-- [start:sweep]
# a grid: 2 freezing depths x 2 learning rates = 4 runs, nested under one parent run
defect-train -m data=folder data.root=practice/line data.category=line \
    freezing=layer4,head_only optimizer=adamw_3e4,adamw_1e3
# --8<-- [end:sweep]
# --8<-- [start:compare]
# rank the latest sweep's runs on a validation metric (table, CSV, figure, comparison.html)
defect-compare metric=val/auroc
# --8<-- [end:compare]
# --8<-- [start:promote]
# what would be promoted, then promote it: the best FINISHED run on val, checked against the champion
defect-promote sweep=latest dry_run=true
defect-promote sweep=latest
# --8<-- [end:promote]
# --8<-- [start:optuna]
# a Bayesian search instead of a grid (Optuna TPE; rerun the same command to resume it)
defect-train -m hparams_search=optuna hydra.sweeper.n_trials=20 data=folder data.root=practice/line data.category=line
# --8<-- [end:optuna]
# --8<-- [start:parallel]
# trials two at a time on this machine
defect-train -m hydra/launcher=parallel hydra.launcher.n_jobs=2 data=folder data.root=practice/line \
    data.category=line optimizer=adamw_3e4,adamw_1e3
# --8<-- [end:parallel]
