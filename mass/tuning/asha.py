"""ASHA whose rung records survive the driver: Ray Tune does not checkpoint a scheduler's state (ray#30838), so a
search resumed with ``Tuner.restore`` would forget every score recorded at the rungs and let resumed trials run
to the end unopposed. This ASHA writes its state next to the experiment after every result and reads it back
on its first use after a restore. (Imported only by the tuning job: it pulls in Ray Tune.)"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

log = logging.getLogger(__name__)


class PersistentASHA(ASHAScheduler):
    """``ASHAScheduler`` that saves its rungs to ``state_path`` after every result and restores them once, when
    it is first used again (it is unpickled from the experiment's ``tuner.pkl`` on ``Tuner.restore``)."""

    def __init__(self, state_path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.state_path, self._loaded = state_path, False

    def _load_once(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if Path(self.state_path).is_file():
            with open(self.state_path, "rb") as handle:
                saved = pickle.load(handle)
            saved.update(state_path=self.state_path, _loaded=True)
            self.__dict__.update(saved)
            log.info("ASHA resumed with its rung records from %s", self.state_path)

    def _save(self) -> None:
        tmp = f"{self.state_path}.tmp"
        with open(tmp, "wb") as handle:
            pickle.dump(self.__dict__, handle)
        os.replace(tmp, self.state_path)

    def on_trial_add(self, tune_controller, trial) -> None:
        """Restore the rungs first (after a driver restart), then place the trial."""
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        """ASHA's decision, then the rungs saved."""
        self._load_once()
        action = super().on_trial_result(tune_controller, trial, result)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        """Record the final result, then save."""
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()
