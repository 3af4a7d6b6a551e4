"""A user's Hugging Face fine-tuning script, as ``torchrun --nproc-per-node 2`` starts it: a
tiny BERT regressor (``num_labels=1``, so the Trainer's model uses MSE) built from a config,
a score per sentence read from a table where one score is missing (NaN, the way pandas reads an
empty cell). The Trainer wraps the model in DDP (gloo, CPU) and shards the data with its
distributed sampler, so only one rank's batch holds the missing score.

``guard`` puts nanscope's callback in; ``plain`` trains without it; ``--clean`` leaves the
table whole. Each rank writes what it saw to ``OUT/rank<R>.json``: the rows its data loader read
(in order), the Trainer's logged losses, the steps, a digest of its weights and (guarded) what
the callback decided."""

import gc
import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

out, mode = Path(sys.argv[1]), sys.argv[2]
clean = "--clean" in sys.argv[3:]  # every score present
warnings.simplefilter("ignore")

config = BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=32,
    num_labels=1,
)
torch.manual_seed(0)
model = BertForSequenceClassification(config)

g = torch.Generator().manual_seed(0)
rows = []
for _ in range(48):
    ids = torch.randint(1, 64, (12,), generator=g)
    score = float(ids.float().mean() / 64)
    rows.append(
        {
            "input_ids": ids,
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": torch.tensor(score),
        }
    )
if not clean:
    rows[21]["labels"] = torch.tensor(float("nan"))  # the empty cell


class Table(torch.utils.data.Dataset):
    """The rows, and the order this rank's data loader read them in."""

    def __init__(self, rows):
        self.rows, self.read = rows, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(int(i))
        return self.rows[i]


table = Table(rows)

args = TrainingArguments(
    output_dir=str(out / "trainer"),
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    max_steps=6,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    ddp_backend="gloo",
    seed=0,
    disable_tqdm=True,
)
trainer = Trainer(model=model, args=args, train_dataset=table)
guard = None
if mode == "guard":
    import nanscope.hf

    guard = nanscope.hf.guard(trainer, policy="skip", reports=None)
trainer.train()

rank = dist.get_rank()
weights = hashlib.sha256()
for p in model.parameters():
    weights.update(p.detach().numpy().tobytes())
d = guard.last if guard is not None else None
result = {
    "world": dist.get_world_size(),
    "wrapped": type(trainer.model_wrapped).__name__,
    "read": table.read,
    "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    "global_step": trainer.state.global_step,
    "weights": weights.hexdigest(),
    "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    "skipped": guard.skipped if guard is not None else None,
    "diagnosis": d.fields_dict() if d is not None else None,
}
(out / f"rank{rank}.json").write_text(json.dumps(result))
# Drop what holds the process group, so it is destroyed here and not at exit (conftest.py).
trainer = model = guard = None
gc.collect()
dist.destroy_process_group()
