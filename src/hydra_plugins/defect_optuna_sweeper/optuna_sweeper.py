"""An Optuna ask/tell sweeper for Hydra 1.3 that works with current Optuna and SQLAlchemy 2.

Why not hydra-optuna-sweeper: its stable release (1.2.0) pins optuna<3, whose RDB storage breaks on
SQLAlchemy 2 (which MLflow 3 needs); its 1.4 release candidates need hydra-core 1.4 pre-releases.
This sweeper keeps hydra-core 1.3 stable and reads the same config keys (direction, study_name,
storage, n_trials, n_jobs, sampler, params in Hydra's sweep grammar), so switching to the official
plugin later is a one-line `_target_` change.

Resuming: `n_trials` is the size the study should reach, not the count of this invocation. Running
the same command again continues a study in `storage`; trials an interruption left RUNNING are
marked FAIL and re-queued with their parameters first (one search process per study).

Trials are launched in batches of `n_jobs` through the configured Hydra launcher (basic: one after
the other; joblib: in parallel processes). A trial whose task returns None/NaN or raises is told
FAIL; the search stops after `max_failures` failed trials in one invocation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def search_space(arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions for the sweep overrides, and the plain overrides passed through as is."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        name, value = override.get_key_element(), override.value()
        if isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[name] = IntDistribution(int(value.start), int(value.end), log=log_scale)
            else:
                space[name] = FloatDistribution(float(value.start), float(value.end), log=log_scale)
        elif isinstance(value, RangeSweep) and isinstance(value.start, int) and isinstance(value.step, int) \
                and isinstance(value.stop, int) and not value.shuffle and value.step > 0:
            space[name] = IntDistribution(value.start, value.stop - value.step, step=value.step)
        elif isinstance(value, (ChoiceSweep, RangeSweep)):
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            space[name] = CategoricalDistribution(choices)
        else:
            raise ValueError(f"'{override.input_line}': the Optuna sweeper supports choice(), range() "
                             "and interval() (tag(log, interval(...)) for a log scale).")
    return space, fixed


def _value(job_return) -> float | None:
    try:
        value = job_return.return_value  # re-raises the job's exception when it failed
    except Exception as err:
        log.warning("Trial raised: %s", err)
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        log.warning("Trial returned %r, not a number: told FAIL", value)
        return None
    return None if math.isnan(value) else value


class DefectOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any = None, direction: str = "maximize", storage: str | None = None,
                 study_name: str | None = None, n_trials: int = 20, n_jobs: int = 1, max_failures: int = 5,
                 params: DictConfig | None = None) -> None:
        self.sampler, self.direction, self.storage = sampler, str(direction), storage
        self.study_name, self.n_trials, self.max_failures = study_name, int(n_trials), int(max_failures)
        self.n_jobs = int(n_jobs) if int(n_jobs) > 0 else (os.cpu_count() or 1)
        self.params = params
        self.config: DictConfig | None = None
        self.launcher = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def _study(self):
        import optuna

        storage = self.storage
        if storage and str(storage).startswith("sqlite:///"):
            Path(str(storage)[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
            # a generous busy timeout: a second search process on the same study waits, not fails
            storage = optuna.storages.RDBStorage(str(storage),
                                                 engine_kwargs={"connect_args": {"timeout": 60}})
        return optuna.create_study(study_name=self.study_name, storage=storage, sampler=self.sampler,
                                   direction=self.direction, load_if_exists=True)

    @staticmethod
    def _requeue_interrupted(study) -> int:
        from optuna.trial import TrialState

        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for trial in stale:
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
        if stale:
            log.info("Re-queued %d trial(s) an interruption left running: %s", len(stale),
                     [t.number for t in stale])
        return len(stale)

    @staticmethod
    def _n_done(study) -> int:
        """Finished trials, not counting those that were interrupted and re-queued."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials} - {None}
        finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return sum(1 for t in trials if t.state in finished and t.number not in retried)

    def sweep(self, arguments: list[str]) -> None:
        from optuna.trial import TrialState

        assert self.config is not None and self.launcher is not None
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space([*params, *arguments])
        study = self._study()
        self._requeue_interrupted(study)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        done = self._n_done(study)
        log.info("Optuna study '%s' (%s, %s): %d of %d trials done, search space %s", study.study_name,
                 self.storage or "in memory", self.direction, done, self.n_trials, sorted(space))
        failures = 0
        while done < self.n_trials:
            batch = min(self.n_jobs, self.n_trials - done)
            trials = [study.ask(space) for _ in range(batch)]
            overrides = []
            for i, trial in enumerate(trials):
                trial.set_user_attr("sweep_id", sweep_dir.name)
                trial.set_user_attr("hydra_job", self.job_idx + i)
                overrides.append([*(f"{k}={v}" for k, v in trial.params.items()), *fixed])
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns):
                value = _value(ret)
                if value is None:
                    failures += 1
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            done = self._n_done(study)
            if failures >= self.max_failures:
                raise RuntimeError(f"{failures} trials failed (max_failures={self.max_failures}): "
                                   f"stopping the search; see the FAILED runs in MLflow.")
        self._save_results(study, sweep_dir)

    @staticmethod
    def _save_results(study, sweep_dir: Path) -> None:
        try:
            best = study.best_trial
        except ValueError:
            log.warning("No trial of study '%s' completed.", study.study_name)
            return
        log.info("Best trial #%d: %s = %s", best.number, best.params, best.value)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"name": "optuna", "study_name": study.study_name,
                                         "best_trial": best.number, "best_params": best.params,
                                         "best_value": best.value}),
                       sweep_dir / "optimization_results.yaml")
