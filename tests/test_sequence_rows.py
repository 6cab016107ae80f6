"""A loss on ``[N·T, C]`` rows of ``N`` sequences — a language model's ``logits.reshape(-1, C)``,
curvlinops' form of a per-token loss — is ``T`` loss terms per example: the dense GGN, and the
very statistics and steps of the same logits as ``[N, C, T]``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC
from helpers import dense_ggn, dense_grad

DT = torch.float64
VOCAB, T, N, DIM = 7, 5, 4, 6


class TinyLM(nn.Module):
    """Embedding → Linear → Linear on ``[N, T]`` ids; the logits as ``layout`` says: ``"rows"``
    (``[N·T, C]``, batch-first flattened), ``"nct"`` (``[N, C, T]``) or ``"sequence-first"``
    (``[T·N, C]``: the rows of one position together)."""

    def __init__(self, layout: str, norm: bool = False, tied: bool = False) -> None:
        super().__init__()
        self.layout = layout
        self.embed, self.mix, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)
        self.norm = nn.BatchNorm1d(DIM) if norm else None
        if tied:  # GPT-2's decoder: the embedding's weight, one parameter block, no recorded layer
            self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.mix(self.embed(ids))
        if self.norm is not None:  # train mode: the examples are coupled
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        out = self.head(torch.tanh(h))  # [N, T, C]
        if self.layout == "nct":
            return out.transpose(1, 2)
        if self.layout == "sequence-first":
            return out.transpose(0, 1).reshape(-1, VOCAB)
        return out.reshape(-1, VOCAB)


def model_and_batch(layout: str, seed: int = 0, norm: bool = False, tied: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    """The model (float64) and ``[N, T]`` ids and next ids, a few of them padding (-100)."""
    torch.manual_seed(seed)
    model = TinyLM(layout, norm, tied).to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (N, T), generator=gen)
    targets = torch.randint(0, VOCAB, (N, T), generator=gen)
    targets[0, 3:] = targets[2, 4] = -100
    return model, ids, targets


def targets_for(layout: str, targets: Tensor) -> Tensor:
    return {"nct": targets, "rows": targets.reshape(-1), "sequence-first": targets.T.reshape(-1)}[layout]


@pytest.mark.parametrize("engine", ["autograd", "auto"])
def test_rows_give_the_dense_ggn_and_gradient(engine: str) -> None:
    """Every block's exact Fisher and gradient against torch.func's, padded terms dropped; "auto"
    takes the autograd engine (BackPACK's losses would count 20 rows as 20 examples)."""
    model, ids, targets = model_and_batch("rows")
    y, loss_fn = targets.reshape(-1), nn.CrossEntropyLoss()
    stats = curvlab.extract(model, loss_fn, ids, y, fisher="exact", engine=engine)
    assert stats.engine == "autograd"
    for layer in ("embed", "mix", "head"):
        block = stats[layer]
        torch.testing.assert_close(block.dense_fisher(), dense_ggn(model, loss_fn, ids, y, layer), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(block.layout.to_vector(block.grad), dense_grad(model, loss_fn, ids, y, layer),
                                   rtol=1e-10, atol=1e-14)


def test_backpack_refuses_rows_naming_them() -> None:
    model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, VOCAB), nn.Flatten(0, 1)).to(DT)
    x, y = torch.randn(N, T, DIM, dtype=DT), torch.randint(0, VOCAB, (N * T,))
    with pytest.raises(ValueError, match=f"the loss has {N * T} rows for the model's {N} examples"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack")
    stats = curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact")  # auto: the autograd engine
    torch.testing.assert_close(stats["2"].dense_fisher(), dense_ggn(model, nn.CrossEntropyLoss(), x, y, "2"),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")], ids=["mean", "sum"])
def test_rows_give_the_statistics_of_nct_logits(loss_fn: nn.Module) -> None:
    """Every flavour (MC with the same seed draws the same labels), KFAC's factors, TKFAC's traces
    and the exact square roots."""
    got = {}
    for layout in ("rows", "nct"):
        model, ids, targets = model_and_batch(layout)
        got[layout] = curvlab.extract(model, loss_fn, ids, targets_for(layout, targets), fisher="mc", mc_samples=2,
                                      kfac_flavours=("exact", "mc", "empirical"), stats=("kfac", "tkfac", "sqrt"),
                                      seed=3, engine="autograd")
    for layer, theirs in got["nct"].items():
        ours = got["rows"][layer]
        for flavour, factors in theirs.kfac.items():
            torch.testing.assert_close(ours.kfac[flavour].A, factors.A, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(ours.kfac[flavour].G, factors.G, rtol=1e-12, atol=1e-15)
        for field in ("delta", "delta_phi", "delta_psi"):
            torch.testing.assert_close(getattr(ours.tkfac, field), getattr(theirs.tkfac, field), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours.sqrt.matrices(), theirs.sqrt.matrices(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, TKFAC, TEKFAC], ids=lambda c: c.__name__)
def test_optimizers_take_the_steps_of_nct_logits(cls) -> None:
    """Statistics steps (the MC Fisher, sampled from the optimizer's generator), refreshes and
    EKFAC/TEKFAC's rescaling."""
    params = {}
    for layout in ("rows", "nct"):
        model, ids, targets = model_and_batch(layout)
        y, loss_fn = targets_for(layout, targets), nn.CrossEntropyLoss()
        opt = cls(model, lr=0.1, stats_interval=1, eigen_interval=3, scale_interval=1, factor_dtype="float64")
        for _ in range(5):
            opt.zero_grad()
            with opt.track(loss_fn):
                loss_fn(model(ids), y).backward()
            opt.step()
        params[layout] = torch.cat([p.detach().flatten() for p in model.parameters()])
    model, _, _ = model_and_batch("rows")
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (params["rows"] - start).abs().max() > 1e-3  # the steps moved the model
    torch.testing.assert_close(params["rows"], params["nct"], rtol=1e-10, atol=1e-13)


def test_rows_not_grouped_by_example_are_refused() -> None:
    """Sequence-first logits flattened put one position of every example together: refused, not
    mistaken for the terms of one example; so are rows of examples the forward couples."""
    model, ids, targets = model_and_batch("sequence-first")
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=rf"{N * T} rows for the {N} examples the layers' leading dimension counts, taken as {T} rows an example "
                                         r"in order, but example \d's entries of the output of 'head' receive rows taken for another"):
        curvlab.extract(model, loss_fn, ids, targets_for("sequence-first", targets), engine="autograd")
    opt = KFAC(model, lr=0.1)
    with pytest.raises(ValueError, match="are not grouped by example"), opt.track(loss_fn):
        loss_fn(model(ids), targets_for("sequence-first", targets)).backward()
    model, ids, targets = model_and_batch("rows", norm=True)
    with pytest.raises(ValueError, match="the forward couples the examples"):
        curvlab.extract(model, loss_fn, ids, targets.reshape(-1), engine="autograd")


class CausalSequenceFirst(nn.Module):
    """PyTorch's word_language_model layout: ids ``[T, N]``, every layer on ``[T, N, ·]``, each
    position mixing the positions before it (a running mean); the logits ``[T·N, C]``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids).cumsum(0) / torch.arange(1, ids.shape[0] + 1, dtype=DT)[:, None, None]
        return self.head(torch.tanh(h)).view(-1, VOCAB)


def test_a_sequence_first_model_is_not_taken_for_positions_as_examples() -> None:
    """Its layers' leading dimension counts positions, and the rows of position 0 depend on it
    alone: only the rows of the later positions show that they are no examples."""
    torch.manual_seed(0)
    model, loss_fn = CausalSequenceFirst().to(DT), nn.CrossEntropyLoss()
    ids, targets = torch.randint(0, VOCAB, (T, N)), torch.randint(0, VOCAB, (T * N,))
    with pytest.raises(ValueError, match=rf"{T * N} rows for the {T} examples the layers' leading dimension counts.* "
                                         r"the forward couples the examples \(.*a sequence-first model"):
        curvlab.extract(model, loss_fn, ids, targets)


class SequenceFirstInside(nn.Module):
    """A batch-first model (``[N, T, D]`` in, ``[N·T, C]`` rows out) around sequence-first layers:
    every recorded layer sees ``[T, N, ·]`` (a causal running sum over the positions between)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.head = nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mix(x.transpose(0, 1))).cumsum(0)
        return self.head(h).transpose(0, 1).reshape(-1, VOCAB)


def test_sequence_first_layers_in_a_batch_first_model_are_named_as_such() -> None:
    """The refusal spoke of the layers' leading dimension counting examples and advised the
    flattening the model already did (QA13); it now says the model was called on N examples and
    which layers carry them on another dimension."""
    torch.manual_seed(0)
    model, loss_fn = SequenceFirstInside().to(DT), nn.CrossEntropyLoss()
    x, targets = torch.randn(N, T, DIM, dtype=DT), torch.randint(0, VOCAB, (N * T,))
    with pytest.raises(ValueError, match=rf"the model was called on {N} examples .* sequence-first module.*batch_first=True"):
        curvlab.extract(model, loss_fn, x, targets)


def test_masked_rows_are_refused_naming_the_mask() -> None:
    """``logits.reshape(-1, C)[keep]`` leaves 5, 1, 1 and 1 rows to the examples: 8 rows, two an
    example by count alone.  Refused for what made them, with padding targets as the way out."""
    model, ids, targets = model_and_batch("rows")
    keep = torch.zeros(N, T, dtype=torch.bool)
    keep[0], keep[1:, 0] = True, True
    loss_fn = nn.CrossEntropyLoss()

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x)[keep.flatten()]

    with pytest.raises(ValueError, match=r"8 rows for the 4 examples.* through IndexBackward0.*ignore_index"):
        curvlab.extract(Masked(), loss_fn, ids, targets[keep], engine="autograd")
    keep[1, 1] = True  # 9 rows: not a whole number an example
    with pytest.raises(ValueError, match=r"9 rows for the 4 examples .*, not a whole number of rows an example"):
        curvlab.extract(Masked(), loss_fn, ids, targets[keep], engine="autograd")
    kept = keep.clone()
    keep.zero_()[0, :3] = True  # fewer rows than examples: examples left out
    with pytest.raises(ValueError, match=r"3 rows for the 4 examples of the model's input .* leaves examples out"):
        curvlab.extract(Masked(), loss_fn, ids, targets[keep], engine="autograd")
    keep.copy_(kept)
    # the same terms as padding targets: the statistics of the kept terms
    padded = curvlab.extract(model, loss_fn, ids, torch.where(keep, targets, -100).reshape(-1), fisher="exact")
    y = torch.where(keep, targets, -100).reshape(-1)
    torch.testing.assert_close(padded["head"].dense_fisher(), dense_ggn(model, loss_fn, ids, y, "head"),
                               rtol=1e-10, atol=1e-14)


def test_mse_rows_give_the_statistics_of_the_sequence_output() -> None:
    """MSE on ``[N·T, C]`` rows against the same ``[N, T, C]`` output unflattened (``T`` terms an
    example as well)."""
    got = {}
    for flat in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, 3), *([nn.Flatten(0, 1)] if flat else [])).to(DT)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(N, T, DIM, generator=gen, dtype=DT), torch.randn(N, T, 3, generator=gen, dtype=DT)
        got[flat] = curvlab.extract(model, nn.MSELoss(), x, y.reshape(-1, 3) if flat else y, fisher="mc", seed=2,
                                    kfac_flavours=("exact", "mc"), stats=("kfac", "sqrt"), engine="autograd")
    for layer, theirs in got[False].items():
        for flavour, factors in theirs.kfac.items():
            torch.testing.assert_close(got[True][layer].kfac[flavour].G, factors.G, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(got[True][layer].sqrt.matrices(), theirs.sqrt.matrices(), rtol=1e-12, atol=1e-15)


def test_batches_of_other_lengths_take_the_steps_of_nct_logits() -> None:
    """Dynamically padded batches (each as long as its longest sequence): the rows' check holds for
    their layout, whatever the length."""
    params = {}
    for layout in ("rows", "nct"):
        model, ids, targets = model_and_batch(layout)
        loss_fn = nn.CrossEntropyLoss()
        opt = TEKFAC(model, lr=0.1, stats_interval=1, eigen_interval=3, scale_interval=1, factor_dtype="float64")
        for length in (5, 3, 4, 2):
            opt.zero_grad()
            with opt.track(loss_fn):
                loss_fn(model(ids[:, :length]), targets_for(layout, targets[:, :length])).backward()
            opt.step()
        params[layout] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params["rows"], params["nct"], rtol=1e-10, atol=1e-13)


class Sliced(nn.Module):
    """The rows of the first ``keep`` examples only (a last batch padded with dummy examples)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.keep = inner, N

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(ids)[: self.keep * ids.shape[1]]


def test_the_grouping_is_checked_for_every_index_map() -> None:
    """The same operations (a slice of the rows, other bounds) group by example for one call and
    not for the next: the second is refused, not taken for what the first showed."""
    model, ids, targets = model_and_batch("rows")
    sliced, loss_fn = Sliced(model), nn.CrossEntropyLoss()
    ids, targets = ids[:, :4], targets[:, :4]
    curvlab.extract(sliced, loss_fn, ids, targets.reshape(-1), engine="autograd")
    sliced.keep = 2  # 8 rows for 4 examples: 2 an example by count
    with pytest.raises(ValueError, match="receive rows taken for another example"):
        curvlab.extract(sliced, loss_fn, ids, targets[:2].reshape(-1), engine="autograd")


class BatchCentred(nn.Module):
    """Rows of a forward that couples the examples by a batch mean (no module shows it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        return self.head(h - h.mean(0)).reshape(-1, VOCAB)


@pytest.mark.parametrize("model_fn, shape", [(BatchCentred, lambda n: (n, T)), (CausalSequenceFirst, lambda n: (n, N))],
                         ids=["batch mean", "causal sequence-first"])
def test_coupling_is_probed_again_for_more_examples(model_fn, shape) -> None:
    """One example shows no coupling: a call of one does not vouch for a call of several."""
    torch.manual_seed(0)
    model, loss_fn = model_fn().to(DT), nn.CrossEntropyLoss()
    one, many = torch.randint(0, VOCAB, shape(1)), torch.randint(0, VOCAB, shape(4))
    curvlab.extract(model, loss_fn, one, torch.randint(0, VOCAB, (one.numel(),)), engine="autograd")
    with pytest.raises(ValueError, match="the forward couples the examples"):
        curvlab.extract(model, loss_fn, many, torch.randint(0, VOCAB, (many.numel(),)), engine="autograd")


class Capped(nn.Module):
    """A model whose logits pass an entrywise map before they are laid out as ``layout`` says
    (as :class:`TinyLM`'s):
    ``"softcap"`` (Gemma's ``c·tanh(z / c)``), ``"temperature"`` (``z / τ``, ``τ`` a constant or,
    with ``learned``, a parameter), ``"shift"`` (``z + b``, ``b`` a constant ``[T, C]``: the
    same shift for every example) or ``"flipped"`` (``2 − z``)."""

    def __init__(self, layout: str, how: str, learned: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.layout, self.how = TinyLM("nct").to(DT), layout, how
        self.tau = nn.Parameter(torch.tensor(1.7, dtype=DT), requires_grad=learned)
        self.shift = torch.randn(T, VOCAB, dtype=DT)

    def forward(self, ids: Tensor) -> Tensor:
        z = self.inner(ids).transpose(1, 2)  # [N, T, C]
        z = {"softcap": lambda: 0.9 * torch.tanh(z / 0.9), "temperature": lambda: z / self.tau,
             "shift": lambda: z + self.shift, "flipped": lambda: 2.0 - z}[self.how]()
        if self.layout == "sequence-first":
            return z.transpose(0, 1).reshape(-1, VOCAB)
        return z.reshape(-1, VOCAB) if self.layout == "rows" else z.transpose(1, 2)


@pytest.mark.parametrize("how", ["softcap", "temperature", "shift", "flipped"])
def test_rows_after_an_entrywise_map_give_the_dense_ggn_and_the_statistics_of_nct_logits(how: str) -> None:
    """A temperature, soft-capping or a constant shift between the head and the rows keeps each
    row its example's: the exact blocks are torch.func's, and KFAC's factors and the TKFAC traces
    those of the same logits as ``[N, C, T]``."""
    _, ids, targets = model_and_batch("rows")
    loss_fn, got = nn.CrossEntropyLoss(), {}
    for layout in ("rows", "nct"):
        model = Capped(layout, how)
        y = targets_for(layout, targets)
        got[layout] = curvlab.extract(model, loss_fn, ids, y, fisher="exact", stats=("kfac", "tkfac", "sqrt"))
        assert got[layout].engine == "autograd"
    model, y = Capped("rows", how), targets.reshape(-1)
    for layer in ("inner.embed", "inner.mix", "inner.head"):
        torch.testing.assert_close(got["rows"][layer].dense_fisher(), dense_ggn(model, loss_fn, ids, y, layer),
                                   rtol=1e-10, atol=1e-14)
        ours, theirs = got["rows"][layer], got["nct"][layer]
        torch.testing.assert_close(ours.kfac["exact"].G, theirs.kfac["exact"].G, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ours.tkfac.delta_phi, theirs.tkfac.delta_phi, rtol=1e-12, atol=1e-15)


def test_rows_through_a_learned_temperature_give_the_statistics_of_nct_logits() -> None:
    """A temperature that is a parameter is a second input to the division, which the layout
    cannot follow; the probe of the rows through the model tells whose they are: every block as
    for ``[N, C, T]`` logits, the exact ones torch.func's."""
    _, ids, targets = model_and_batch("rows")
    loss_fn, got = nn.CrossEntropyLoss(), {}
    for layout in ("rows", "nct"):
        got[layout] = curvlab.extract(Capped(layout, "temperature", learned=True), loss_fn, ids,
                                      targets_for(layout, targets), fisher="exact", stats=("kfac", "tkfac", "sqrt"))
    model, y = Capped("rows", "temperature", learned=True), targets.reshape(-1)
    for layer in ("inner.embed", "inner.mix", "inner.head"):
        torch.testing.assert_close(got["rows"][layer].dense_fisher(), dense_ggn(model, loss_fn, ids, y, layer),
                                   rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(got["rows"][layer].kfac["exact"].G, got["nct"][layer].kfac["exact"].G,
                                   rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["rows"]["tau"].dense_fisher(), got["nct"]["tau"].dense_fisher(), rtol=1e-12, atol=1e-15)


def test_rows_of_other_examples_after_an_entrywise_map_or_a_learned_temperature_are_refused() -> None:
    """Soft-capped logits flattened sequence-first put one position of every example together,
    as without the map; through a learned temperature, which the layout cannot follow, the probe
    through the model finds them and names the operation."""
    _, ids, targets = model_and_batch("rows")
    with pytest.raises(ValueError, match=r"example \d's entries of the output of 'inner.head' receive rows taken for another"):
        curvlab.extract(Capped("sequence-first", "softcap"), nn.CrossEntropyLoss(), ids, targets.T.reshape(-1))
    with pytest.raises(ValueError, match=r"through DivBackward0, and the rows taken for other examples reach example \d"):
        curvlab.extract(Capped("sequence-first", "temperature", learned=True), nn.CrossEntropyLoss(), ids,
                        targets.T.reshape(-1))


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_rows_through_a_decoder_tied_to_the_embedding_give_the_statistics_of_nct_logits(fisher: str) -> None:
    """GPT-2's tied decoder with HuggingFace's flat loss (a QA's first model): no recorded layer
    between the logits and the layers below, so the probe through the model tells whose rows
    are whose; every block, the tied one too, as for ``[N, C, T]`` logits (TKFAC's traces sum
    each example's terms first: a wrong grouping would show), the exact ones torch.func's;
    the same grouping flattened sequence-first is refused."""
    loss_fn, got = nn.CrossEntropyLoss(), {}
    for layout in ("rows", "nct"):
        model, ids, targets = model_and_batch(layout, tied=True)
        got[layout] = curvlab.extract(model, loss_fn, ids, targets_for(layout, targets), fisher=fisher,
                                      stats=("kfac", "tkfac", "sqrt"))
    assert set(got["rows"]) == {"embed.weight", "mix", "head.bias"}
    for block in got["rows"]:
        torch.testing.assert_close(got["rows"][block].dense_fisher(), got["nct"][block].dense_fisher(), rtol=1e-12, atol=1e-15)
    if fisher == "exact":
        model, ids, targets = model_and_batch("rows", tied=True)
        for block, layer in (("mix", "mix"), ("embed.weight", "embed")):
            torch.testing.assert_close(got["rows"][block].dense_fisher(),
                                       dense_ggn(model, loss_fn, ids, targets.reshape(-1), layer), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(got["rows"]["mix"].kfac[fisher].G, got["nct"]["mix"].kfac[fisher].G, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["rows"]["mix"].tkfac.delta_phi, got["nct"]["mix"].tkfac.delta_phi, rtol=1e-12, atol=1e-15)
    model, ids, targets = model_and_batch("sequence-first", tied=True)
    with pytest.raises(ValueError, match=r"through AddmmBackward0|through MmBackward0|through ViewBackward0"):
        curvlab.extract(model, loss_fn, ids, targets_for("sequence-first", targets))


class Padded(nn.Module):
    """A tied decoder on hidden states zeroed at padding ids (0), its logits as ``layout`` says."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.layout = TinyLM("nct", tied=True).to(DT), layout

    def forward(self, ids: Tensor) -> Tensor:
        lm = self.inner
        z = lm.head(torch.tanh(lm.mix(lm.embed(ids))) * (ids != 0)[..., None].to(DT))  # [N, T, C]
        return z.transpose(1, 2) if self.layout == "nct" else z.reshape(-1, VOCAB)


def test_an_example_of_padding_alone_is_no_obstacle_to_the_probe() -> None:
    """An example whose targets are all padding reaches no layer (its hidden states zeroed): it
    has no rows to place, and the others' are placed (a QA's case, refused before)."""
    _, ids, targets = model_and_batch("rows")
    ids, targets = ids.clone(), targets.clone()
    ids[ids == 0] = 1
    ids[3], targets[3] = 0, -100
    loss_fn, got = nn.CrossEntropyLoss(), {}
    for layout in ("rows", "nct"):
        got[layout] = curvlab.extract(Padded(layout), loss_fn, ids, targets_for(layout, targets), fisher="exact")
    for block in got["rows"]:
        torch.testing.assert_close(got["rows"][block].dense_fisher(), got["nct"][block].dense_fisher(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["rows"]["inner.mix"].dense_fisher(),
                               dense_ggn(Padded("rows"), loss_fn, ids, targets.reshape(-1), "inner.mix"), rtol=1e-10, atol=1e-14)


def test_rows_the_probe_alone_places_are_probed_on_every_batch() -> None:
    """Examples of one document see each other (packing): a batch of distinct documents does not
    mix them, the next one does.  Through a tied decoder the probe alone places the rows, so it
    runs on every batch — kept from the first, it accepted the second with its blocks 35 % off
    (a QA's false accept); and a model probed through a constant temperature, then mixed below
    a learned one, is probed again too."""
    model, _, _ = model_and_batch("nct", tied=True)
    loss_fn = nn.CrossEntropyLoss()

    class Documents(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.tau, self.mixed = model, 2.0, False

        def forward(self, x: Tensor) -> Tensor:
            lm, doc = self.inner, x[:, 0]
            same = ((doc[:, None] == doc[None, :]) & ~torch.eye(len(doc), dtype=torch.bool)).to(DT)
            h = torch.tanh(lm.mix(lm.embed(x)))
            z = lm.head(h + torch.einsum("nm,mtd->ntd", same, h))  # [N, T, C]
            if self.mixed:
                z = z + z.roll(1, 0)
            return (z / self.tau).reshape(-1, VOCAB)

    documents = Documents()
    gen = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(1, VOCAB, (N, T), generator=gen), torch.randint(0, VOCAB, (N * T,), generator=gen)
    ids[:, 0] = torch.arange(N)  # distinct documents
    curvlab.extract(documents, loss_fn, ids, targets)
    ids[1, 0] = ids[0, 0]  # examples 0 and 1: one document
    with pytest.raises(ValueError, match=r"through AddmmBackward0, and the rows taken for other examples reach example"):
        curvlab.extract(documents, loss_fn, ids, targets)
    ids[:, 0] = torch.arange(N)
    documents.tau, documents.mixed = nn.Parameter(torch.tensor(2.0, dtype=DT)), True
    with pytest.raises(ValueError, match=r"through DivBackward0, and the rows taken for other examples reach example"):
        curvlab.extract(documents, loss_fn, ids, targets)


@pytest.mark.parametrize("side", ["left", "right"])
def test_rows_through_a_product_with_a_constant_of_many_entries_are_refused(side: str) -> None:
    """A constant of more than one entry can copy the logits into more entries (``c[K, 1, 1, 1] *
    z[None]``: every row of both examples), and a first, harmless constant let a later one pass
    unchecked (a helper's QA: an embedding's exact block 100 % off); on either side of ``*``."""
    model, ids, targets = model_and_batch("nct")
    weights = torch.tensor([1.0, 0.0], dtype=DT)[:, None, None, None]

    class Copied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Tensor) -> Tensor:
            z = self.inner(x).transpose(1, 2)[None]  # [1, N, T, C]
            return (weights * z if side == "left" else z * weights).reshape(-1, VOCAB)

    with pytest.raises(ValueError, match=r"through MulBackward0, and the rows taken for other examples reach example"):
        curvlab.extract(Copied(), nn.CrossEntropyLoss(), ids, targets.repeat(2, 1).reshape(-1))


def test_a_sequence_first_attention_on_batch_first_rows_is_named() -> None:
    """Per-token rows of a batch-first model with nn.TransformerEncoderLayer's default
    batch_first=False: refused as coupled, and the message told the user to flatten the logits as
    they had (QA30); it names the sequence-first module.  Built batch-first, the same model runs."""
    class Tagger(nn.Module):
        def __init__(self, batch_first: bool) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=batch_first)
            self.head = nn.Linear(8, 20)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.emb(ids))).reshape(-1, 20)

    torch.manual_seed(0)
    ids, targets = torch.randint(0, 20, (6, 5)), torch.randint(0, 20, (30,))
    with pytest.raises(ValueError, match=r"'enc.self_attn' is sequence-first \(batch_first=False\).*batch_first=True"):
        curvlab.compare(Tagger(False), nn.CrossEntropyLoss(), ids, targets, approximations=("kfac",))
    ds = curvlab.compare(Tagger(True), nn.CrossEntropyLoss(), ids, targets, approximations=("kfac",))
    assert int(ds.attrs["terms_per_example"]) == 5
