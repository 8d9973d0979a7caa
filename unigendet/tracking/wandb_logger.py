"""WandbLogger that picks online or offline the way W&B itself would, for ``experiments/base.yaml``.

* ``offline=None`` (the default) decides from W&B's own settings: ``WANDB_MODE`` wins when it is set (``offline``,
  ``online``, ``disabled``); otherwise the run is online when an API key is configured (``WANDB_API_KEY``, or a
  ``~/.netrc`` entry for the host of ``WANDB_BASE_URL``, which ``wandb login`` writes) and offline when none is,
  so a machine without credentials never stops to ask for them;
* the run files go under ``save_dir`` (``runs`` by default, next to the checkpoints), the project defaults to
  ``unigendet`` (``WANDB_PROJECT`` overrides it);
* ``version`` (the W&B run id) defaults to ``WANDB_RUN_ID``; the run folder is ``<save_dir>/<project>/<run id>``;
* no ``anonymous`` argument reaches ``wandb.init`` unless it is asked for (W&B deprecated the setting).
"""

from __future__ import annotations

import netrc
import os
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_credentials() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY``, or a netrc entry for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wants_offline() -> bool:
    """What ``offline=None`` means: W&B's ``WANDB_MODE`` when set, else offline exactly when there are no credentials.
    With ``WANDB_MODE`` set the logger stays "online" and wandb.init applies that mode itself."""
    if os.environ.get("WANDB_MODE"):
        return False
    return not wandb_credentials()


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` follows W&B's environment (see the module docstring)."""

    def __init__(self, name: str | None = None, save_dir: str = "runs", version: str | None = None,
                 offline: bool | None = None, project: str | None = None, log_model: bool | str = False,
                 **kwargs: Any) -> None:
        self.requested_offline = offline
        offline = wants_offline() if offline is None else offline
        project = project or os.environ.get("WANDB_PROJECT") or "unigendet"
        # a run id fixed by the environment (the sbatch templates: one per Slurm job, kept across requeues) is the
        # version from the start, so the run folder and `--ckpt_path last` are known before wandb.init
        version = version or os.environ.get("WANDB_RUN_ID") or None
        super().__init__(name=name, save_dir=save_dir, version=version, offline=offline, project=project,
                         log_model=log_model, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
