from __future__ import annotations

import pytest
import torch

from caloforge.errors import OptionError
from caloforge.training import TrainingConfig, _accumulate_gradients


def _squared_outputs(module: torch.nn.Module):
    return lambda batch: (module(batch["x"]) ** 2).sum(1).mean()


@pytest.mark.parametrize("micro_batch_size", [None, 1, 7, 10, 64])
def test_micro_batches_accumulate_the_batch_gradient(micro_batch_size):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batch = {"x": torch.randn(23, 4)}
    expected_loss = _squared_outputs(module)(batch)
    expected = torch.autograd.grad(expected_loss, list(module.parameters()))
    loss = _accumulate_gradients(_squared_outputs(module), batch, micro_batch_size)
    torch.testing.assert_close(loss, expected_loss.detach())
    for parameter, gradient in zip(module.parameters(), expected):
        torch.testing.assert_close(parameter.grad, gradient)


def test_non_finite_micro_batch_stops_before_backward():
    module = torch.nn.Linear(2, 1)
    x = torch.ones(6, 2)
    x[4] = float("nan")
    loss = _accumulate_gradients(_squared_outputs(module), {"x": x}, 2)
    assert not torch.isfinite(loss)
    assert module.weight.grad is not None  # the first micro-batches were accumulated ...
    assert torch.isfinite(module.weight.grad).all()  # ... the non-finite one never was


def test_micro_batch_size_validated():
    with pytest.raises(OptionError, match="micro_batch_size"):
        TrainingConfig(micro_batch_size=0).validate()


def test_torn_last_log_line_is_skipped_and_dropped_on_resume(tmp_path, caplog):
    import json

    from caloforge.errors import CaloforgeError
    from caloforge.training import _truncate_log, read_log

    path = tmp_path / "train_log.jsonl"
    complete = [{"epoch": 1, "val_loss": 3.0}, {"epoch": 2, "val_loss": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in complete) + '{"epoch": 3, "val_')
    with caplog.at_level("WARNING"):
        assert read_log(str(path)) == complete
    assert "torn last line" in caplog.text
    _truncate_log(str(path), 3)  # resume after epoch 3: its record was never completed
    assert read_log(str(path)) == complete
    assert path.read_text().endswith("}\n")
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 3}\n')
    with pytest.raises(CaloforgeError, match="line 2 is not a JSON record"):
        read_log(str(path))
