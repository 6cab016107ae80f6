"""Check a model against curvlab before any data is loaded or any training step is taken."""

from __future__ import annotations

import copy

import torch
from torch import nn

from curvlab.app.data import SHAPES, canonical_name
from curvlab.app.models import make_model
from curvlab.extract.engines import choose_engine
from curvlab.extract.validate import LayerUseCheck
from curvlab.model_blocks import model_blocks


def check_model(spec: str, dataset: str, *, skip_unsupported: bool = False,
                layer_uses: tuple[type[nn.Module], ...] = (nn.Module,), engine: str = "auto",
                coupled: bool = False, **model_kwargs: object) -> None:
    """Build ``spec`` for ``dataset``'s input shape, find its blocks and run two dummy inputs.

    Costs one model construction and one tiny forward pass (no data, no training), so a
    command fails on an unsupported model in a second, not after loading the data.  The
    Kronecker layers of the types ``layer_uses`` (``()``: none) must be used by their calls only;
    ``engine="backpack"``: BackPACK must run the model (in train mode with ``coupled``), as an
    extraction runs it.

    Raises:
        ValueError: unknown model or bad spec; ``curvlab.model_blocks.UnsupportedModelError``
            (a ``ValueError``) naming the unsupported module, its type and what is supported, or
            a layer used otherwise than by its calls (:class:`~curvlab.extract.validate.LayerUseCheck`);
            a forward pass that fails or does not give ``[N, num_classes]`` logits.
    """
    key = canonical_name(dataset)
    if key not in SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(SHAPES)}")
    input_shape, num_classes = SHAPES[key]
    with torch.random.fork_rng(devices=[]):  # a check: the caller's random state stays as it was
        try:
            model = make_model(spec, input_shape, num_classes, **model_kwargs)
        except (MemoryError, RuntimeError) as err:  # e.g. a typo in --hidden: torch's allocator error
            if not isinstance(err, MemoryError) and "can't allocate memory" not in str(err):
                raise
            options = "".join(f", {k}={v!r}" for k, v in model_kwargs.items())
            raise ValueError(f"model {spec!r}{options} does not fit in memory: {str(err).splitlines()[0]}") from err
    blocks = model_blocks(model, skip_unsupported=skip_unsupported)
    model.eval()  # no running-statistics update, no dropout
    try:
        # with gradients: the graph shows a layer's weight used outside its calls
        layers = {m: path for m, path in blocks.layers.items() if isinstance(m, layer_uses)}
        with torch.enable_grad(), LayerUseCheck(layers, blocks.of_layer) as uses:
            out = model(torch.zeros(2, *input_shape))
    except Exception as err:  # noqa: BLE001 — any failure of the user's forward is reported
        raise ValueError(f"model {spec!r}: its forward pass fails on inputs [2, *{input_shape}]: {err}") from err
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"model {spec!r} returns a {type(out).__name__}, not a tensor; curvlab needs logits "
                         f"[N, {num_classes}] for {dataset} (return the logits alone)")
    uses.check(out)
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(
            f"model {spec!r} maps inputs [2, *{input_shape}] to {tuple(out.shape)}; curvlab needs logits "
            f"[N, {num_classes}] for {dataset}"
        )
    if engine == "backpack":
        choose_engine(model.train(coupled), blocks, engine, own_forward=True, loss_fn=nn.CrossEntropyLoss())


def one_example_fails(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why ``model`` in train mode cannot take a batch of one example (a BatchNorm1d, or a
    BatchNorm2d at 1×1, normalises over the batch: torch refuses one value per channel), or
    ``None`` when it can.  Runs a copy of the model: its running statistics and the random state
    stay as they were."""
    trial = copy.deepcopy(model).train()
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            trial(example[:1])
        except Exception as err:  # noqa: BLE001 — any failure of the forward pass is the answer
            text = str(err).strip()
            return text.splitlines()[0] if text else type(err).__name__
    return None


#: Memory the exact blocks' square roots of a measured batch may take by default (bytes).
SQRT_BUDGET_BYTES = 4 * 2**30
#: Batch size of a measurement when the model is small enough.
DEFAULT_MEASURED_BATCH = 128


def measured_batch_size(model: nn.Module, num_classes: int, *, coupled: bool, budget_bytes: int = SQRT_BUDGET_BYTES) -> int:
    """The default ``N`` of an exact measurement (report, training probe): 128 examples, or fewer
    so that the square roots — at most ``K·P`` numbers for ``K = N·C`` columns and ``P``
    trainable parameters (a layer whose root is kept unfolded takes less:
    :class:`curvlab.sqrt.UnfoldedSqrt`), twice when a train-mode BatchNorm couples the examples
    (the exact root and the Kronecker statistics' own) — fit in ``budget_bytes``.  At least 2.
    (Not more: the comparison's Gram matrices and rotations grow with ``K`` too.)"""
    return max(2, min(DEFAULT_MEASURED_BATCH, budget_bytes // max(_root_bytes_per_example(model, num_classes, coupled), 1)))


def large_batch_note(model: nn.Module, num_classes: int, size: int, *, coupled: bool, option: str) -> str | None:
    """For a measured batch of ``size`` chosen by the user (``option``) whose square roots may
    take more than the default's budget (:func:`measured_batch_size`): how much, to read before
    a run that can exhaust the memory; ``None`` within the budget."""
    roots = size * _root_bytes_per_example(model, num_classes, coupled)
    if roots <= SQRT_BUDGET_BYTES:
        return None
    default, gib = measured_batch_size(model, num_classes, coupled=coupled), roots / 2**30
    return (f"{option} {size}: the exact square roots may take up to {gib:.1f} GiB, and the comparison "
            f"more (the default, {default}, keeps them within {SQRT_BUDGET_BYTES / 2**30:.0f} GiB)")


def _root_bytes_per_example(model: nn.Module, num_classes: int, coupled: bool) -> int:
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = num_classes * sum(p.numel() for p in params) * (params[0].element_size() if params else 4)
    return per_example * (2 if coupled else 1)
