"""Errors that the command line reports as one line; free of torch, so `python -m pretrain` imports them cheaply."""


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm was NaN or Inf and `train.on_nan` is `stop`."""
