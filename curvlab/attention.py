"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules: Kronecker layers.

torch's ``nn.MultiheadAttention`` applies its projections inside its functional forward
(``F.multi_head_attention_forward``), where no module hook sees their inputs or the gradients at
their outputs: curvlab measures them as exact parameter blocks without Kronecker factors, and its
optimizers give them the first-order update.  :func:`kronecker_attention` replaces each one in a
model by a :class:`KroneckerAttention` that holds the *same parameter tensors* in ``nn.Linear``
modules — ``in_proj`` (the packed ``[3E, E]`` weight and its bias; with ``kdim`` or ``vdim`` other
than ``E``, torch's separate weights as ``q_proj``, ``k_proj`` and ``v_proj``) and the same
``out_proj`` — and computes the same function: torch's attention with the explicit softmax (its ``need_weights``
path; ``vmap`` has no batching rule for the fused kernels' backward on the CPU), a row that
attends to nothing given as torch gives it (NaN with ``need_weights``, else its fused path's
zeros, as torch's Transformer layers call it).  The projections
then are Kronecker layers of the report and of the optimizers, as a timm-style ``qkv``/``proj``
pair is; what no ``nn.Linear`` holds — the packed bias of separate weights, ``add_bias_kv``'s
``bias_k`` and ``bias_v`` — stays a parameter of the module (a parameter block).  The state dict keeps ``nn.MultiheadAttention``'s keys, so a checkpoint loads into
either model.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize


class KroneckerAttention(nn.Module):
    """The function of an ``nn.MultiheadAttention`` (same arguments, outputs and attributes), its
    projections applied by ``nn.Linear`` modules: ``in_proj`` (``E → 3E``, the packed
    ``in_proj_weight``/``in_proj_bias``) or, for ``kdim``/``vdim`` other than ``E``, ``q_proj``,
    ``k_proj`` and ``v_proj`` (torch's ``q_proj_weight``… without bias: the packed ``in_proj_bias``
    stays this module's ``qkv_bias``), and ``out_proj``.  Build it with :meth:`of` (sharing an
    existing module's parameters) or :func:`kronecker_attention`.

    Self-attention (``query is key is value``) calls ``in_proj`` once; cross-attention calls it on
    the query and on the key/value input, each call's unused output rows discarded (up to twice the
    projection's flops): one Kronecker block over both calls, as for any module called twice.
    ``is_causal`` is torch's hint that ``attn_mask`` is causal; the mask given is applied.
    """

    merge_masks = nn.MultiheadAttention.merge_masks  # torch's encoder fast path calls it

    def __init__(self, in_proj: nn.Linear | None, out_proj: nn.Linear, num_heads: int, dropout: float = 0.0,
                 batch_first: bool = False, *, qkv: tuple[nn.Linear, nn.Linear, nn.Linear] | None = None,
                 qkv_bias: nn.Parameter | None = None, bias_kv: tuple[nn.Parameter, nn.Parameter] | None = None,
                 add_zero_attn: bool = False) -> None:
        super().__init__()
        embed_dim = out_proj.in_features
        if qkv is None:
            fits = in_proj is not None and qkv_bias is None and (in_proj.in_features, in_proj.out_features) == (
                embed_dim, 3 * embed_dim)
        else:
            fits = in_proj is None and qkv[0].in_features == embed_dim and all(
                p.out_features == embed_dim and p.bias is None for p in qkv) and (
                qkv_bias is None or tuple(qkv_bias.shape) == (3 * embed_dim,))
        if not fits or embed_dim % num_heads:
            raise ValueError(
                f"KroneckerAttention: in_proj {in_proj}, qkv {qkv}, qkv_bias "
                f"{None if qkv_bias is None else tuple(qkv_bias.shape)} and out_proj {out_proj} with "
                f"num_heads={num_heads}; expected either in_proj E → 3E, or q, k, v projections E → E, kdim → E, "
                "vdim → E without bias (their packed bias [3E]: qkv_bias), and out_proj E → E, num_heads dividing E"
            )
        self.in_proj, self.out_proj = in_proj, out_proj
        self.embed_dim, self.kdim, self.vdim = (embed_dim, embed_dim, embed_dim) if qkv is None else (
            embed_dim, qkv[1].in_features, qkv[2].in_features)
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        # nn.MultiheadAttention's attributes that torch's Transformer layers read
        self._qkv_same_embed_dim, self.add_zero_attn = qkv is None, add_zero_attn
        self.q_proj = self.k_proj = self.v_proj = None
        if qkv is not None:
            self.q_proj, self.k_proj, self.v_proj = qkv
        self.qkv_bias = qkv_bias
        self.bias_k, self.bias_v = bias_kv or (None, None)
        names = ([("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias")] if qkv is None else
                 [(f"{c}_proj.weight", f"{c}_proj_weight") for c in "qkv"] + [("qkv_bias", "in_proj_bias")])
        self._renamed = tuple(names)  # this module's state-dict keys and nn.MultiheadAttention's
        self.register_state_dict_post_hook(_as_attention_keys)
        self.register_load_state_dict_pre_hook(_from_attention_keys)
        self.register_load_state_dict_post_hook(_missing_as_attention_keys)
        self._loaded_as = ""  # the prefix of the load in progress, for the keys it reports

    @classmethod
    def of(cls, attention: nn.MultiheadAttention, name: str = "") -> "KroneckerAttention":
        """The module computing what ``attention`` does, with its parameter tensors (not copies) and
        its train/eval mode.

        Raises:
            ValueError: naming ``name``, for what overrides torch's forward (a subclass),
                computes its weight (a parametrization), or has hooks of its own (they would be
                dropped).  A sequence-first module is converted with a warning:
                curvlab's statistics refuse it.
        """
        where = f"curvlab.kronecker_attention: module {name or '<root>'!r} ({type(attention).__name__})"
        if parametrize.is_parametrized(attention):  # (torch made it a subclass)
            raise ValueError(f"{where} has a parametrization (torch.nn.utils.parametrize, weight_norm) of "
                             f"{sorted(attention.parametrizations)}: a computed weight, no tensor an nn.Linear can "
                             "hold; convert first, then parametrize the converted module's in_proj")
        if type(attention) is not nn.MultiheadAttention:
            raise ValueError(f"{where} is a subclass of nn.MultiheadAttention, whose forward may differ from "
                             "torch's; only nn.MultiheadAttention itself is converted")
        hooks = [k for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                             "_load_state_dict_post_hooks") if getattr(attention, k, None)]
        if hooks:
            raise ValueError(f"{where} has hooks of its own ({', '.join(hooks)}), which the new module would not "
                             "have; convert the model before registering them")
        if not attention.batch_first:
            warnings.warn(f"{where} is sequence-first (batch_first=False): converted, but on batch-first [N, T, D] "
                          "data it attends across the batch (the examples coupled: another model), and on "
                          "sequence-first data curvlab's statistics refuse its layers; build it with batch_first=True",
                          UserWarning, stacklevel=3)
        bias_kv = None if attention.bias_k is None else (attention.bias_k, attention.bias_v)
        options = dict(dropout=attention.dropout, batch_first=attention.batch_first, bias_kv=bias_kv,
                       add_zero_attn=attention.add_zero_attn)
        if attention._qkv_same_embed_dim:
            module = cls(_linear(attention.in_proj_weight, attention.in_proj_bias), attention.out_proj,
                         attention.num_heads, **options)
        else:  # torch's separate weights share one packed bias, which no nn.Linear holds
            qkv = tuple(_linear(getattr(attention, f"{c}_proj_weight")) for c in "qkv")
            module = cls(None, attention.out_proj, attention.num_heads, qkv=qkv, qkv_bias=attention.in_proj_bias,
                         **options)
        return module.train(attention.training)

    # nn.MultiheadAttention's parameter names, read by torch's Transformer layers
    in_proj_weight = property(lambda self: None if self.in_proj is None else self.in_proj.weight)
    in_proj_bias = property(lambda self: self.qkv_bias if self.in_proj is None else self.in_proj.bias)
    q_proj_weight = property(lambda self: None if self.q_proj is None else self.q_proj.weight)
    k_proj_weight = property(lambda self: None if self.k_proj is None else self.k_proj.weight)
    v_proj_weight = property(lambda self: None if self.v_proj is None else self.v_proj.weight)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
                + (", add_zero_attn=True" if self.add_zero_attn else ""))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("KroneckerAttention: is_causal=True needs attn_mask (as nn.MultiheadAttention: "
                               "nn.Transformer.generate_square_subsequent_mask makes one)")
        for label, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim() or t.dim() not in (2, 3) or t.shape[-1] != width:
                raise ValueError(f"KroneckerAttention: {label} of shape {tuple(t.shape)}; expected "
                                 f"[L, {width}], or [N, L, {width}] batch-first / [L, N, {width}] sequence-first, "
                                 "all three alike")
        batched = query.dim() == 3
        # sequence-first: the projections run on [L, N, E], as the model gives it
        seq_first = batched and not self.batch_first
        batch_axis = 1 if seq_first else 0
        if key.shape[:-1] != value.shape[:-1] or (batched and key.shape[batch_axis] != query.shape[batch_axis]):
            raise ValueError(f"KroneckerAttention: query, key and value of shapes {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}; key and value need one length and the "
                             "query's batch size (as nn.MultiheadAttention)")
        q, k, v = (self._heads(t, seq_first) for t in self._project(query, key, value))  # [N, H, L, hd]
        n, _, length, source = *q.shape[:3], k.shape[-2]
        if self.bias_k is not None:  # one more key and value, appended as torch does (before the zero one)
            k, v = (torch.cat([t, b.view(1, self.num_heads, 1, self.head_dim).expand(t.shape[0], -1, -1, -1)], dim=-2)
                    for t, b in ((k, self.bias_k), (v, self.bias_v)))
        if self.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(*t.shape[:2], 1, t.shape[-1])], dim=-2) for t in (k, v))
        scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
        mask = self._mask(attn_mask, key_padding_mask, n if batched else None, length, source, scores.dtype)
        if mask is not None and k.shape[-2] > source:  # the appended keys attended by every row, as torch pads
            mask = F.pad(mask, (0, k.shape[-2] - source))
        if mask is None:
            weights = scores.softmax(dim=-1)
        elif need_weights:  # torch's need_weights path: NaN where a row attends to nothing
            weights = (scores + mask).softmax(dim=-1)
        else:  # its fused path's: zeros there (a left-padded row under a causal mask), finite gradients
            scores = scores + mask
            nowhere = (scores == float("-inf")).all(dim=-1, keepdim=True)
            weights = scores.masked_fill(nowhere, 0.0).softmax(dim=-1).masked_fill(nowhere, 0.0)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = weights @ v
        out = out.permute(2, 0, 1, 3) if seq_first else out.transpose(1, 2)
        out = self.out_proj(out.flatten(-2))
        if not batched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The projected query, key and value (each ``[..., E]``), every projection a module call."""
        if self.in_proj is None:
            biases = (None,) * 3 if self.qkv_bias is None else self.qkv_bias.chunk(3)
            return tuple(proj(t) if b is None else proj(t) + b
                         for proj, t, b in zip((self.q_proj, self.k_proj, self.v_proj), (query, key, value), biases))
        e = self.embed_dim
        if query is key and key is value:
            return self.in_proj(query).chunk(3, dim=-1)
        q = self.in_proj(query)[..., :e]
        if key is value:
            return q, *self.in_proj(key)[..., e:].chunk(2, dim=-1)
        return q, self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]

    def _heads(self, t: Tensor, seq_first: bool) -> Tensor:
        """``[N, L, E]`` (``[L, E]``; sequence-first ``[L, N, E]``) → ``[N, H, L, head_dim]``."""
        t = t.unflatten(-1, (self.num_heads, self.head_dim))
        if t.dim() == 3:
            t = t.unsqueeze(0)
        return t.permute(1, 2, 0, 3) if seq_first else t.transpose(1, 2)

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n: int | None, length: int,
              source: int, dtype: torch.dtype) -> Tensor | None:
        """The additive mask ``[N or 1, H or 1, L, S]`` (``True`` in a boolean mask: not attended);
        ``n``: the batch size (``None``: one unbatched sequence)."""
        masks = []
        if attn_mask is not None:
            shapes = ((length, source), ((n or 1) * self.num_heads, length, source))
            if tuple(attn_mask.shape) not in shapes:
                raise ValueError(f"KroneckerAttention: attn_mask of shape {tuple(attn_mask.shape)}; expected "
                                 f"{shapes[0]} or {shapes[1]} (N·num_heads, L, S)")
            masks.append(_additive(attn_mask, "attn_mask", dtype).reshape(-1, self.num_heads, length, source)
                         if attn_mask.dim() == 3 else _additive(attn_mask, "attn_mask", dtype))
        if key_padding_mask is not None:
            shape = (source,) if n is None else (n, source)
            if tuple(key_padding_mask.shape) != shape:
                raise ValueError(f"KroneckerAttention: key_padding_mask of shape {tuple(key_padding_mask.shape)}; "
                                 f"expected {shape} ({'S' if n is None else 'N, S'})")
            masks.append(_additive(key_padding_mask, "key_padding_mask", dtype).reshape(-1, 1, 1, source))
        return sum(masks[1:], masks[0]) if masks else None


def _additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"KroneckerAttention: {name} of dtype {mask.dtype}; only bool and floating masks are "
                         "supported (as nn.MultiheadAttention)")
    return mask.to(dtype)


def _linear(weight: nn.Parameter, bias: nn.Parameter | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and ``bias`` themselves (not copies)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def _as_attention_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict()`` with nn.MultiheadAttention's keys (``in_proj_weight``, ``in_proj_bias``…)."""
    for ours, torchs in module._renamed:
        if prefix + ours in state_dict:
            state_dict[prefix + torchs] = state_dict.pop(prefix + ours)


def _from_attention_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` of nn.MultiheadAttention's keys (or this module's own)."""
    module._loaded_as = prefix
    for ours, torchs in module._renamed:
        if prefix + torchs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + torchs)


def _missing_as_attention_keys(module: nn.Module, incompatible: object) -> None:
    """The missing keys reported as ``state_dict()`` writes them (``in_proj_weight``)."""
    renamed = {module._loaded_as + ours: module._loaded_as + torchs for ours, torchs in module._renamed}
    incompatible.missing_keys[:] = [renamed.get(k, k) for k in incompatible.missing_keys]


def kronecker_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` by a
    :class:`KroneckerAttention` holding the same parameter tensors; returns ``model`` (or the new
    module, where ``model`` is one).  Convert before building an optimizer: the parameters are
    the same objects, so param groups built before stay valid, but a curvlab optimizer reads the
    model's modules at its first step (or ``blocks()``) and keeps them — a conversion after that
    leaves its attention on the first-order update; build a new optimizer then.

    Raises:
        ValueError: naming the module path, for an attention :meth:`KroneckerAttention.of` cannot
            convert; ``model`` is left unchanged then.
    """
    if isinstance(model, nn.MultiheadAttention):
        return KroneckerAttention.of(model)
    converted: dict[int, KroneckerAttention] = {}
    places = []
    for path, child in model.named_modules(remove_duplicate=False):  # every place of a shared module
        if isinstance(child, nn.MultiheadAttention):
            if id(child) not in converted:  # one module used in several places stays one
                converted[id(child)] = KroneckerAttention.of(child, path)
            parent, _, name = path.rpartition(".")
            places.append((model.get_submodule(parent), name, converted[id(child)]))
    for parent, name, module in places:  # all checked first: a refusal leaves the model as it was
        setattr(parent, name, module)
    return model
