"""The precision choice (CUDA capability mocked: no GPU here) and the fp16 gradient-scaler path."""
from __future__ import annotations

import pytest
import torch

from cifarlab import checkpoints as C
from cifarlab.data import CIFAR10
from cifarlab.precision import autocast, grad_scaler, resolve_precision
from cifarlab.train import recipe_from, train


def quiet(*args, **kwargs):
    pass


@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((6, 1), "fp16"),
                                                  ((8, 0), "bf16"), ((8, 6), "bf16"), ((9, 0), "bf16")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: asked.append(index) or capability)
    assert resolve_precision("auto", torch.device("cuda:1")) == expected
    assert asked == [1]  # the capability of the device asked for, not of device 0
    assert resolve_precision("auto", torch.device("cuda"), training=False) == expected  # evaluation too
    assert resolve_precision("fp32", torch.device("cuda")) == "fp32"  # explicit choices stay
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    scaler = grad_scaler(torch.device("cuda"), expected)
    assert (scaler is not None) == (expected == "fp16")


def test_cpu_auto_never_uses_the_scaler():
    cpu = torch.device("cpu")
    for training in (True, False):
        assert resolve_precision("auto", cpu, training) in ("bf16", "fp32")
    assert grad_scaler(cpu, resolve_precision("auto", cpu)) is None
    assert grad_scaler(cpu, "bf16") is None and grad_scaler(cpu, "fp32") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)


def test_autocast_dtypes():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with autocast(torch.device("cpu"), precision):
            assert (x @ w).dtype == dtype


def test_cpu_training_takes_no_scaler_unless_fp16(cifar, tmp_path, one_thread):
    """auto on a CPU: the plain step. fp16 asked for explicitly: the scaled step (it runs on a CPU too),
    its scale saved in the checkpoint and restored on resume."""
    data = CIFAR10(cifar.train.subset(slice(0, 96)), cifar.test.subset(slice(0, 32)), cifar.classes)
    recipe = recipe_from("exercise", epochs=1, batch_size=32)
    auto = train(recipe, data, tmp_path / "auto", progress=False, log=quiet, max_steps=2)
    assert auto.meta["precision"] in ("bf16", "fp32")
    assert "grad_scaler" not in C.load_latest(tmp_path / "auto", with_train_state=True).train_state
    half = train(recipe, data, tmp_path / "half", progress=False, log=quiet, max_steps=2, precision="fp16")
    assert half.meta["precision"] == "fp16"
    state = C.load_latest(tmp_path / "half", with_train_state=True).train_state["grad_scaler"]
    assert state["scale"] > 0 and torch.isfinite(torch.tensor(state["scale"]))
    resumed = train(recipe, data, tmp_path / "half", progress=False, log=quiet, resume=True, precision="fp16")
    assert len(resumed.history) == 1 and all(torch.isfinite(p).all() for p in resumed.model.parameters())
