"""Segmentation resumed from a checkpoint whose BatchNorm running_var holds a NaN (saved
after a bad step). Training mode normalizes with batch statistics, so the training loss is
fine; eval mode uses the running statistics, so the validation loss is NaN."""

import io

import seg_ignore
import torch

BAD_BN = "context.1"


def saved_checkpoint():
    torch.manual_seed(0)
    state = seg_ignore.SegNet().state_dict()
    state[f"{BAD_BN}.running_var"][3] = float("nan")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def build():
    s = seg_ignore.build(empty_mask=False)
    s.model.load_state_dict(torch.load(saved_checkpoint(), weights_only=True))
    return s


def main():
    seg_ignore.run(build())


if __name__ == "__main__":
    main()
