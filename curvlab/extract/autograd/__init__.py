"""The ``autograd`` extraction engine: curvature statistics of any differentiable ``forward``.

BackPACK needs a graph of modules it knows.  This engine needs only torch: forward hooks on the
target modules (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Embedding``)
keep each call's input and add a zero leaf ``ε`` to its output; ``torch.func.vmap`` over ``torch.autograd.grad`` then pushes
many cotangent columns back through the one recorded graph at once, in chunks under
``max_bytes``.  ResNets with train-mode BatchNorm, ViTs, functional ``forward``s, tied weights
(one module called twice) and token-id models all work; nothing here differentiates by hand.

Why ``autograd.grad`` under ``vmap`` rather than ``torch.func.vjp`` of the forward: the layer
output shapes are only known once the forward has run (a shape-probing second forward would
double BatchNorm's running-statistic updates and any dropout draws), and torch.func refuses the
in-place running-statistic updates of train-mode BatchNorm inside its transforms.  The vjp
itself is torch's; vmap batches the cotangents.

Two ways to run it: :func:`extract_autograd` runs its own forward pass (parameters detached,
except those whose gradients are asked for); :class:`~.recording.Recording` records any forward
pass run inside a ``with`` block — the user's own, in :class:`curvlab.extract.ExtractionSession`
and so in the optimizers' statistics pass — and runs the vjps when the loss module is called,
while the graph is intact (``retain_graph=True``), so the user's ``loss.backward()`` afterwards
is untouched and gives the gradient.

Maths (``curvlab.extract.maths`` notation).  ``L = R Σ_{n,s} ℓ_{n,s}`` over ``N`` examples and
``T_out`` loss terms per example (see :mod:`.loss_roots`); ``S`` the stacked root, ``C_total``
columns (exact ``C``, mc ``mc_samples``, empirical 1, in the order of ``flavours``).

* ``g`` (per call, ``[C_total, N, d_out, T]``): column ``c`` is the vjp with cotangent ``S_c``
  at every loss term of every example.  Without coupling and with ``T_out = 1`` this is the
  exact per-example root (BackPACK's).  Otherwise it is the convention of kfac-pytorch, ASDL and
  curvlinops' KFAC: per-example layer quantities of the *batch* computation, the coupling
  between examples (train-mode BatchNorm) and between the terms of one example (tokens of a
  sequence loss) ignored; ``A = 1/(N·T) Σ x xᵀ``, ``G = Σ g gᵀ`` (``statistics.kfac_factors``)
  are then curvlinops' ``KFACLinearOperator`` factors (expand) for outputs flattened to
  ``[N·T_out, C]`` with ``num_per_example_loss_terms = T_out`` (tested, coupled BN included).
  Under coupling, a column's vjp from every example at once leaves cross terms between
  different examples' root columns in ``g``, which depend on the chosen root of ``∇²L``; the
  mc flavour samples every example independently and its expectation has none of them.  So
  does a column's vjp from every loss term of one example (tokens) where a layer's ``T``
  positions meet several terms — ``kfac_approx="reduce"``, or ``"expand"`` with positions
  mixed after the layer (attention): the exact flavour's ``G`` then holds products of
  different terms' root columns, as curvlinops' does (equal to 1e-16), and differs from the
  dense GGN's factor (by 1.7–3.0 relative with reduce on a per-token model, 0.12–0.78 with
  expand after attention); the mc flavour's expectation is the dense GGN's.
* ``sqrt`` (per module, ``[K, d_out, D]``, summed over calls): the exact block's square root,
  ``F = Σ_k vec(M_k) vec(M_k)ᵀ = Jᵀ (∇²_f L) J`` (GGN; mc: its unbiased estimate; empirical:
  ``R Σ_{n,s} ∇ℓ_{n,s} ∇ℓ_{n,s}ᵀ``, one column per loss term as curvlinops' EF).  One column
  per (root column ``c``, term ``s``, example ``n``), ``k = (c·T_out + s)·N + n`` (BackPACK's
  ``c·N + n`` when ``T_out = 1``; BackPACK's own CE root for ``[N, C, T]`` logits also
  separates the terms as ``c·T + s``).  Coupled: each column's cotangent sits at one example
  and its vjp reaches all examples, ``M_k = Σ_{calls} Σ_{n'} Σ_t g_{k,n',t} x_{n',t}ᵀ``
  contracted chunk by chunk — or, for a Linear or convolution whose batch has fewer locations
  than its width (``N·ΣT < D``), those roots kept instead (``LayerCall.coupled_roots``, at
  ``N·ΣT/D`` of the size; ``LayerResult.square_root()`` contracts them).

Scale convention (sequence losses): every loss term carries ``R`` (CE mean ``1/(N·T_out)``, MSE
and BCE mean ``1/numel``), i.e. ``F`` is the curvature of the loss *as torch computes it*; per-token
CE on ``[N, C, T]`` logits with ``[N, T]`` targets has ``T_out = T`` terms per example.

Cost model (``P_out = Σ_calls N·d_out·T`` output-gradient numbers of one column; ``A`` the
activations autograd saves):

* forward: one pass; per target call one extra add (the ``ε`` leaf is a broadcast scalar).
* ``g``: ``C_total`` vjps, vmapped ``k = max_bytes // per_column`` at a time with
  ``per_column ≈ A + 2·P_out + |output|`` bytes; result ``C_total·P_out`` numbers.
* ``sqrt`` without coupling, ``T_out = 1``: no vjp (``M`` from ``x``, ``g``); result
  ``C_total·N·Σ d_out·D``.
* ``sqrt`` without coupling, ``T_out > 1``: ``C_total·T_out`` vjps (all examples in each),
  per column also ``N·d_out·D`` for the contraction; result ``C_total·T_out·N·Σ d_out·D``.
* ``sqrt`` coupled: ``C_total·T_out·N`` vjps, per column also ``d_out·D``; the
  ``[K, N, d_out, T]`` gradients exist one chunk at a time only; same result size, or
  ``K·N·Σ_calls d_out·T`` where those gradients are kept (``N·ΣT < D``).
* ``x``: the unfolded inputs, ``N·D·T`` per call (convolutions: the im2col blow-up).
* ``g_terms`` (``T_out > 1``, ``terms=True``): ``C_sel·T_out`` vjps, all examples in each.
* parameter blocks (``params``): their per-column gradients need one vjp per (root column, term,
  example) — the coupled route's ``C_sel·T_out·N`` vjps, whether or not the examples are coupled
  (a parameter used outside a layer has no per-example factorisation); shared with the coupled
  exact roots when both are wanted.  Except, where the examples are not coupled and each has one
  term, the parameters of the modules in ``local`` (a norm layer — an eval-mode BatchNorm,
  GroupNorm, LayerNorm —, a grouped convolution, called once: :mod:`.local_params`): their roots follow from the gradients at the
  module's output, which the ``g`` pass has for every example, and the module's input.  The
  other parameters there (held by the model's own class — a ViT's cls token and position
  embedding —, or a norm layer called twice) take the model run on one example at a time, where
  the loss is of the output of its only call in the block (:mod:`.reruns`): ``N`` forwards of one
  example and ``N`` vjps of ``C_sel`` columns, about the work of ``C_sel`` batched vjps; where a
  rerun's output is not the batch's row (active dropout, a forward that depends on the batch),
  the generic route above.

``max_bytes`` bounds the estimate, not a measurement.  Measured on one CPU thread (ResNet, width
16, 16×16 images, N = 32, coupled, 330 vjps): 12.5 s with the default (114 columns a chunk),
5 s with ``max_bytes = 2**26`` (7 columns): CPU convolution backward slows down on very large
folded batches, so on CPU a smaller bound can be faster; on GPUs larger chunks amortise launches.
An operation whose backward has no vmap batching rule falls back to torch's slow per-column
path with a performance warning (e.g. ``F.scaled_dot_product_attention`` on CPU);
``vectorize=False`` loops over the columns explicitly.

Coupling: a batch-statistics BatchNorm module couples the examples (:func:`couples_examples`);
what no module shows (a batch mean, ``F.batch_norm``) is found at the loss call by one probing
vjp (:func:`~.recording.probe_coupling`: a random cotangent at example 0's output alone reaches no
other example's layer outputs in an uncoupled forward, exactly: their gradients are exact zeros).

Limits: target inputs are kept by reference, so a forward that modifies a target's input in place
after the call is refused; targets must see the batch as their leading dimension (a layer
applied to a ``[N·T, D]`` reshape, or to a sequence-first ``[T, N, D]`` tensor, is refused —
where ``T = N`` by the probing vjp —, and so is a layer called on one input broadcast over the
batch, as ``wpe(torch.arange(T))`` — where ``T = N`` by one more forward pass on ``N + 1``
examples, :mod:`.batch_check`, unless the model cannot run that batch size); so is activation
checkpointing (``torch.utils.checkpoint``
recomputes a forward in the backward pass, or runs it without gradients); a user's forward hook
on a layer may change its output (the recording's own hook runs first, at the layer's own
output; BackPACK is not chosen for such a model); grouped convolutions and Embedding with
``max_norm``/``scale_grad_by_freq`` are no Kronecker targets (``curvlab.extract`` makes a
grouped convolution's tensors parameter blocks), and CE with class weights is unsupported (CE
targets equal to ``ignore_index`` drop their terms, as torch's loss does: :mod:`.loss_roots`).

Public API: :func:`extract_autograd`, :func:`couples_examples`, :func:`default_targets`,
:class:`Recording` and :class:`Request` (recording a forward pass run elsewhere), and the result
types :class:`AutogradExtraction`, :class:`LayerResult`, :class:`LayerCall`.
"""

from curvlab.extract.autograd.engine import couples_examples, extract_autograd
from curvlab.extract.autograd.layer_io import default_targets
from curvlab.extract.autograd.recording import Recording, Request
from curvlab.extract.autograd.results import AutogradExtraction, LayerCall, LayerResult

__all__ = [
    "AutogradExtraction",
    "LayerCall",
    "LayerResult",
    "Recording",
    "Request",
    "couples_examples",
    "default_targets",
    "extract_autograd",
]
