"""Which curvature blocks a model has — the one definition extract, compare and the optimizers use.

Every trainable parameter of a model belongs to exactly one :class:`~curvlab.block.Block` (one
kind of module is refused, with an error that names it and says what to do):

* **Kronecker layers** (kind ``"kronecker"``): ``nn.Linear`` (on ``[N, …, D]`` inputs),
  ``nn.Conv1d/2d/3d`` (``groups=1``, any padding mode), ``nn.ConvTranspose1d/2d/3d``
  (``groups=1``) and ``nn.Embedding`` (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``):
  ``W̄ = [W b]``, or weight and bias apart.
* **Parameter blocks** (kind ``"parameter"``), one per tensor: the affine parameters of norm layers
  (BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm), ``nn.MultiheadAttention``'s packed
  projections (it applies them functionally, out of reach of module hooks, so its ``out_proj``
  is not a Kronecker layer either; :func:`curvlab.kronecker_attention` converts it to
  ``nn.Linear`` modules, which are), parameters held by your own module classes — a ViT's cls
  token and position embedding —, a Kronecker layer's trainable bias whose weight is frozen or
  tied, and one parameter (a weight or a bias) shared by several modules (a language model's decoder tied to its
  embedding, ``decoder.weight = encoder.weight``: listed in :attr:`ModelBlocks.tied`). Its
  gradient sums every use, with the roles of inputs and outputs swapped between an embedding and
  a decoder, so no Kronecker product describes it; its block is the exact one.
* Every other torch module's trainable tensors are parameter blocks too, listed in
  :attr:`ModelBlocks.unstructured`: a grouped or depthwise convolution (MobileNet, ConvNeXt,
  ResNeXt) and a grouped transposed one, ``nn.LSTM``/``nn.GRU``, ``nn.PReLU``, ``nn.Bilinear``, and
  the tensors a layer's weight is computed from (``weight_norm``'s ``g`` and ``v``, any
  ``torch.nn.utils.parametrize`` parametrization), with that layer's bias.  Their
  blocks are exact (the autograd engine's vjps through whatever the module computes); curvlab
  knows no Kronecker structure for them, so the optimizers give them the first-order update and
  name them.
* Refused, unless ``skip_unsupported=True`` leaves its parameters out (listed in
  :attr:`ModelBlocks.skipped`): an ``nn.Embedding`` with ``max_norm`` (its forward rewrites the
  weight), ``scale_grad_by_freq`` (its gradient is not the loss's) or ``sparse`` gradients.

A module *called* several times (tied weights, e.g. one ``nn.Linear`` applied twice) is one
block; the extraction engines accumulate its calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from curvlab.block import Block

#: Convolutions (their weight forms a Kronecker block over the patches).
CONV_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Transposed convolutions: a Kronecker block over the patches of their zero-stuffed input, with
#: the weight ``[C_in, C_out, *k]``'s first two axes swapped as its matrix form.
TRANSPOSED_CONV_LAYERS: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Module types whose weight forms a Kronecker block.
KRONECKER_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_LAYERS, *TRANSPOSED_CONV_LAYERS, nn.Embedding)
#: torch module types whose parameters become parameter blocks.
PARAMETER_LAYERS: tuple[type[nn.Module], ...] = (
    _BatchNorm, nn.LayerNorm, nn.GroupNorm, _InstanceNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
    nn.MultiheadAttention,
)

SKIP_HINT = (
    "Pass skip_unsupported=True (curvlab.extract, curvlab.compare; `curvlab report "
    "--skip-unsupported`) to leave its parameters out of the curvature blocks, or freeze them "
    "(requires_grad=False); curvlab's optimizers give such parameters the first-order update"
)


class UnsupportedModelError(ValueError):
    """The model contains a module curvlab cannot extract statistics for."""


@dataclass
class ModelBlocks:
    """The curvature blocks of a model.

    Attributes:
        blocks: every block, in the order of ``model.named_parameters()``.
        layers: Kronecker layer → its module path.
        of_layer: Kronecker layer → its blocks (``[W b]``, or weight and bias).
        skipped: paths of trainable parameters left out (``skip_unsupported=True``).
        tied: paths of the parameter blocks shared by several modules (as
            ``model.named_parameters()`` names them).
        unstructured: paths of the parameter blocks of torch modules with no Kronecker structure
            curvlab knows (a grouped convolution, an LSTM, a PReLU).
        enclosed: paths of the parameter blocks of Kronecker-type layers another module applies
            in its own forward (``nn.MultiheadAttention``'s ``out_proj``).
        packed: paths of ``nn.MultiheadAttention``'s own projection parameters (``in_proj_weight``,
            ``in_proj_bias``, ``q/k/v_proj_weight``, ``bias_k/v``), applied inside torch's
            functional attention.
        own: paths of the parameters of the model's own modules (classes defined outside torch),
            used in their own forward: no Kronecker layer curvlab can see (a cls token, a position
            embedding, a weight used through ``F.linear``).
        lone_biases: paths of Kronecker layers' biases whose weight is frozen or shared.
    """

    blocks: list[Block] = field(default_factory=list)
    layers: dict[nn.Module, str] = field(default_factory=dict)
    of_layer: dict[nn.Module, list[Block]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    tied: list[str] = field(default_factory=list)
    unstructured: list[str] = field(default_factory=list)
    enclosed: list[str] = field(default_factory=list)
    packed: list[str] = field(default_factory=list)
    own: list[str] = field(default_factory=list)
    lone_biases: list[str] = field(default_factory=list)

    @property
    def kronecker(self) -> list[Block]:
        """The Kronecker blocks."""
        return [b for b in self.blocks if b.kind == "kronecker"]

    @property
    def parameters(self) -> list[Block]:
        """The parameter blocks."""
        return [b for b in self.blocks if b.kind == "parameter"]


def own_weight(module: nn.Module) -> nn.Parameter | None:
    """``module.weight`` where it is a tensor of its own, else ``None`` — read without computing a
    parametrized weight (``torch.nn.utils.parametrize``), whose every read runs the
    parametrization: a train-mode ``spectral_norm``'s, a power-iteration step on its buffers."""
    if parametrize.is_parametrized(module, "weight"):
        return None
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def _where(name: str, module: nn.Module) -> str:
    return f"module {name or '<root>'!r} ({type(module).__name__})"


def kronecker_problem(module: nn.Module) -> str | None:
    """Why a Kronecker-layer type cannot be one here (``None``: it can)."""
    if isinstance(module, (*CONV_LAYERS, *TRANSPOSED_CONV_LAYERS)) and module.groups != 1:
        return f"has groups={module.groups}, a block-diagonal weight no one Kronecker product describes"
    if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.scale_grad_by_freq or module.sparse):
        return "uses max_norm, scale_grad_by_freq or sparse gradients, which are unsupported"
    return None


def _is_users_own(module: nn.Module) -> bool:
    """A module class defined outside torch (its parameters are used in the user's forward)."""
    return not type(module).__module__.startswith("torch.")


def check_materialised(model: nn.Module, who: str) -> None:
    """Raise ``TypeError`` if ``model`` is no module (a function: no modules, hence no blocks, to
    hook), ``ValueError`` naming the first parameter of ``model`` on the meta device (a shape
    without values: every statistic would fail deep inside torch) or not yet initialised (a lazy
    module's, e.g. ``nn.LazyLinear``, before its first forward: no shape at all)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}; wrap a function in "
                        "a module whose forward calls it, its parameters registered on the module")
    for name, p in model.named_parameters():
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"{who}: parameter {name!r} is not initialised yet (a lazy module's); run one forward pass "
                "first (torch's advice for lazy modules: a dry run before building an optimizer)"
            )
        if p.is_meta:
            raise ValueError(
                f"{who}: parameter {name!r} is on the meta device (a shape without values); materialise "
                "the model first, e.g. model.to_empty(device='cpu') and load its weights"
            )


def model_blocks(model: nn.Module, *, separate_bias: bool = False, skip_unsupported: bool = False) -> ModelBlocks:
    """The blocks of ``model`` (see the module docstring).

    Args:
        model: the network.
        separate_bias: Kronecker layers get ``<layer>.weight`` and ``<layer>.bias`` blocks.
        skip_unsupported: leave the parameters of unsupported modules out instead of raising.

    Raises:
        UnsupportedModelError: an unsupported module with trainable parameters (naming its path,
            its type and what is supported), or a model without trainable parameters.
    """
    check_materialised(model, "curvlab")
    owner: dict[int, tuple[str, str, nn.Module]] = {}  # id(param) → (param path, module path, module)
    sharers: dict[int, dict[nn.Module, None]] = {}  # id(param) → the modules sharing it, in order
    inside_packed: set[nn.Module] = set()
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.MultiheadAttention):
            inside_packed.update(m for m in module.modules() if m is not module)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            seen = owner.setdefault(id(p), (f"{path}.{pname}" if path else pname, path, module))
            if seen[2] is not module:
                sharers.setdefault(id(p), {seen[2]: None})[module] = None

    out = ModelBlocks()
    done: set[int] = set()
    for full, p in model.named_parameters():
        if id(p) in done or not p.requires_grad:
            continue
        _, path, module = owner[id(p)]
        done.add(id(p))
        if id(p) in sharers:
            out.blocks.append(Block.of_parameter(full, p, "+".join(type(m).__name__ for m in sharers[id(p)])))
            out.tied.append(full)
            continue
        enclosing = _packed_owner(model, module, inside_packed)
        # a weight computed from other tensors (weight_norm, a parametrization) is no trainable
        # tensor: those tensors are the blocks
        weight = own_weight(module) if isinstance(module, KRONECKER_LAYERS) else None
        weight_own = weight is not None and id(weight) not in sharers
        problem = kronecker_problem(module) if isinstance(module, KRONECKER_LAYERS) else None
        if weight_own and enclosing is None and weight.requires_grad:
            if problem is None:
                own_bias = id(getattr(module, "bias", None)) not in sharers  # a shared bias: its own block
                blocks = Block.of_layer(path, module, separate_bias=separate_bias, own_bias=own_bias)
                out.layers[module], out.of_layer[module] = path, blocks
                out.blocks.extend(blocks)
                done.update(id(q) for b in blocks for q in b.parameters())
                continue
            if isinstance(module, nn.Embedding):  # its forward rewrites or rescales the weight's gradient
                if skip_unsupported:
                    out.skipped.append(full)
                    continue
                raise UnsupportedModelError(f"curvlab: {_where(path, module)} {problem}. {SKIP_HINT}")
        known = isinstance(module, PARAMETER_LAYERS) or enclosing is not None or _is_users_own(module)
        # (a Kronecker layer's bias beside its frozen or tied weight is not unstructured)
        beside_weight = weight is not None and problem is None and p is module.bias
        if not known and not beside_weight:
            out.unstructured.append(full)
        if isinstance(module, KRONECKER_LAYERS) and enclosing is not None:
            out.enclosed.append(full)
        elif enclosing is not None:
            out.packed.append(full)
        elif _is_users_own(module) and not isinstance(module, PARAMETER_LAYERS):
            out.own.append(full)
        elif beside_weight:
            out.lone_biases.append(full)
        owner_type = type(enclosing if enclosing is not None else module).__name__
        out.blocks.append(Block.of_parameter(full, p, owner_type))
    if not out.blocks:
        raise UnsupportedModelError(
            "curvlab: the model has no trainable parameter curvlab supports"
            + (f" (left out: {out.skipped})" if out.skipped else "")
        )
    return out


def _packed_owner(model: nn.Module, module: nn.Module, inside_packed: set[nn.Module]) -> nn.Module | None:
    """The ``nn.MultiheadAttention`` that applies ``module``'s parameters functionally, if any."""
    if isinstance(module, nn.MultiheadAttention):
        return module
    if module not in inside_packed:
        return None
    return next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and any(c is module for c in m.modules()))
