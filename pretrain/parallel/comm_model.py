"""What the ranks send each other in one training step under `fsdp` with `train.tensor_parallel`: a formula.

Sizes as `pretrain.parallel.collectives.CollectiveCounter` counts them (the whole tensor a group
assembles or reduces, per rank, per optimizer step), by device-mesh dimension and collective kind.
With m micro-batches per rank per step, T tensor-parallel ranks, D data-parallel ranks a model is
sharded over (R replicas of them under HSDP), L layers, d the model width, b x s tokens a micro-batch:

    P_T = (P - N) / T + N     parameters a tensor-parallel rank holds (N = (2L + 1) d, the norms, whole)
    A   = b * s * d * a       a micro-batch's hidden states (a: bytes of the activation dtype)

    shard      all-gather       m * g * P_T * p     (g = 2 with train.reshard_after_forward, else 1; p: bytes
                                                    of the gathered parameters, 2 under bf16, 4 under fp32)
               reduce-scatter   m * P_T * 4         (gradients reduced in fp32)
    replicate  all-reduce       m * P_T / D * 4     (HSDP: each shard's gradient over the replicas)
    tp         all-gather       m * A * (4L + 2 + 2r)           (none: r = 0; selective, full: r = L)
                                m * A * (6L + 2)                 (llama: the normed inputs gathered again)
               reduce-scatter   m * A * (4L + 1 + r)            (none, selective, full)
                                m * (A * (2L + 1) + A32 * 2L)    (llama: input gradients in fp32, A32 = A * 4 / a)
               all-reduce       m * (A + N * p + 3 * b * s * 4)   (llama: N * 4, the norms' gradients in fp32)
    (world)    all-reduce       12 bytes: the step's loss (fp32) and gradient norm (fp64) agreed by all ranks

Per block and micro-batch, the DTensor plans (`none`) all-gather the sequence-sharded normed input
before wq/wk/wv and before w1/w3 and reduce-scatter the outputs of wo and w2 (2 + 2), and the
backward does the transposes (2 + 2); `selective` and `full` recompute the forward and with it its
collectives, up to the last tensor the backward needs (both all-gathers and wo's reduce-scatter, not
w2's: r = L); `llama` gathers the two normed inputs again in the
backward instead of keeping them (its backward: 4 all-gathers, 2 reduce-scatters in fp32). Around the
blocks: the embedding's output is reduce-scattered to sequence slices (its gradient all-gathered),
the final norm's output all-gathered before the vocabulary-parallel output (its gradient, sharded in
DTensor's strided layout, comes back by an all-reduce), the norms' weight gradients all-reduced, and
the vocabulary-parallel cross-entropy all-reduces three numbers per token (max, sum of exponentials,
target logit). FSDP2 pads each parameter to a multiple of D rows: measured sizes run a little above.
"""

from __future__ import annotations

from collections import defaultdict

from pretrain.config import Checkpointing, ExperimentConfig, Precision
from pretrain.model import tensor_parallel_params


def step_bytes(
    cfg: ExperimentConfig, world_size: int, precision: Precision = Precision.fp32
) -> dict[tuple[str, str], float]:
    """Bytes per rank of one optimizer step by (mesh dimension, kind), as `CollectiveCounter` counts them."""
    m_args, t = cfg.model, cfg.train
    T = t.tensor_parallel
    data = world_size // T
    D = t.fsdp_shard_size or data
    R = data // D
    L, d = m_args.n_layers, m_args.dim
    b, s = t.micro_batch_size, cfg.data.seq_len
    m = t.global_batch_tokens // (b * s * data)  # micro-batches per rank per step
    p = 2 if precision == Precision.bf16 else 4
    norms = (2 * L + 1) * d
    P_T = tensor_parallel_params(m_args, T)
    out: dict[tuple[str, str], float] = defaultdict(float)
    if D > 1:
        out[("shard", "all_gather")] = m * (2 if t.reshard_after_forward else 1) * P_T * p
        out[("shard", "reduce_scatter")] = m * P_T * 4
    if R > 1:
        out[("replicate", "all_reduce")] = m * P_T / D * 4
    if T > 1:
        A = b * s * d * p
        A32 = b * s * d * 4
        mode = t.activation_checkpointing
        if mode == Checkpointing.llama:
            out[("tp", "all_gather")] = m * A * (6 * L + 2)
            out[("tp", "reduce_scatter")] = m * (A * (2 * L + 1) + A32 * 2 * L)
        else:
            recompute = 0 if mode == Checkpointing.none else L  # the forward's collectives once more
            out[("tp", "all_gather")] = m * A * (4 * L + 2 + 2 * recompute)
            out[("tp", "reduce_scatter")] = m * A * (4 * L + 1 + recompute)
        norm_bytes = 4 if mode == Checkpointing.llama else p  # the hand-written block sums them in fp32
        out[("tp", "all_reduce")] = m * (A + norms * norm_bytes + 3 * b * s * 4)
    spanning = [name for name, size in (("replicate", R), ("shard", D), ("tp", T)) if size > 1]
    whole = spanning[0] if len(spanning) == 1 else "world"  # the group of every rank: one dimension, or more
    out[(whole, "all_reduce")] += 12
    return dict(out)
