"""On a CUDA device, every entry point gives the CPU's answer: extraction on the real
architectures (both engines, train-mode BatchNorm's coupling included), ``curvlab report`` and
``curvlab train`` with a resume. Skipped where no CUDA device is visible;
``benchmarks/gpu_suite.sh`` runs them (``-k cuda``) with the other CUDA tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import xarray as xr
from torch import nn

import curvlab
import zoo
from curvlab.app.cli import main
from curvlab.app.train import TrainConfig, train

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
CE = nn.CrossEntropyLoss()


@pytest.mark.parametrize("name,mode", [("resnet_bn", "train"), ("resnet_bn", "eval"), ("vgg_bn", "train"),
                                       ("vit", "train"), ("tied", "train"), ("textcnn", "train"), ("unet", "train"),
                                       ("torch_transformer", "train")])
def test_cuda_extraction_of_real_architectures_matches_cpu(name: str, mode: str) -> None:
    model, x, y = zoo.make(name, n=3)
    model.train(mode == "train")
    cpu = curvlab.extract(model, CE, x, y)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = curvlab.extract(gpu_model, CE, x.cuda(), y.cuda())
    assert gpu.engine == cpu.engine and set(gpu) == set(cpu)
    for block, s in cpu.items():
        g = gpu[block]
        assert g.grad.device.type == "cuda", block
        torch.testing.assert_close(g.dense_fisher().cpu(), s.dense_fisher(), rtol=1e-9, atol=1e-12, msg=block)
        torch.testing.assert_close(g.grad.cpu(), s.grad, rtol=1e-9, atol=1e-12, msg=block)
    for (k, a), b in zip(model.state_dict().items(), gpu_model.state_dict().values()):  # BN buffers restored
        torch.testing.assert_close(b.cpu(), a, msg=k)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_cuda_transposed_convolutions_under_bce_match_cpu(engine: str) -> None:
    """Transposed convolutions (zero-stuffed patches) and Bernoulli outputs on the device."""
    from helpers import tiny_decoder

    model, loss_fn = tiny_decoder(), nn.BCEWithLogitsLoss()
    x, y = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64)
    cpu = curvlab.extract(model, loss_fn, x, y, engine=engine, stats=("sqrt", "kfac", "tkfac"))
    gpu = curvlab.extract(copy.deepcopy(model).cuda(), loss_fn, x.cuda(), y.cuda(), engine=engine,
                          stats=("sqrt", "kfac", "tkfac"))
    for block, s in cpu.items():
        torch.testing.assert_close(gpu[block].dense_fisher().cpu(), s.dense_fisher(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gpu[block].kfac["exact"].A.cpu(), s.kfac["exact"].A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gpu[block].tkfac.delta_phi.cpu(), s.tkfac.delta_phi, rtol=1e-9, atol=1e-12)


def test_cuda_report_from_the_cli_matches_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["report", "--fisher", "exact", "--batch-size", "16", "--train-steps", "2", "--num-eigenvalues", "16",
            "--approximations", "kflr,ekfac,tkfac,tekfac", "--no-progress"]  # no MC draws
    for device in ("cpu", "cuda"):
        assert main([*args, "--device", device, "--out", str(tmp_path / device)]) == 0, capsys.readouterr().err
    cpu, gpu = (xr.open_dataset(tmp_path / d / "report.nc").load() for d in ("cpu", "cuda"))
    assert gpu.attrs["device"].startswith("cuda")
    for var in ("rel_frobenius_error", "exact_trace"):
        torch.testing.assert_close(torch.from_numpy(gpu[var].values), torch.from_numpy(cpu[var].values),
                                   rtol=1e-3, atol=1e-6, msg=var)  # a float32 model warmed up on two devices
    assert all((tmp_path / "cuda" / f).stat().st_size > 0 for f in ("summary.md", "spectra.png", "errors.png"))


@pytest.mark.parametrize("optimizer", ["kfac", "tekfac"])
def test_cuda_training_resumes_identically(tmp_path: Path, optimizer: str) -> None:
    def cfg(out: str, epochs: int) -> TrainConfig:
        return TrainConfig(model="mlp", dataset="digits", optimizer=optimizer, epochs=epochs, batch_size=50,
                           train_size=300, test_size=100, probe_every=3, probe_batch_size=20, device="cuda",
                           out=str(tmp_path / out), progress=False, model_kwargs={"hidden": (16,)},
                           stats_interval=2, eigen_interval=4, scale_interval=2)

    full = train(cfg("full", 2))
    train(cfg("split", 1))
    resumed = train(cfg("split", 2), resume=True)
    a, b = (torch.load(p["checkpoint"], weights_only=False, map_location="cpu") for p in (full, resumed))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    metrics = xr.open_dataset(full["metrics"]).load()
    assert bool(torch.isfinite(torch.from_numpy(metrics.test_loss.values)).all())


def test_cuda_ranks_resume_their_own_device_random_states() -> None:
    """Two ranks (gloo, both on this GPU) restore their own CUDA random states, as their CPU ones."""
    from multiprocess import run_ranks
    from test_distributed_train import _rank_random_states

    assert run_ranks(_rank_random_states, 2, False, timeout=180) == [(True, True), (True, True)]


def _rank_gpu_sum() -> tuple[str, float]:
    """As ``join_process_group`` sets it up: this rank's GPU current, then a train run's device
    for ``--device cuda:0`` and an nccl sum on it."""
    import torch.distributed as dist

    from curvlab.app.launch import Ranks
    from curvlab.app.train.parallel import rank_device

    ranks = Ranks.current()
    torch.cuda.set_device(ranks.rank)
    device = rank_device(torch.device("cuda:0"), ranks)
    total = torch.ones(1, device=device) * (ranks.rank + 1)
    dist.all_reduce(total)
    return str(device), total.item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_ranks_train_on_their_own_gpus() -> None:
    """Two nccl ranks given ``--device cuda:0`` each take their own GPU and sum as the CPU does."""
    from multiprocess import run_ranks

    assert run_ranks(_rank_gpu_sum, 2, backend="nccl", timeout=180) == [("cuda:0", 3.0), ("cuda:1", 3.0)]
