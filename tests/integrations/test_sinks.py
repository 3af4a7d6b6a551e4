"""nanscope.sinks with the real tracker packages: the TensorBoard event file read back,
Weights & Biases in offline mode, MLflow on a local file store."""

import subprocess
import sys
import time

import lit_models as M
import pytest
import torch

from nanscope.lightning import NanGuard
from nanscope.torch import Guard

pytestmark = pytest.mark.filterwarnings("ignore:nanscope:RuntimeWarning")


def _guarded_failure(sinks, reports=None):
    """A torch loop whose step 2 has a NaN pixel: nonfinite_input, skipped."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = Guard(net, opt, policy="skip", reports=reports, sinks=sinks)

    def step(batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for i in range(4):
        x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
        if i == 2:
            x[1, 0] = float("nan")
        guard.step(step, (x, y))
    assert guard.skipped == 1
    return guard


def test_tensorboard_from_lightnings_logger(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=0)
    guard = NanGuard(policy="skip", reports=None)  # sinks="auto": the Trainer's TensorBoard writer
    t = M.trainer([guard], logger=logger, log_every_n_steps=1)
    t.fit(M.Net(), M.data())
    logger.experiment.flush()
    acc = EventAccumulator(
        str(tmp_path / "tb" / "version_0"), size_guidance={"tensors": 0, "scalars": 0}
    )
    acc.Reload()
    skipped = acc.Scalars("nanscope/skipped_steps")
    assert [(e.step, e.value) for e in skipped] == [(M.BAD_BATCH, 1.0)]
    (text,) = acc.Tensors("nanscope/diagnosis/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert "op_domain in loss" in body and "action: skip" in body


def test_wandb_offline_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="nanscope-test")
    try:
        guard = _guarded_failure("auto", reports=str(tmp_path / "rep"))
        assert run.summary["nanscope/skipped_steps"] == 1
        assert run.summary["nanscope/nonfinite_steps"] == 1
        assert run.summary["nanscope/last_category"] == "nonfinite_input"
        run_dir = run.dir
    finally:
        run.finish()
    path = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(
        100
    ):  # wandb-core may still be writing its log after finish() returned (bounded)
        log = path.read_bytes()
        if b"nanscope-bundle" in log:
            break
        time.sleep(0.1)
    assert b"nanscope: nonfinite_input at step 2 (skip)" in log  # the alert
    assert (
        b"nanscope-bundle" in log and b"nanscope-step000002-nonfinite_input" in log
    )  # the artifact
    assert guard.last.bundle and run_dir


def test_mlflow_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store the brief asks for
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            _guarded_failure("auto")
        client = mlflow.tracking.MlflowClient()
        data = client.get_run(run.info.run_id).data
        assert data.metrics["nanscope/skipped_steps"] == 1.0
        assert data.tags["nanscope.category"] == "nonfinite_input"
        assert data.tags["nanscope.action"] == "skip"
        names = [a.path for a in client.list_artifacts(run.info.run_id, "nanscope")]
        assert names == ["nanscope/step000002-nonfinite_input.json"]
    finally:
        mlflow.set_tracking_uri("")


def test_no_tracker_is_imported_by_auto():
    code = (
        "import sys, nanscope.sinks as s; s.resolve('auto'); "
        "bad = [m for m in ('wandb', 'mlflow', 'tensorboard', 'torch', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_failing_sink_only_warns(tmp_path):
    def broken(event):
        raise OSError("tracker down")

    with pytest.warns(
        RuntimeWarning, match="could not send the diagnosis to the trackers: OSError"
    ):
        guard = _guarded_failure([broken])
    assert guard.skipped == 1
