"""Curvature analysis of a batch sharded over the ranks of a ``torch.distributed`` process group.

::

    import torch.distributed as dist
    import curvlab.distributed

    dist.init_process_group("gloo")            # or "nccl", one GPU per rank
    ds = curvlab.distributed.compare(model, loss_fn, local_inputs, local_targets)
    if dist.get_rank() == 0:
        ds.to_netcdf("compare.nc")

Every rank extracts the square-root columns and the Kronecker statistics of its own shard
(one forward, one BackPACK backward, exactly as :func:`curvlab.extract`); the statistics are
rescaled to the global batch and summed in one ``all_reduce``
(:mod:`curvlab.distributed.reduce`), the square roots stay where they were computed and are
wrapped in :class:`ShardedSqrt`, a :class:`~curvlab.sqrt.SquareRoot` back-end whose methods
are ``torch.distributed`` collectives (:mod:`curvlab.distributed.sqrt`).  :func:`compare` *is*
:func:`curvlab.compare` with this sharded :func:`extract` as its extraction: the approximations
and metrics run unchanged, on every rank, and every rank returns the same Dataset: for the ``exact`` and ``empirical`` flavours the one :func:`curvlab.compare` gives on the
concatenated batch (shards in rank order), to rounding — except what MC sampling draws: it is
seeded per rank (``seed + rank``), so the ``mc`` flavour and KFAC's factors (MC-sampled
whatever the flavour; ``kfac`` is measured by default) are valid estimates, not the single-process
draws, and so are the network totals that include ``kfac``.

The same reduction serves the data-parallel optimizers (:mod:`curvlab.optim.distributed`), and
``curvlab report``/``curvlab train --probe-every`` use :func:`compare`/:func:`extract` when
launched on several processes (``torchrun`` or ``--nproc``).

Only ``torch.distributed`` collectives are used (``all_gather``, ``all_reduce``, ``broadcast``,
``batch_isend_irecv``, and ``all_gather_object`` on the error path); tensors stay on the model's
device (gloo: CPU, nccl: CUDA).  Ranks may hold different numbers of examples.

Scaling conventions (exact, see :mod:`~curvlab.distributed.reduce`): each rank's loss is the
*local* mean; with ``ρ_r = count_r / count`` (``mean``: examples for CrossEntropyLoss, elements
for MSELoss and BCEWithLogitsLoss; ``ρ_r = 1`` for ``sum``) the square roots are scaled by ``√ρ_r``; ``G``, ``δ``,
``δΦ``, ``δΨ``, ``kfe_scaling``, the gradient and the loss by ``ρ_r``; ``A`` (an average over
examples and locations) by ``N_r / N``; then summed.

Column order: rank-major (rank 0's columns ``c·N_0 + n`` first); a single process orders the same
columns ``c·N + n`` — :func:`sharded_column_order` maps one to the other.  Every reported metric
is invariant under this permutation.

Memory per rank (``K = C·N`` columns of the global batch, ``K_r`` of this rank, ``L`` layers,
8-byte floats):

* the ``K × K`` Gram matrix of every layer is *replicated*: :func:`curvlab.compare.measure`
  keeps one per layer plus the whole-network sum, ``≈ 8 (L + 1) K²`` bytes, and ``eigh`` needs a
  few more ``K × K`` work arrays (``K > 4096``: Lanczos for the spectrum, still a dense ``K × K``
  operand).  ``K = 10⁴`` is 0.8 GB a layer, ``K = 2·10⁴`` with ``L = 4`` already 16 GB: the
  exact route holds up to ``K = N·C`` of about ``1–2·10⁴`` per node, *whatever the number of
  ranks* — sharding takes the root's memory and the backward's cost off one node, not the
  Gram's (e.g. CIFAR-10 with ``C = 10``: ``N ≲ 1000–2000`` examples for the exact flavour,
  ten times more for the empirical one, ``C = 1``);
* the root shards: a linear layer ``N_r·D + K_r·d_out`` numbers, a convolution ``K_r·P`` (the
  explicit per-sample gradients), plus one received shard of another rank while the Gram is
  assembled.  ``K·P`` — what one process would need for a convolution — is divided by ``R``.

Cost and communication as ``R`` grows: the extraction and every root product
(``inner``, ``combine``, ``sandwich``, ``rotated_sq_sum``) shrink as ``1/R``; the Gram costs
``≈ K²P/(2R)`` flops a rank (symmetric blocks computed once) after ``⌊R/2⌋`` exchanges of one
shard; the ``K × K`` eigen-decompositions (``O(K³)``) and everything else on ``K × K`` or
Kronecker factors are *replicated* on every rank, so they do not shrink.  Communication per
layer: ``⌊R/2⌋`` shards sent and received per rank plus one ``all_reduce`` of ``K²`` numbers for
the Gram, ``O(P + K)`` for each metric's root product (a few dozen per layer; KFOC's power
iteration two per iteration), and one ``all_reduce`` of all statistics of all layers
(``Σ (D² + d_out²)``).  Latency, not bandwidth, dominates for small layers.

Requirements and limits: every rank calls with the same model parameters (checked with a
fingerprint), loss and options (checked with a checksum), in the same order; a rank whose local
extraction raises makes every rank raise (no rank is left waiting).  Control flow must be
decided identically on every rank: guaranteed on homogeneous hardware, because every input to
a decision (Gram, reduced factors) is bit-identical across ranks (and every rank returns the
same Dataset).  Operands derived from eigen-decompositions (the weights of ``combine``, the
bases of ``rotated_sq_sum``) are broadcast from rank 0, so an eigenvector's sign can never
differ between ranks.  On ranks with different floating point (heterogeneous devices), KFOC's
convergence test could still end after different iteration counts and stall the group until
its timeout.
"""

from curvlab._lazy import lazy_names

# imported at first use: the data-parallel optimizers (curvlab.optim.distributed) need the
# reduction and the collectives, not the comparison's xarray and scipy
_WHERE = {
    "RankFailedError": "collectives",
    "ShardedSqrt": "sqrt",
    "Shards": "reduce",
    "compare": "api",
    "extract": "api",
    "reduce_statistics": "reduce",
    "sharded_column_order": "sqrt",
}

__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_names(__name__, _WHERE)
