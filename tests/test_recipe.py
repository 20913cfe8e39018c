"""Details of the training recipe that the official launchers fix and no loss curve shows: evaluation with
the EMA weights, the data-dependent init on `init_batch` images with dropout on (Adam without AMSGrad:
`test_tf_eps_makes_torchs_adam_take_tf1_adams_steps`)."""

from __future__ import annotations

from train_helpers import tiny_spec

from flowspec.layers.dropout import Dropout
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


def test_data_dependent_init_sees_init_batch_images(tmp_path, monkeypatch):
    from flowspec.model import FlowModel

    sizes, init = [], FlowModel.initialize
    monkeypatch.setattr(FlowModel, "initialize", lambda self, x: sizes.append(len(x)) or init(self, x))
    spec = tiny_spec(steps=1)
    Trainer(spec, RunOptions(out=tmp_path / "run", quiet=True))
    assert sizes == [spec.train.init_batch]
