"""The one error of this package: a checkpoint or model folder that cannot be used as it is (damaged, refused, or
not matching its config). A ``ValueError``, so the command line prints it as one line."""


class CheckpointError(ValueError):
    pass
