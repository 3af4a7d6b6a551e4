"""nanscope.torch.Guard in custom loops on accelerate and Lightning Fabric: it takes their
wrapped optimizers (and their loss scalers), lets the wrapper step, and vetoes the same way."""

import pytest
import torch

from nanscope.core.enums import Category
from nanscope.torch import Guard

pytestmark = pytest.mark.filterwarnings("ignore:nanscope:RuntimeWarning")


def _data():
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)
    ]
    batches[2][0][4, 1] = float("nan")  # one NaN feature in sample 4 of step 2
    return batches


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def _run(guard, model, backward, batches):
    states = []

    def train_step(batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x), y)
        backward(loss)
        return loss

    for batch in batches:
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        guard.step(train_step, batch)
        after = model.state_dict()
        states.append(all(torch.equal(before[k], after[k]) for k in before))
    return states


def test_accelerate_prepared_optimizer():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    model = _net()
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = Guard(model, opt, policy="skip", reports=None)
    assert guard.optimizer is opt.optimizer and guard._host_optimizer is opt
    unchanged = _run(guard, model, acc.backward, _data())
    assert unchanged == [False, False, True, False, False]
    assert guard.last.category is Category.NONFINITE_INPUT and guard.last.samples == [4]
    assert guard.step_was_skipped is False and not opt.step_was_skipped


def test_fabric_wrapped_optimizer_and_module():
    fabric_mod = pytest.importorskip("lightning_fabric")
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = _net()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = Guard(model, opt, policy="skip", reports=None)
    assert guard._host_optimizer is opt and guard.module is model.module
    unchanged = _run(guard, model, fabric.backward, _data())
    assert unchanged == [False, False, True, False, False]
    assert guard.last.category is Category.NONFINITE_INPUT and guard.last.samples == [4]


@pytest.mark.cuda
def test_fabric_16_mixed_uses_the_precision_plugins_scaler():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fabric_mod = pytest.importorskip("lightning_fabric")
    fabric = fabric_mod.Fabric(accelerator="cuda", devices=1, precision="16-mixed")
    model = _net()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    guard = Guard(model, opt, policy="skip", reports=None)
    assert guard.scaler is fabric._precision.scaler
    batches = [(x.cuda(), y.cuda()) for x, y in _data()]
    unchanged = _run(guard, model, fabric.backward, batches)
    assert unchanged[2] and not unchanged[3]
    assert guard.last.category is Category.NONFINITE_INPUT
