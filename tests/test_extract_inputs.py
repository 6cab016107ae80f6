"""Bad input gets a clear error, and the model is left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlab.extract import ExtractionSession, UnsupportedModelError, extract
from helpers import batch, dense_ggn, tiny_cnn, tiny_mlp

DT = torch.float64


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "hooks": [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()],
        "attrs": [sorted(k for k in vars(m) if k.startswith(("input", "output", "_backpack"))) for m in model.modules()],
        "param_attrs": [sorted(vars(p)) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k])
        b, a = before["grads"][k], after["grads"][k]
        assert (b is None and a is None) or torch.equal(b, a)
    for key in ("hooks", "attrs", "param_attrs", "training"):
        assert before[key] == after[key], key


def test_model_untouched_after_success_with_existing_grads() -> None:
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    loss_fn(model(x), y).backward()  # user's own gradients must survive
    before = snapshot(model)
    extract(model, loss_fn, x, y, fisher="mc", stats=("sqrt", "kfac", "tkfac"))
    assert_untouched(model, before)
    assert len(loss_fn._forward_hooks) == 0 and not hasattr(loss_fn, "input0")


def test_model_untouched_after_failure_midway() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, _ = batch(model, loss_fn, n=3)
    before = snapshot(model)
    with pytest.raises(Exception):
        extract(model, loss_fn, x, torch.tensor([0, 1, 99]))  # invalid class index
    assert_untouched(model, before)
    # and it still works afterwards
    y = torch.tensor([0, 1, 2])
    assert set(extract(model, loss_fn, x, y, stats=("kfac",))) == {"0", "2"}


def test_batchnorm_train_mode_needs_the_autograd_engine() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(UnsupportedModelError, match="engine='backpack' cannot run this model: a BatchNorm .* \\(train mode\\).*engine='autograd'"):
        extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack")
    stats = extract(model, nn.CrossEntropyLoss(), x, y)
    assert stats.engine == "autograd" and "train mode" in stats.engine_reason
    assert list(stats) == ["0", "1.weight", "1.bias", "2"] and stats["0"].coupled


def test_module_backpack_cannot_backpropagate() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(GELU\) has no BackPACK second-order derivatives"):
        extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack")
    assert extract(model, nn.CrossEntropyLoss(), x, y).engine == "autograd"


def test_inplace_activation_handled_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double()
    ref = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt",))
    want = extract(ref, nn.CrossEntropyLoss(), x, y, stats=("sqrt",))
    assert model[1].inplace is True
    for name in got:
        torch.testing.assert_close(got[name].dense_fisher(), want[name].dense_fisher())


def test_a_loss_subclass_keeping_its_forward_is_the_loss() -> None:
    """Its Fisher is the base loss's; BackPACK, which knows the class itself only, is not chosen."""
    class NamedCE(nn.CrossEntropyLoss):
        pass

    model = tiny_mlp()
    x, y = batch(model, nn.CrossEntropyLoss(), n=3)
    got = extract(model, NamedCE(), x, y, stats=("sqrt",))
    assert got.engine == "autograd" and "NamedCE" in got.engine_reason
    want = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt",))
    for name in got:
        torch.testing.assert_close(got[name].dense_fisher(), want[name].dense_fisher(), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="engine='backpack' cannot run this model: its loss is NamedCE"):
        extract(model, NamedCE(), x, y, engine="backpack")


def test_bad_arguments_named() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=2)
    with pytest.raises(ValueError, match="fisher='fancy'"):
        extract(model, loss_fn, x, y, fisher="fancy")
    with pytest.raises(ValueError, match="unknown statistics"):
        extract(model, loss_fn, x, y, stats=("hessian",))
    with pytest.raises(ValueError, match="mc_samples"):
        extract(model, loss_fn, x, y, fisher="mc", mc_samples=0)
    with pytest.raises(ValueError, match="loss_fn is NLLLoss"):
        extract(model, nn.NLLLoss(), x, y)
    with pytest.raises(TypeError, match="curvlab.extract: model must be an nn.Module, got function"):
        extract(lambda inputs: model(inputs), loss_fn, x, y)
    with pytest.raises(TypeError, match="curvlab.extract.ExtractionSession: model must be an nn.Module, got function"):
        ExtractionSession(lambda inputs: model(inputs), loss_fn)
    with pytest.raises(TypeError, match="curvlab.extract: options= must be an instance of ExtractOptions, got dict"):
        extract(model, loss_fn, x, y, options={"fisher": "mc"})

    class TemperedCE(nn.CrossEntropyLoss):  # another loss under a supported type's name
        def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return super().forward(logits / 2, target)

    for engine in ("auto", "autograd"):
        with pytest.raises(ValueError, match="loss_fn is TemperedCE, a subclass of nn.CrossEntropyLoss with its own forward"):
            extract(model, TemperedCE(), x, y, engine=engine)
    with pytest.raises(ValueError, match="reduction='none'"):
        extract(model, nn.CrossEntropyLoss(reduction="none"), x, y)
    probs = torch.full((2, 3), 0.5, dtype=x.dtype)
    for bce in (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), nn.BCEWithLogitsLoss(weight=torch.ones(3))):
        with pytest.raises(ValueError, match="BCEWithLogitsLoss with (pos_)?weight is not supported"):
            extract(model, bce, x, probs)
    for labels in (probs.long(), probs.bool()):  # torch's own error named neither
        with pytest.raises(ValueError, match=r"\(BCEWithLogitsLoss\): targets of dtype torch\.(int64|bool); it takes "
                                             "floating-point targets"):
            extract(model, nn.BCEWithLogitsLoss(), x, labels)
    for engine in ("backpack", "autograd"):
        for bad in (probs + 0.6, probs - 0.6, probs.masked_fill(probs > 0, float("nan"))):
            with pytest.raises(ValueError, match=r"targets must be probabilities in \[0, 1\]"):
                extract(model, nn.BCEWithLogitsLoss(), x, bad, engine=engine)
    with pytest.raises(ValueError, match="eigenbases"):
        extract(model, loss_fn, x, y, stats=("kfe",))
    bases = {name: tuple(torch.linalg.qr(torch.randn(n, n, dtype=x.dtype))[0] for n in block.layout.shape)
             for name, block in extract(model, loss_fn, x, y, stats=()).items()}
    extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=bases)  # orthonormal: taken
    for scaled in (2.0, 1.001):
        bad = {**bases, "2": (bases["2"][0], scaled * bases["2"][1])}
        with pytest.raises(ValueError, match=r"eigenbases\['2'\]: U_in does not have orthonormal columns"):
            extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=bad)
    single = {name: tuple(u.float() for u in pair) for name, pair in bases.items()}  # checked in float32 (tol 1e-3)
    extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=single)
    passed = single["2"][1]  # taken above, then changed in place: checked again
    passed.mul_(1.01)
    with pytest.raises(ValueError, match=r"eigenbases\['2'\]: U_in does not have orthonormal columns"):
        extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=single)
    passed.div_(1.01)
    with pytest.raises(ValueError, match=r"eigenbases\['2'\]: U_out does not have orthonormal columns"):
        extract(model, loss_fn, x, y, stats=("kfe",), eigenbases={**single, "2": (1.01 * single["2"][0], single["2"][1])})
    for seed in (True, 1.5, "1"):
        with pytest.raises(ValueError, match="seed=.* must be an int or None"):
            extract(model, loss_fn, x, y, fisher="mc", seed=seed)


def test_dense_fisher_refuses_large_blocks_and_missing_sqrt() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=2)
    stats = extract(model, loss_fn, x, y, stats=("sqrt",))
    with pytest.raises(MemoryError, match="layer '0' has P=24"):
        stats["0"].dense_fisher(max_bytes=1000)
    no_sqrt = extract(model, loss_fn, x, y, stats=("kfac",))
    with pytest.raises(ValueError, match="without its square root"):
        no_sqrt["0"].dense_fisher()


def test_float32_agrees_with_float64() -> None:
    model64, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model64, loss_fn, n=3)
    s64 = extract(model64, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"))
    model32 = tiny_cnn().float()
    s32 = extract(model32, loss_fn, x.float(), y, stats=("sqrt", "kfac", "tkfac"))
    for name in s64:
        assert s32[name].tkfac.delta.dtype == torch.float32
        torch.testing.assert_close(s32[name].tkfac.delta_phi.double(), s64[name].tkfac.delta_phi, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s32[name].dense_fisher().double(), s64[name].dense_fisher(), rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    cpu = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"))
    gpu = extract(model.cuda(), loss_fn, x.cuda(), y.cuda(), stats=("sqrt", "kfac", "tkfac"))
    for name in cpu:
        assert gpu[name].tkfac.delta.device.type == "cuda"
        torch.testing.assert_close(gpu[name].dense_fisher().cpu(), cpu[name].dense_fisher())
        torch.testing.assert_close(gpu[name].kfac["exact"].G.cpu(), cpu[name].kfac["exact"].G)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_mc_statistics_of_mse_do_not_depend_on_the_outputs_offset(engine: str) -> None:
    """MSE's Hessian does not depend on the output, so neither do its MC roots: a float32 model
    whose outputs sit near 1e8 (its last bias shifted) has the MC statistics of the unshifted one
    under the same seed.  Its noise was drawn as ``ỹ − f`` and lost to cancellation: G +16 % at
    1e7, exactly 0 from 1e8 (the optimizers' default flavour saw no curvature)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted[2].bias += 1e8
    x = torch.randn(8, 4)
    y = torch.randn(8, 3)
    kw = dict(fisher="mc", stats=("sqrt", "kfac"), kfac_flavours=("mc",), seed=3, engine=engine)
    ref, far = extract(model, nn.MSELoss(), x, y, **kw), extract(shifted, nn.MSELoss(), x + 0, y + 1e8, **kw)
    for name in ("0", "2"):
        assert far[name].kfac["mc"].G.abs().max() > 0
        torch.testing.assert_close(far[name].kfac["mc"].G, ref[name].kfac["mc"].G, rtol=1e-5, atol=0)
        torch.testing.assert_close(far[name].dense_fisher(), ref[name].dense_fisher(), rtol=1e-5, atol=1e-9)


def test_roots_larger_than_free_memory_are_refused_before_they_are_formed() -> None:
    """The exact Fisher of a vocabulary-sized output has a root column per class: 100 000 classes
    for 8 examples are ~1 TB; a tied vocabulary matrix's exact root, 320 GB.  A MemoryError names
    the sizes and fisher='mc' instead of torch's allocation failure (or the machine swapping)."""
    wide = nn.Linear(2, 100_000)
    x = torch.randn(8, 2)
    with pytest.raises(MemoryError, match=r"flavours exact need .* GiB for an output of shape \(8, 100000\).*fisher='mc' without 'kflr'"):
        extract(wide, nn.CrossEntropyLoss(), x, torch.zeros(8, dtype=torch.long), fisher="exact", stats=("sqrt",))

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = nn.Embedding(1000, 10_000), nn.Linear(10_000, 1000, bias=False)
            self.decoder.weight = self.encoder.weight

        def forward(self, ids):
            return self.decoder(torch.tanh(self.encoder(ids)))

    ids = torch.arange(8)
    with pytest.raises(MemoryError, match=r"exact square roots need .* GiB \(8000 columns .*'encoder.weight', \(1000, 10000\)"):
        extract(TiedLM(), nn.CrossEntropyLoss(), ids, ids, fisher="exact", stats=("sqrt",))


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_fisher_of_mse_converges_to_the_dense_ggn(engine: str, reduction: str) -> None:
    """Both engines now take MSE's MC root from ``mc_root`` (noise drawn around 0), so no test
    compared it with an independent one: only CE's MC was checked for unbiasedness.  With many
    samples the MC block is the dense GGN ``Jᵀ (2R I) J`` (noise std √½, root 2·noise)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction=reduction)
    mc = extract(model, loss_fn, x, y, fisher="mc", mc_samples=4000, stats=("sqrt",), seed=0, engine=engine)
    for name in ("0", "2"):
        dense = dense_ggn(model, loss_fn, x, y, name)
        err = ((mc[name].dense_fisher() - dense).norm() / dense.norm()).item()
        assert err < 0.1, (name, err)
    few = extract(model, loss_fn, x, y, fisher="mc", mc_samples=1, stats=("sqrt",), seed=0, engine=engine)
    dense = dense_ggn(model, loss_fn, x, y, "2")
    assert (few["2"].dense_fisher() - dense).norm() / dense.norm() > 0.1  # the comparison can fail


class _PerTokenLogits(nn.Module):
    """Logits ``[N, C, T]`` (C = 50 classes, T = 3 positions): classes on dim 1, not the last."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 50)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).transpose(1, 2)


@pytest.mark.parametrize("engine", ["autograd", "backpack"])
def test_an_exact_root_is_refused_exactly_when_it_does_not_fit(monkeypatch, engine: str) -> None:
    """``available_bytes`` replaced by a known amount (and read for any request): the exact loss
    root, C columns of the output (C² numbers a term), is refused when the free memory is half its
    size and taken when it is four times it (the root and its two temporaries fit).  Independent
    reference: the size of the root itself, ``C · output.numel() · 8`` bytes, C read from dim 1
    for CE."""
    import curvlab.extract.autograd.backprop as backprop

    monkeypatch.setattr(backprop, "SURELY_FREE", 0)

    gen = torch.Generator().manual_seed(0)
    if engine == "autograd":  # per-token logits: C = 50 on dim 1, T = 3 last
        model, x = _PerTokenLogits().double(), torch.randint(0, 7, (4, 3), generator=gen)
        y, numel = torch.randint(0, 50, (4, 3), generator=gen), 4 * 50 * 3
    else:  # BackPACK takes [N, C] logits
        model, x = nn.Sequential(nn.Linear(3, 50)).double(), torch.randn(4, 3, generator=gen, dtype=DT)
        y, numel = torch.randint(0, 50, (4,), generator=gen), 4 * 50
    root_bytes = 50 * numel * 8
    monkeypatch.setattr(backprop, "available_bytes", lambda device: root_bytes // 2)
    with pytest.raises(MemoryError, match=r"\(50 classes\).*fisher='mc' without 'kflr'"):
        extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt",), engine=engine)
    monkeypatch.setattr(backprop, "available_bytes", lambda device: 4 * root_bytes)
    assert extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt",), engine=engine)


def test_coupled_dense_roots_are_refused_exactly_when_they_do_not_fit(monkeypatch) -> None:
    """A train-mode BatchNorm couples the examples, so the autograd engine forms each Kronecker
    layer's exact root densely, ``rows = C·N`` rows of its ``d_out × (d_in + 1)`` matrix, beside
    the BatchNorm's parameter blocks.  Free memory half their size: refused; twice: taken.
    (N·T ≥ d_in + 1 for both layers, so none keeps its roots at the outputs instead.)"""
    import curvlab.extract.autograd.backprop as backprop

    monkeypatch.setattr(backprop, "SURELY_FREE", 0)  # (the free memory read for any request)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.BatchNorm1d(20), nn.Tanh(), nn.Linear(20, 10)).double().train()
    x, y = torch.randn(32, 6, dtype=DT), torch.randint(0, 10, (32,))
    rows = 10 * 32  # exact: a column per class, one term per example
    need = rows * (20 * 7 + 10 * 21 + 2 * 20) * 8  # the two [W b] roots and BatchNorm's weight and bias
    monkeypatch.setattr(backprop, "available_bytes", lambda device: need // 2)
    with pytest.raises(MemoryError, match=r"exact square roots need .*\(320 columns"):
        extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt",), engine="autograd")
    monkeypatch.setattr(backprop, "available_bytes", lambda device: 2 * need)
    stats = extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt",), engine="autograd")
    assert stats["0"].coupled


def test_a_batch_of_one_example_is_extracted_by_the_autograd_engine() -> None:
    """The broadcast refusal fires on a leading dimension 1 with more than one example in the
    loss; a batch of one example (leading dimension 1, one example) is an ordinary batch.
    Reference: the dense GGN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    stats = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt",), engine="autograd")
    for name in ("0", "2"):
        torch.testing.assert_close(stats[name].dense_fisher(), dense_ggn(model, nn.CrossEntropyLoss(), x, y, name))


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_class_weights_are_refused_before_the_forward_pass(engine: str) -> None:
    """``check_loss`` refuses class weights before anything runs (UnsupportedModelError, naming
    why); the roots' own check (``loss_terms``, a plain ValueError) would only refuse after the
    model's forward (counted by a hook under the autograd engine; BackPACK refuses hooked models)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    calls = []
    if engine == "autograd":
        model.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    with pytest.raises(UnsupportedModelError, match="class weights is not supported"):
        extract(model, nn.CrossEntropyLoss(weight=torch.ones(3, dtype=DT)), x, y, engine=engine)
    assert not calls


def test_int32_token_indices_are_read_as_torch_reads_them() -> None:
    """nn.Embedding takes int32 indices (numpy and tokenizer pipelines give them); the engine's
    one-hot inputs needed int64 and raised torch's ``one_hot`` error, naming nothing.  int32
    indices now give the int64 indices' blocks, which equal the dense ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    x, y = torch.tensor([0, 5, 2, 2, 4]), torch.tensor([0, 2, 1, 2, 0])
    loss_fn = nn.CrossEntropyLoss()
    wide = extract(model, loss_fn, x, y, stats=("sqrt", "kfac"))
    narrow = extract(model, loss_fn, x.int(), y, stats=("sqrt", "kfac"))
    for name in ("0", "2"):
        torch.testing.assert_close(narrow[name].dense_fisher(), wide[name].dense_fisher(), rtol=0, atol=0)
        torch.testing.assert_close(narrow[name].kfac["exact"].A, wide[name].kfac["exact"].A, rtol=0, atol=0)
    torch.testing.assert_close(narrow["0"].dense_fisher(), dense_ggn(model, loss_fn, x, y, "0"), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("returns", ["tuple", "dict"])
def test_a_model_returning_several_outputs_is_refused_saying_what_to_pass(returns: str) -> None:
    """A ``(logits, aux)`` tuple or a dict of outputs reached the loss: torch's own TypeError,
    from inside the loss, named neither curvlab nor what to do."""

    class Several(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            out = self.fc(x)
            return (out, x) if returns == "tuple" else {"logits": out}

    x, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    model = Several()
    with pytest.raises(TypeError, match=rf"^curvlab.extract: the model returned a {returns}, .*model\(x\)\[0\]"):
        extract(model, nn.CrossEntropyLoss(), x, y)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind


class SizedUpsampling(nn.Module):
    """A transposed convolution called with ``output_size`` (U-Nets matching a skip's odd size)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.head = nn.ConvTranspose2d(2, 2, 3, stride=2), nn.Linear(2 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(x, output_size=[8, 8]).flatten(1))


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_a_transposed_convolution_called_with_output_size_names_the_output_padding(engine: str) -> None:
    """Its patches are cut for the output its output_padding gives; the error names the setting
    that gives the output it was called for — with which the same model is taken."""
    model, x, y = SizedUpsampling().double(), torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"'up' \(ConvTranspose2d\) was called with output_size, giving \(8, 8\) "
                                         r"where its output_padding=\(0, 0\) gives \(7, 7\); .* set its output_padding=\(1, 1\)"):
        extract(model, nn.CrossEntropyLoss(), x, y, engine=engine)
    model.up.output_padding = (1, 1)
    assert set(extract(model, nn.CrossEntropyLoss(), x, y, engine=engine)) == {"up", "head"}


class AutocastInside(nn.Module):
    """A forward that enters torch.autocast itself (mixed-precision training code)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x)


def test_a_forward_entering_autocast_is_not_given_to_backpack() -> None:
    """torch.fx's trace (BackPACK's converter) drops the autocast: BackPACK measured the float32
    network, whose loss differs from the model's own; auto takes the autograd engine."""
    torch.manual_seed(0)
    model, x, y = AutocastInside(), torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    stats = extract(model, nn.CrossEntropyLoss(), x, y, stats=("kfac",))
    assert stats.engine == "autograd" and "torch.autocast" in stats.engine_reason
    with torch.no_grad():
        assert float(stats.loss) == float(nn.CrossEntropyLoss()(model(x), y))
    with pytest.raises(UnsupportedModelError, match="its forward enters torch.autocast"):
        extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack")
    # the user's own forward (an optimizer's statistics pass): traced as it is, not converted
    from curvlab.extract import ExtractionSession

    session = ExtractionSession(model, nn.CrossEntropyLoss(), stats=("kfac",))
    assert session.engine == "autograd" and "torch.autocast" in session.engine_reason
