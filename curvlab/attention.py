"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` modules: Kronecker layers.

torch's ``nn.MultiheadAttention`` applies its projections inside its functional forward
(``F.multi_head_attention_forward``), where no module hook sees their inputs or the gradients at
their outputs: curvlab measures them as exact parameter blocks without Kronecker factors, and its
optimizers give them the first-order update.  :func:`kronecker_attention` replaces each one in a
model by a :class:`KroneckerAttention` that holds the *same parameter tensors* in ``nn.Linear``
modules — ``in_proj`` (the packed ``[3E, E]`` weight and its bias) and the same ``out_proj`` — and
computes the same function: torch's attention with the explicit softmax (its ``need_weights``
path; ``vmap`` has no batching rule for the fused kernels' backward on the CPU), a row that
attends to nothing given as torch gives it (NaN with ``need_weights``, else its fused path's
zeros, as torch's Transformer layers call it).  Both projections
then are Kronecker layers of the report and of the optimizers, as a timm-style ``qkv``/``proj``
pair is.  The state dict keeps ``nn.MultiheadAttention``'s keys, so a checkpoint loads into
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
    ``in_proj_weight``/``in_proj_bias``) and ``out_proj``.  Build it with :meth:`of` (sharing an
    existing module's parameters) or :func:`kronecker_attention`.

    Self-attention (``query is key is value``) calls ``in_proj`` once; cross-attention calls it on
    the query and on the key/value input, each call's unused output rows discarded (up to twice the
    projection's flops): one Kronecker block over both calls, as for any module called twice.
    ``is_causal`` is torch's hint that ``attn_mask`` is causal; the mask given is applied.
    """

    merge_masks = nn.MultiheadAttention.merge_masks  # torch's encoder fast path calls it

    def __init__(self, in_proj: nn.Linear, out_proj: nn.Linear, num_heads: int, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        embed_dim = in_proj.in_features
        if in_proj.out_features != 3 * embed_dim or out_proj.in_features != embed_dim or embed_dim % num_heads:
            raise ValueError(
                f"KroneckerAttention: in_proj {in_proj.in_features} → {in_proj.out_features} and out_proj "
                f"{out_proj.in_features} → {out_proj.out_features} with num_heads={num_heads}; expected E → 3E, "
                "E → E and num_heads dividing E"
            )
        self.in_proj, self.out_proj = in_proj, out_proj
        self.embed_dim = self.kdim = self.vdim = embed_dim
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        # nn.MultiheadAttention's attributes that torch's Transformer layers read
        self._qkv_same_embed_dim, self.add_zero_attn = True, False
        self.bias_k = self.bias_v = self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        self.register_state_dict_post_hook(_as_attention_keys)
        self.register_load_state_dict_pre_hook(_from_attention_keys)
        self.register_load_state_dict_post_hook(_missing_as_attention_keys)
        self._loaded_as = ""  # the prefix of the load in progress, for the keys it reports

    @classmethod
    def of(cls, attention: nn.MultiheadAttention, name: str = "") -> "KroneckerAttention":
        """The module computing what ``attention`` does, with its parameter tensors (not copies) and
        its train/eval mode.

        Raises:
            ValueError: naming ``name``, for what has no packed ``E → 3E`` projection (``kdim`` or
                ``vdim`` other than ``embed_dim``: separate weights with one packed bias), adds to
                the keys and values (``add_bias_kv``, ``add_zero_attn``), overrides torch's
                forward (a subclass), computes its weight (a parametrization), or has hooks of its
                own (they would be dropped).  A sequence-first module is converted with a warning:
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
        if not attention._qkv_same_embed_dim:
            raise ValueError(f"{where} has kdim={attention.kdim}, vdim={attention.vdim} other than "
                             f"embed_dim={attention.embed_dim}: separate q, k, v weights with one packed bias, "
                             "which no nn.Linear holds; convert the model's other attention modules one by one "
                             "(model.x = curvlab.kronecker_attention(model.x)) and leave this one")
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError(f"{where} has add_bias_kv or add_zero_attn, which are not converted; convert the model's "
                             "other attention modules one by one (model.x = curvlab.kronecker_attention(model.x)) "
                             "and leave this one")
        hooks = [k for k in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                             "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                             "_load_state_dict_post_hooks") if getattr(attention, k, None)]
        if hooks:
            raise ValueError(f"{where} has hooks of its own ({', '.join(hooks)}), which the new module would not "
                             "have; convert the model before registering them")
        in_proj = nn.Linear(attention.embed_dim, 3 * attention.embed_dim, bias=attention.in_proj_bias is not None,
                            device="meta")
        in_proj.weight = attention.in_proj_weight
        if attention.in_proj_bias is not None:
            in_proj.bias = attention.in_proj_bias
        if not attention.batch_first:
            warnings.warn(f"{where} is sequence-first (batch_first=False): converted, but curvlab's statistics "
                          "refuse sequence-first layers in a batch-first model; build it with batch_first=True",
                          UserWarning, stacklevel=3)
        module = cls(in_proj, attention.out_proj, attention.num_heads, attention.dropout, attention.batch_first)
        return module.train(attention.training)

    @property
    def in_proj_weight(self) -> Tensor:
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> Tensor | None:
        return self.in_proj.bias

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        if is_causal and attn_mask is None:
            raise RuntimeError("KroneckerAttention: is_causal=True needs attn_mask (as nn.MultiheadAttention: "
                               "nn.Transformer.generate_square_subsequent_mask makes one)")
        for label, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != query.dim() or t.dim() not in (2, 3) or t.shape[-1] != self.embed_dim:
                raise ValueError(f"KroneckerAttention: {label} of shape {tuple(t.shape)}; expected "
                                 f"[L, {self.embed_dim}], or [N, L, {self.embed_dim}] batch-first / "
                                 f"[L, N, {self.embed_dim}] sequence-first, all three alike")
        batched, e = query.dim() == 3, self.embed_dim
        # sequence-first: the projections run on [L, N, E], as the model gives it
        seq_first = batched and not self.batch_first
        batch_axis = 1 if seq_first else 0
        if key.shape != value.shape or (batched and key.shape[batch_axis] != query.shape[batch_axis]):
            raise ValueError(f"KroneckerAttention: query, key and value of shapes {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)}; key and value need one shape and the "
                             "query's batch size (as nn.MultiheadAttention)")
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q = self.in_proj(query)[..., :e]
            if key is value:
                k, v = self.in_proj(key)[..., e:].chunk(2, dim=-1)
            else:
                k, v = self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]
        q, k, v = (self._heads(t, seq_first) for t in (q, k, v))  # [N, H, L, hd]
        n, _, length, _ = q.shape
        scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
        mask = self._mask(attn_mask, key_padding_mask, n if batched else None, length, k.shape[-2], scores.dtype)
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


_RENAMED = (("in_proj.weight", "in_proj_weight"), ("in_proj.bias", "in_proj_bias"))


def _as_attention_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict()`` with nn.MultiheadAttention's keys (``in_proj_weight``, ``in_proj_bias``)."""
    for ours, torchs in _RENAMED:
        if prefix + ours in state_dict:
            state_dict[prefix + torchs] = state_dict.pop(prefix + ours)


def _from_attention_keys(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """``load_state_dict`` of nn.MultiheadAttention's keys (or this module's own)."""
    module._loaded_as = prefix
    for ours, torchs in _RENAMED:
        if prefix + torchs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + torchs)


def _missing_as_attention_keys(module: nn.Module, incompatible: object) -> None:
    """The missing keys reported as ``state_dict()`` writes them (``in_proj_weight``)."""
    renamed = {module._loaded_as + ours: module._loaded_as + torchs for ours, torchs in _RENAMED}
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
