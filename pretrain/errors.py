"""Errors that the command line reports as one line; free of torch, so `python -m pretrain` imports them cheaply."""


class NonFiniteLoss(RuntimeError):
    """Training cannot go on: a NaN/Inf loss or gradient norm with `train.on_nan=stop`, more skipped steps or
    spike rollbacks in a row than `train.max_consecutive_skips`, or a spike with no checkpoint before it."""
