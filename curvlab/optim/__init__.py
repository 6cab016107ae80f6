"""Second-order optimizers built on :mod:`curvlab.approx` and :mod:`curvlab.extract`.

==========  ======================================================  =====================
optimizer   preconditioner (a ``curvlab.approx`` object)            status
==========  ======================================================  =====================
``KFAC``    ``G ⊗ A`` (MC factors; ``fisher="exact"``: KFLR)        [C]
``EKFAC``   KFAC eigenbasis, running-average rescaling ``s``        [C]
``TKFAC``   ``(δΨ ⊗ δΦ)/δ``, trace-preserving                       [C], damping [R]
``TEKFAC``  TKFAC eigenbasis, running-average rescaling ``s``       [R] (the method studied)
==========  ======================================================  =====================

All four are ``torch.optim.Optimizer`` subclasses sharing
:class:`~curvlab.optim.base.KroneckerOptimizer` (the order of a step, the intervals, KL clipping,
momentum, weight decay, non-finite skipping, ``state_dict``); their hyper-parameters are the
fields of :class:`KroneckerOptions`::

    opt = TEKFAC(model, lr=0.1)
    for x, y in loader:
        opt.zero_grad()
        with opt.track(loss_fn):     # statistics hooks on statistics steps only
            loss = loss_fn(model(x), y)
            loss.backward()
        opt.step()

``opt.approximations()`` returns, per block, the object the next step inverts with
``inv_mat_mul(grad, opt.damping, opt.damping_strategy)``.  Under ``DistributedDataParallel`` (or
with a process group) they are data-parallel: :mod:`curvlab.optim.distributed`.
"""

from curvlab.optim.base import BlockState, KroneckerOptimizer
from curvlab.optim.distributed import DataParallel
from curvlab.optim.ekfac import EKFAC
from curvlab.optim.kfac import KFAC
from curvlab.optim.options import KroneckerOptions
from curvlab.optim.tekfac import TEKFAC
from curvlab.optim.tkfac import TKFAC

#: The registry of curvlab's optimizers: method name → class.
OPTIMIZERS: dict[str, type[KroneckerOptimizer]] = {cls.method: cls for cls in (KFAC, EKFAC, TKFAC, TEKFAC)}

__all__ = [
    "EKFAC", "KFAC", "OPTIMIZERS", "TEKFAC", "TKFAC", "BlockState", "DataParallel", "KroneckerOptimizer", "KroneckerOptions",
]
