"""``curvlab.extract``: one forward and one backward pass → per-block statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from curvlab.extract.engines import uncompiled
from curvlab.extract.extension import BackpackUnsupportedError
from curvlab.extract.options import ExtractOptions
from curvlab.extract.session import ExtractionSession
from curvlab.extract.validate import check_target_dtype
from curvlab.model_blocks import check_materialised
from curvlab.stats import LayerStats


class Extraction(dict[str, LayerStats]):
    """Block name → :class:`LayerStats`, plus the batch's loss value and sizes.

    Attributes:
        loss: the mini-batch loss (detached).
        flavour: the reference flavour.
        num_examples: N.
        engine: ``"backpack"`` or ``"autograd"``.
        engine_reason: with ``engine="auto"``, why BackPACK could not run the model; empty when it
            ran, or when the engine was chosen by ``engine="autograd"``/``"backpack"``.
        skipped: parameters left out (``skip_unsupported=True``).
    """

    loss: Tensor
    flavour: str
    num_examples: int
    engine: str
    engine_reason: str
    skipped: list[str]


@contextlib.contextmanager
def _model_left_as_it_was(model: nn.Module) -> Iterator[None]:
    """Restore every ``.grad`` and buffer (BatchNorm's running statistics) on exit, and the
    weights torch's forward renormalises in place (an embedding's ``max_norm``: a skipped block)."""
    params = list(model.parameters())
    saved_grads = [p.grad for p in params]
    renormed = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm]
    buffers = [(b, b.detach().clone()) for b in [*model.buffers(), *renormed]]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    options: ExtractOptions | None = None,
    **overrides: object,
) -> Extraction:
    """Curvature statistics of every block of ``model`` (see :mod:`curvlab.model_blocks`).

    One forward and one backward pass through the engine ``engine`` picks (BackPACK when it can run
    the whole model, else the autograd engine; both give the same statistics).  Block ``F`` of the
    chosen flavour is the curvature of the loss *as ``loss_fn`` computes it*:
    ``L = R Σ_{n,s} ℓ_{n,s}`` over ``N`` examples and ``T_out`` loss terms per example, with
    ``R = 1/(N·T_out)`` (CE, mean), ``1/numel`` (MSE and BCE, mean: torch averages over every element)
    or 1 (sum), and

    * ``exact``: the GGN ``Jᵀ (∇²_f L) J`` with the Jacobian of all outputs of the batch (= the
      Fisher for CE, MSE and BCE) — with train-mode BatchNorm it includes the coupling between examples;
    * ``mc``: its unbiased Monte-Carlo estimate with ``mc_samples`` labels drawn from the model;
    * ``empirical``: ``R Σ ∇ℓ_{n,s} ∇ℓ_{n,s}ᵀ`` with the true labels (biased as curvature).

    The Kronecker statistics follow the convention of kfac-pytorch, ASDL and curvlinops (per-example
    layer inputs and output gradients of the batch computation, the coupling ignored; see
    :mod:`curvlab.extract.layer_stats`).  Parameter blocks (norm layers' affine parameters, position
    embeddings, …) come with their exact square root when ``"sqrt"`` is requested.

    Args:
        model: the network; its parameters, ``.grad`` and buffers (BatchNorm's running statistics)
            are left as they were.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` instance
            (reduction mean or sum; BCE without ``weight``/``pos_weight``, targets in [0, 1]; a
            subclass only where it keeps their ``forward``).
        inputs, targets: one mini-batch (moved to the model's device).
        options: what to compute, an :class:`~curvlab.extract.ExtractOptions`; its fields can
            also be given as keyword arguments (``fisher="mc"``, ``stats=("kfac",)``,
            ``engine="autograd"``, ``kfac_approx="reduce"``, ``seed=0``, …), which override
            ``options``.

    Returns:
        :class:`Extraction`: block name → :class:`LayerStats`.
    """
    opts = ExtractOptions.make(options, overrides)
    check_materialised(model, "curvlab.extract")
    model = uncompiled(model)
    for what, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"curvlab.extract: {what} must be one torch.Tensor (a batch), got {type(value).__name__}"
                            + ("; for several inputs or keyword inputs, run your own forward inside `with "
                               "curvlab.extract.ExtractionSession(...)`" if what == "inputs" else ""))
        if value.is_meta:
            raise ValueError(f"curvlab.extract: {what} on the 'meta' device hold no data; give the batch itself")
    check_target_dtype(loss_fn, targets)
    with _model_left_as_it_was(model):
        try:
            return _run(model, loss_fn, inputs, targets, opts)
        except BackpackUnsupportedError as err:
            if opts.engine != "auto":
                raise
            why = err.reason
    with _model_left_as_it_was(model):
        result = _run(model, loss_fn, inputs, targets, ExtractOptions.make(opts, {"engine": "autograd"}))
    result.engine_reason = why  # (what stopped BackPACK while it ran)
    return result


def _run(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets: Tensor, opts: ExtractOptions) -> Extraction:
    session = ExtractionSession(model, loss_fn, opts, own_forward=True)
    device = session.device
    inputs, targets = inputs.to(device), targets.to(device)
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad(), session:
        output = session.forward_model(inputs)
        if not isinstance(output, Tensor):  # a (logits, aux) tuple, a dict of outputs: the loss cannot tell
            raise TypeError(
                f"curvlab.extract: the model returned a {type(output).__name__}, not the tensor of outputs the "
                "loss takes; wrap it in a module whose forward returns that tensor (e.g. model(x)[0] or "
                "model(x)['logits']), or run your own forward inside `with curvlab.extract.ExtractionSession(...)`"
            )
        loss = loss_fn(output, targets)
        loss.backward()
    # called under torch.autocast, the forward and backward are the caller's, the statistics are
    # formed outside it (in bfloat16 they were A, G, δΦ, δΨ of a float32 model: errors 2e-3)
    with torch.autocast(device.type, enabled=False):
        result = Extraction(session.results())
    result.loss = loss.detach()
    result.flavour = opts.fisher
    counted = {s.num_examples for s in result.values()}  # the engine's N (a model may reshape its input's)
    result.num_examples = counted.pop() if len(counted) == 1 else inputs.shape[0]
    result.engine, result.engine_reason = session.engine, session.engine_reason
    result.skipped = list(session.blocks.skipped)
    return result
