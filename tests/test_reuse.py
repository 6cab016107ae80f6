"""``curvlab.reuse``: keys that name values exactly, also once a tensor is named or changed."""

from __future__ import annotations

import torch
from torch import nn

from curvlab.approx.eigh import factor_eigh, psd_eigh, symmetric, symmetrize
from curvlab.approx.spectral import rotated_sq_sum
from curvlab.extract import extract
from curvlab.reuse import digest, forget, keep, kept, name_values, reuse, shared_work
from curvlab.sqrt import DenseSqrt

DT = torch.float64


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=DT)
    return x.T @ x / (3 * n)


def test_a_changed_tensor_gets_the_key_of_its_new_values() -> None:
    """A key remembered for a tensor (hashed once, or a name) is dropped when the tensor is
    modified in place: its digest is then that of a fresh tensor with the new values."""
    a = spd(6, 0)
    with shared_work():
        first = digest(a)
        assert digest(a) == first == digest(a.clone())
        a.add_(1.0)
        assert digest(a) != first and digest(a) == digest(a.clone())
        named = name_values(spd(6, 1), ("some", "name"))
        assert digest(named) == ("some", "name")
        named.mul_(2.0)
        assert digest(named) == digest(named.clone())
    with torch.inference_mode():  # no version counter: hashed every time, never remembered
        b = spd(6, 2)
        with shared_work():
            assert digest(b) == digest(b.clone())


def test_a_kept_value_lasts_until_its_tensor_changes_in_any_scope() -> None:
    """``keep``/``kept``: outside ``shared_work`` too; gone once the tensor is modified in place;
    one tensor's value is not another's with the same values; nothing kept of an inference-mode
    tensor (no version to tell a change by)."""
    a = spd(4, 0)
    copy = keep(a, "transposed", a.mT.contiguous())
    assert kept(a, "transposed") is copy and kept(a, "other") is None and kept(a.clone(), "transposed") is None
    with shared_work():
        assert kept(a, "transposed") is copy
    a.mul_(2.0)
    assert kept(a, "transposed") is None
    with torch.inference_mode():
        b = spd(4, 1)
    assert keep(b, "transposed", 1) == 1 and kept(b, "transposed") is None


def test_symmetric_reads_a_symmetrized_matrix_as_it_is() -> None:
    """``symmetric`` returns what ``symmetrize`` made inside the scope (exactly symmetric, so
    symmetrizing again would give the same values), and symmetrizes anything else: outside the
    scope, or a matrix changed since."""
    m = torch.randn(7, 7, dtype=DT)
    with shared_work():
        s = symmetrize(m)
        assert torch.equal(s, s.mT) and symmetric(s) is s
        s[0, 1] += 1.0  # no longer symmetric
        t = symmetric(s)
        assert t is not s and torch.equal(t, t.mT) and torch.equal(t, (s + s.mT) / 2)
        assert symmetric(m) is not m
    s = symmetrize(m)
    assert symmetric(s) is not s and torch.equal(symmetric(s), s)


def test_named_bases_key_the_rotations_by_their_values(monkeypatch) -> None:
    """Inside the scope the eigenbases ``factor_eigh`` returns are named after the factor (no
    hash), the factor's symmetrized copies after the factor: equal values share one rotation,
    changed values get their own — each result equal to the computation outside any scope."""
    a_out, a_in = spd(4, 3), spd(5, 4)
    sqrt = DenseSqrt(torch.randn(9, 4, 5, generator=torch.Generator().manual_seed(5), dtype=DT))
    calls, eighs = [], []
    method, eigh = DenseSqrt.rotated_sq_sum, torch.linalg.eigh
    monkeypatch.setattr(DenseSqrt, "rotated_sq_sum", lambda self, *a: calls.append(1) or method(self, *a))
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: eighs.append(1) or eigh(m, *a, **k))
    with shared_work():
        a_in_named = name_values(a_in.clone(), ("input factor",))
        _, u_out = factor_eigh(a_out)
        _, u_in = factor_eigh(symmetrize(a_in_named))
        _, u_in_again = factor_eigh(a_in_named)  # the same values by another route: no second eigh
        # one tensor in the scope, not an n × n copy per caller (an 8193² float64 basis: 0.5 GB each)
        assert len(eighs) == 2 and u_in_again is u_in
        first = rotated_sq_sum(sqrt, u_out, u_in)
        again = rotated_sq_sum(sqrt, u_out, u_in_again)
        assert len(calls) == 1
        u_in_again[:, 0].neg_()  # another basis now (the same squares: a sign)
        u_in_again[:, [1, 2]] = u_in_again[:, [2, 1]]  # and two columns swapped: other sums
        changed = rotated_sq_sum(sqrt, u_out, u_in_again)
        assert len(calls) == 2
        _, u_in_fresh = factor_eigh(a_in_named)  # the shared basis changed in place: decomposed again
        assert len(eighs) == 3 and u_in_fresh is not u_in_again
    monkeypatch.undo()
    fresh_u_in = psd_eigh(a_in)[1]
    assert torch.equal(u_in_fresh, fresh_u_in)
    assert torch.allclose(first, sqrt.rotated_sq_sum(u_out, fresh_u_in), rtol=1e-12, atol=0)
    assert torch.equal(first, again)
    assert torch.allclose(changed, sqrt.rotated_sq_sum(u_out, u_in_again), rtol=1e-12, atol=0)
    assert not torch.allclose(changed, first)


def test_forget_drops_what_mentions_a_name_and_reuse_computes_it_again() -> None:
    """A factor's decompositions are dropped once no later approximation of the layer needs them
    (a Linear(8192, ·)'s basis is 512 MiB): what mentions the name, at any depth of its key, goes;
    the rest stays; a later reuse computes it again."""
    calls = []

    def make(tag):
        return lambda: calls.append(tag) or tag

    with shared_work():
        reuse(("factor_eigh", "policy", ("symmetrize", ("input factor",))), make("A"))
        reuse(("factor_eigh", "policy", ("output factor",)), make("G"))
        forget(("input factor",))
        reuse(("factor_eigh", "policy", ("symmetrize", ("input factor",))), make("A"))
        reuse(("factor_eigh", "policy", ("output factor",)), make("G"))
    assert calls == ["A", "G", "A"]
    forget(("input factor",))  # outside a scope: nothing kept, nothing to drop


def test_layer_approximations_drop_decompositions_no_later_approximation_needs(monkeypatch) -> None:
    """Read in order inside one scope (and used: KFAC's, KFLR's and TKFAC's bases are decomposed
    when first needed), every distinct factor is decomposed once (A, G_mc, G_exact, δΦ, δΨ); once
    TKFAC is read, no later approximation decomposes KFAC's factors, so they are dropped: reading
    KFAC again decomposes its A and its MC G again (two eighs), while TEKFAC, read last, still
    finds TKFAC's δΦ, δΨ (no eigh)."""
    from curvlab.compare import LayerApproximations
    from curvlab.reuse import shared_work

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    stats = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt", "kfac", "tkfac"),
                    kfac_flavours=("exact", "mc"), seed=0)["2"]
    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: seen.append(m.clone()) or eigh(m, *a, **k))
    names = ["kfac", "kflr", "ekfac", "tkfac", "tekfac"]
    with shared_work():
        approx = LayerApproximations(stats, names)
        for name in names:
            approx[name].eigenvalues()
        assert len(seen) == 5  # A, G_mc, G_exact, δΦ, δΨ
        approx["tekfac"].eigenvalues()
        assert len(seen) == 5  # TKFAC's bases kept: TEKFAC is the last to need them
        approx["kfac"].eigenvalues()  # its factors were dropped once TKFAC was read: decomposed again
        again = seen[5:]
    a, g = stats.kfac["mc"].A, stats.kfac["mc"].G
    assert len(again) == 2 and sorted(m.shape[0] for m in again) == sorted([a.shape[0], g.shape[0]])
    same = lambda m, f: m.shape == f.shape and torch.allclose(m, f)  # noqa: E731
    assert any(same(m, g) for m in again) and any(same(m, a) for m in again)
