"""Details of the training recipe that the official launchers fix and no loss curve shows: evaluation with
the EMA weights, the data-dependent init on `init_batch` images with dropout on, Adam without AMSGrad."""

from __future__ import annotations

import numpy as np
import torch
from train_helpers import tiny_spec

from flowspec.layers.dropout import Dropout
from flowspec.spec import TrainSpec
from flowspec.train.schedule import adam_eps, build_optimizer
from flowspec.train.trainer import RunOptions, Trainer


def test_evaluation_uses_the_ema_weights(tmp_path):
    trainer = Trainer(tiny_spec(steps=1, ema=0.9), RunOptions(out=tmp_path / "run", quiet=True))
    assert trainer.updater.eval_model is trainer.updater.ema.module


def test_data_dependent_init_runs_with_dropout_on_as_the_official_init(tmp_path, monkeypatch):
    """flow_training.py builds the init graph with dropout_p: the init statistics see dropped units."""
    seen = []
    draw = Dropout.draw
    monkeypatch.setattr(Dropout, "draw", lambda self, *a: seen.append(self.active()) or draw(self, *a))
    Trainer(tiny_spec(steps=1), RunOptions(out=tmp_path / "run", quiet=True))
    assert seen and all(seen)


def test_adam_is_plain_adam_with_decreasing_gradients():
    """TF1 Adam (no AMSGrad): the check with growing gradients cannot tell AMSGrad apart."""
    train = TrainSpec(lr=1e-3, eps=1e-8, tf_eps=True)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = build_optimizer([w], train)
    m, v, ref = np.zeros(3), np.zeros(3), np.zeros(3)
    b1, b2 = train.betas
    for step in range(6):
        g = np.array([1e-2, -3e-3, 5e-4]) / (1 + step) ** 2
        w.grad = torch.from_numpy(g.copy())
        for group in opt.param_groups:
            group["eps"] = adam_eps(train, step)
        opt.step()
        m, v, t = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2, step + 1
        ref = ref - 1e-3 * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + 1e-8)
    assert np.allclose(w.detach().numpy(), ref, rtol=1e-9, atol=0)


def test_data_dependent_init_sees_init_batch_images(tmp_path, monkeypatch):
    from flowspec.model import FlowModel

    sizes, init = [], FlowModel.initialize
    monkeypatch.setattr(FlowModel, "initialize", lambda self, x: sizes.append(len(x)) or init(self, x))
    spec = tiny_spec(steps=1)
    Trainer(spec, RunOptions(out=tmp_path / "run", quiet=True))
    assert sizes == [spec.train.init_batch]
