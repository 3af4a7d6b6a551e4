"""Healthy: the same attention encoder with padding masks written as -inf, but every
sequence keeps at least one token. Nothing is non-finite; nanscope must stay silent."""

import attention_mask


def build():
    return attention_mask.build(empty_sequence=False)


def main():
    s = build()
    for i, batch in enumerate(s.batches):
        s.optimizer.zero_grad()
        loss = s.train_step(batch)
        s.optimizer.step()
        print(f"step {i} loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
