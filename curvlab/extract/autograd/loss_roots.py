"""The loss side of the engine: loss terms, reduction factor and the loss-Hessian square roots.

A supported loss is a sum of independent *loss terms*, ``L = R Σ_{n,s} ℓ_{n,s}(f_{n,s})``, each
a function of one ``C``-vector of the model output:

* ``nn.CrossEntropyLoss`` on logits ``[N, C]`` or ``[N, C, d_1, …]`` (targets ``[N, d_1, …]``,
  class indices, or class probabilities; ``label_smoothing`` too — targets summing to one leave
  the loss-Hessian ``diag(p) − ppᵀ`` as it is, only the gradient changes): one term per example
  and position ``s`` over ``d_1·d_2…``, the classes on dimension 1.  ``R = 1/(N·T_out)`` for
  ``reduction="mean"`` (torch averages over every position), 1 for ``"sum"``.  A class-index
  target equal to ``ignore_index`` (padding, ``-100`` by default) drops its term, as torch's
  loss does: every root is zero there, and ``"mean"`` averages over the terms kept,
  ``R = 1/(number kept)``.
* ``nn.MSELoss`` and ``nn.BCEWithLogitsLoss`` on outputs ``[N, …, C]``: the last dimension is the
  "class" dimension, every position over the middle dimensions is a term (outputs ``[N]``: one
  term of ``C = 1`` per example).  ``R = 1/numel`` for
  ``"mean"`` (torch averages over every element), 1 for ``"sum"``.  BCE is ``C`` independent
  Bernoulli likelihoods with logits ``f`` (targets: probabilities of the label 1).

``T_out`` is the number of loss terms per example (curvlinops' ``num_per_example_loss_terms``).
Since the Hessian of ``L`` w.r.t. the output is block diagonal over terms, a square root is a set
of *columns*: tensors shaped like the output.  Roots here are stacked as ``[C_root, *out.shape]``
where column ``c`` carries, at every term at once, that term's ``c``-th root column:

* ``exact``: ``C`` columns, per term ``S = √R (diag(√p) − p √pᵀ)`` (CE), ``√(2R) I`` (MSE) or
  ``√R diag(√(σ(1 − σ)))`` (BCE, ``σ = sigmoid(f)``) — BackPACK's ``sqrt_hessian`` and
  curvlinops' ``loss_hessian_matrix_sqrt``;
* ``mc``: ``mc_samples`` columns ``√R (∇_f ℓ(f, ỹ)) / √mc_samples`` with labels ``ỹ`` drawn from
  the model's predictive distribution, with the very RNG calls of BackPACK's
  ``sqrt_hessian_sampled`` (so a seeded run draws the same labels as ``curvlab.extract``);
* ``empirical``: one column ``∇_f L / √R = √R ∇_f Σ ℓ`` with the true targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Binomial, Categorical, Normal
from torch.nn.functional import one_hot

from curvlab.extract.autograd.backprop import short_of
from curvlab.extract.validate import ELEMENTWISE_LOSSES, SUPPORTED_LOSSES
from curvlab.stats import FLAVOURS


@dataclass(frozen=True)
class LossTerms:
    """How the model output splits into loss terms.

    Attributes:
        output_shape: shape of the model output.
        class_dim: 1 (cross-entropy) or ``output.dim() - 1`` (MSE, BCE; 0 for outputs ``[N]``).
        num_examples: N.
        terms_per_example: ``T_out`` (curvlinops' ``num_per_example_loss_terms``).
        num_classes: C, the length of one term's output vector.
        reduction_factor: R in ``L = R Σ ℓ``.
        kept: ``[N, T_out]``, the terms the loss counts — ``None``: all; False where a
            cross-entropy target equals ``ignore_index`` (torch's loss drops that term and, for
            ``"mean"``, averages over the others: ``R = 1 / (number kept)``).
    """

    output_shape: torch.Size
    class_dim: int
    num_examples: int
    terms_per_example: int
    num_classes: int
    reduction_factor: float
    kept: Tensor | None = None

    def masked(self, root: Tensor) -> Tensor:
        """``root`` (``[*lead, *output_shape]``) with the dropped terms' entries zero."""
        if self.kept is None:
            return root
        return self.from_terms(self.to_terms(root) * self.kept[..., None].to(root.dtype))

    def to_terms(self, t: Tensor) -> Tensor:
        """``[*lead, *output_shape]`` → ``[*lead, N, T_out, C]``."""
        lead = t.dim() - len(self.output_shape)
        t = t.movedim(lead + self.class_dim, -1)
        return t.reshape(*t.shape[:lead], self.num_examples, self.terms_per_example, self.num_classes)

    def from_terms(self, t: Tensor) -> Tensor:
        """``[*lead, N, T_out, C]`` → ``[*lead, *output_shape]`` (inverse of :meth:`to_terms`)."""
        lead = t.dim() - 3
        moved = list(self.output_shape)
        moved.append(moved.pop(self.class_dim))
        return t.reshape(*t.shape[:lead], *moved).movedim(-1, lead + self.class_dim)


def loss_terms(loss_fn: nn.Module, output: Tensor, targets: Tensor, batch_size: int | None = None) -> LossTerms:
    """Validate ``loss_fn(output, targets)`` and describe its terms.

    ``batch_size``: the examples the layers saw, where the loss's rows are ``k`` times as many —
    a sequence model's ``[N, T, C]`` logits flattened to ``[N·T, C]`` rows (``logits.view(-1, C)``,
    curvlinops' form of a per-token loss): rows ``n·k … n·k + k − 1`` are example ``n``'s terms
    (the caller checks that they are).

    Raises:
        ValueError: for unsupported losses, options, or shapes.
    """
    name = type(loss_fn).__name__
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise ValueError(f"autograd engine: loss {name} unsupported; use nn.CrossEntropyLoss, nn.MSELoss or "
                         "nn.BCEWithLogitsLoss")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"autograd engine: {name}(reduction={loss_fn.reduction!r}); use 'mean' or 'sum'")
    if output.dim() < 1:
        raise ValueError("autograd engine: the model output needs a batch dimension")
    n = output.shape[0]
    if batch_size and n > batch_size and n % batch_size == 0:
        n = batch_size
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            raise ValueError("autograd engine: CrossEntropyLoss with class weights is unsupported")
        if output.dim() < 2:
            raise ValueError(f"autograd engine: CrossEntropyLoss needs logits [N, C, ...], got {tuple(output.shape)}")
        if targets.dtype.is_floating_point:  # class probabilities (checked by check_loss_inputs)
            if targets.shape != output.shape:
                raise ValueError(f"autograd engine: CrossEntropyLoss class-probability targets "
                                 f"{tuple(targets.shape)} != logits {tuple(output.shape)}")
        elif targets.shape != output.shape[:1] + output.shape[2:]:
            raise ValueError(
                "autograd engine: CrossEntropyLoss needs class-index targets of shape "
                f"{tuple(output.shape[:1] + output.shape[2:])} (or class probabilities shaped like the "
                f"logits), got {targets.dtype} {tuple(targets.shape)}"
            )
        class_dim, classes = 1, output.shape[1]
        terms = output[:, 0].numel() // max(n, 1)
        kept = None if targets.dtype.is_floating_point else (targets != loss_fn.ignore_index).reshape(n, terms)
        counted = n * terms if kept is None else int(kept.sum())
        if kept is not None and counted == n * terms:
            kept = None
        r = 1.0 / counted if loss_fn.reduction == "mean" and counted else 1.0
        return LossTerms(output.shape, class_dim, n, terms, classes, r, kept)
    else:
        if targets.shape != output.shape:
            raise ValueError(f"autograd engine: {name} targets {tuple(targets.shape)} != output {tuple(output.shape)}")
        if output.dim() == 1:  # one output per row (a binary classifier's logit): C = 1
            class_dim, classes, terms = 0, 1, output.numel() // max(n, 1)
        else:
            class_dim, classes = output.dim() - 1, output.shape[-1]
            terms = output[..., 0].numel() // max(n, 1)
        r = 1.0 / output.numel() if loss_fn.reduction == "mean" else 1.0
    return LossTerms(output.shape, class_dim, n, terms, classes, r)


def exact_root(loss_fn: nn.Module, output: Tensor, terms: LossTerms) -> Tensor:
    """``[C, *out.shape]``: column ``v`` of every term's exact root, all terms at once."""
    scale = math.sqrt(terms.reduction_factor)
    if isinstance(loss_fn, ELEMENTWISE_LOSSES):
        eye = torch.eye(terms.num_classes, dtype=output.dtype, device=output.device)
        if isinstance(loss_fn, nn.MSELoss):
            root = (eye * (math.sqrt(2.0) * scale))[:, None, None, :].expand(
                -1, terms.num_examples, terms.terms_per_example, -1)
        else:  # BCE: the Bernoulli variance σ(1 − σ) on the diagonal
            sigma = terms.to_terms(output).sigmoid()
            root = eye[:, None, None, :] * (sigma * (1 - sigma)).sqrt().mul(scale)
        return terms.from_terms(root)
    p = terms.to_terms(output).softmax(-1)  # [N, T, C]
    tau = p.sqrt()
    s = torch.diag_embed(tau) - p[..., :, None] * tau[..., None, :]  # S[n, t, c, v]
    if terms.kept is not None:  # a dropped term has no curvature
        s = s * terms.kept[..., None, None].to(s.dtype)
    return terms.from_terms(s.movedim(-1, 0) * scale)  # column v first


def mc_root(loss_fn: nn.Module, output: Tensor, terms: LossTerms, mc_samples: int) -> Tensor:
    """``[mc_samples, *out.shape]``, drawing exactly as BackPACK's ``sqrt_hessian_sampled``.

    BackPACK (``core/derivatives/crossentropyloss.py``, ``mseloss.py`` and
    ``bcewithlogitsloss.py``, manual mode): CE builds ``Categorical(probs moved to the last
    dim).sample([M])`` and returns ``probs − onehot``; BCE ``σ − Binomial(σ).sample([M])``; MSE
    builds ``Normal(f, tensor(√0.5)).sample([M])`` and returns ``2 (ỹ − f)``; all are divided by
    ``√M`` and, for ``"mean"``, by ``√(1/R)``.  The same distribution objects and the same calls
    consume the generator identically — except that MSE's noise is drawn around 0, not around
    ``f``: ``ỹ − f`` lost the draw to cancellation in float32 once ``|f|`` was ~1e7 (+16 % at
    1e7, a zero Fisher from 1e8). Both engines
    take their MC root here.
    """
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        probs = output.softmax(dim=1)
        # a softmax needs no validation (0.16 ms of 1.0 for 1024 × 10); the draws are the same
        dist = Categorical(torch.einsum("nc...->n...c", probs), validate_args=False)
        samples = dist.sample(torch.Size([mc_samples]))  # [M, N, ...]
        onehot = torch.einsum("vn...c->vnc...", one_hot(samples, num_classes=probs.shape[1])).to(probs.dtype)
        # (a dropped term's label is drawn all the same: the RNG stays BackPACK's)
        root = terms.masked(probs.unsqueeze(0).expand(mc_samples, *probs.shape) - onehot)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):  # BackPACK's draws: Binomial(σ), σ − ỹ
        probs = output.sigmoid()
        root = probs - Binomial(probs=probs, validate_args=False).sample(torch.Size([mc_samples]))
    else:
        # BackPACK's scale, √½ in the default dtype (the same draws); filled on the device, where a
        # tensor from a number is a copy (on a GPU one that waits)
        dist = Normal(torch.zeros_like(output),
                      torch.full((), math.sqrt(0.5), dtype=torch.get_default_dtype(), device=output.device))
        root = 2 * dist.sample(sample_shape=torch.Size([mc_samples]))  # ỹ − f
    root = root / math.sqrt(mc_samples)
    if loss_fn.reduction == "mean":
        root = root / math.sqrt(1.0 / terms.reduction_factor)
    return root


def empirical_root(loss_fn: nn.Module, output: Tensor, targets: Tensor, terms: LossTerms) -> Tensor:
    """``[1, *out.shape]``: ``∇_f L / √R`` with the true targets (the loss's own ``forward``:
    none of the hooks an extraction keeps on the loss module run)."""
    out = output.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn.forward(out, targets), out)
    return (grad / math.sqrt(terms.reduction_factor)).unsqueeze(0)


def check_root_fits(output: Tensor, terms: LossTerms, flavours: Sequence[str], mc_samples: int) -> None:
    """Refuse, before it is formed, a stacked root larger than the device's free memory: under
    ``"exact"`` every term has one column per class, ``C²`` numbers (a language model's
    vocabulary: 50 000 classes are 10 GB a token in float32)."""
    classes = terms.num_classes
    columns = {"exact": classes, "mc": mc_samples, "empirical": 1}
    # (an exact cross-entropy root is built through two temporaries of its size)
    per_entry = sum(columns.get(f, 1) * (3 if f == "exact" else 1) for f in flavours)
    need = per_entry * output.numel() * output.element_size()
    free = short_of(need, output.device)
    if free is not None:
        hint = (
            "the 'exact' flavour (fisher='exact', or exact Kronecker factors: KFLR's, and those of "
            "fisher='exact' optimizers) has a column per class: use fisher='mc' without 'kflr'"
            if "exact" in flavours else "use fewer mc_samples"
        )
        raise MemoryError(
            f"curvlab.extract: the loss-Hessian roots of the flavours {'/'.join(flavours)} need {need / 2**30:.1f} "
            f"GiB for an output of shape {tuple(output.shape)} ({classes} classes), more than the "
            f"{free / 2**30:.1f} GiB free on {output.device}; {hint}, or fewer examples"
        )


def stacked_root(
    loss_fn: nn.Module,
    output: Tensor,
    targets: Tensor,
    terms: LossTerms,
    flavours: Sequence[str],
    mc_samples: int,
) -> tuple[Tensor, dict[str, slice]]:
    """The roots of ``flavours`` stacked along dim 0, and each flavour's slice of that dim."""
    output = output.detach()
    check_root_fits(output, terms, flavours, mc_samples)
    roots, segments, start = [], {}, 0
    for flavour in flavours:
        if flavour == "exact":
            root = exact_root(loss_fn, output, terms)
        elif flavour == "mc":
            root = mc_root(loss_fn, output, terms, mc_samples)
        elif flavour == "empirical":
            root = empirical_root(loss_fn, output, targets, terms)
        else:
            raise ValueError(f"autograd engine: unknown flavour {flavour!r}; choose from {FLAVOURS}")
        segments[flavour] = slice(start, start + root.shape[0])
        start += root.shape[0]
        roots.append(root)
    return torch.cat(roots, 0), segments
