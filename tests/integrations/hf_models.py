"""Tiny transformers models and data, built from configs (nothing is downloaded)."""

from __future__ import annotations

import torch
import transformers

VOCAB, SEQ, BATCH = 32, 8, 4
BAD_STEP = 2  # the optimizer step whose teacher distribution is one-hot


def gpt2(seed: int = 0, **kw) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg)


def distill_data(
    n_steps: int = 6, bad: int | None = BAD_STEP, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Token ids and a teacher's next-token distribution; on step ``bad`` the teacher is one-hot
    (hard labels), so its zeros meet the hand-written KL's log."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in range(n_steps):
        for _ in range(BATCH):
            ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
            teacher = torch.softmax(torch.randn(SEQ, VOCAB, generator=g), -1)
            if step == bad:
                teacher = torch.nn.functional.one_hot(
                    torch.randint(0, VOCAB, (SEQ,), generator=g), VOCAB
                ).float()
            rows.append({"input_ids": ids, "teacher_probs": teacher})
    return rows


class DistillTrainer(transformers.Trainer):
    """A hand-written KL(teacher || student): t * (log t - log p). A one-hot teacher makes
    0 * log 0 = NaN in the loss, while the gradient (-t * dlog p) stays finite."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = inputs.pop("teacher_probs")
        out = model(**inputs)
        log_p = torch.log_softmax(out.logits, -1)
        loss = (teacher * (torch.log(teacher) - log_p)).sum(-1).mean()
        return (loss, out) if return_outputs else loss


def args(tmp_path, **kw) -> transformers.TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        max_grad_norm=1.0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Recorder(transformers.TrainerCallback):
    """Weights and the learning rate around every optimizer step (global step -> state)."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.lr: dict[int, tuple[float, float]] = {}
        self._lr0 = 0.0

    def on_step_begin(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw
    ):
        self.before[state.global_step] = {
            k: v.detach().clone() for k, v in model.state_dict().items()
        }
        self._lr0 = lr_scheduler.get_last_lr()[0]

    def on_step_end(
        self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw
    ):
        step = state.global_step - 1
        self.after[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.lr[step] = (self._lr0, lr_scheduler.get_last_lr()[0])

    def unchanged(self, step: int) -> bool:
        return all(
            torch.equal(self.before[step][k], self.after[step][k]) for k in self.before[step]
        )
