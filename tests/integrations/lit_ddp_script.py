"""A 2-process Lightning DDP run on gloo (CPU) for test_lightning_ddp.py; Lightning's launcher
starts rank 1 by running this same script again. Only rank 1's data has the bad batch.

Usage: python lit_ddp_script.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lit_models as M  # noqa: E402
import torch  # noqa: E402

from nanscope.lightning import NanGuard  # noqa: E402


class RankNet(M.Net):
    def train_dataloader(self):
        return M.data(
            bad=M.BAD_BATCH if self.trainer.global_rank == 1 else None,
            seed=self.trainer.global_rank,
        )


def main(out: Path) -> None:
    guard = NanGuard(policy="skip", reports=str(out / "reports"))
    rec = M.Recorder()
    trainer = M.trainer([guard, rec], strategy="ddp", devices=2, use_distributed_sampler=False)
    trainer.fit(RankNet(scheduler=False))
    rank = trainer.global_rank
    d = guard.last
    result = {
        "rank": rank,
        "skipped": guard.skipped,
        "global_step": trainer.global_step,
        "unchanged": [i for i in sorted(rec.before) if rec.unchanged(i)],
        "diagnosis": d.to_dict() if d is not None else None,
        "weights": float(sum(p.double().sum() for p in trainer.lightning_module.parameters())),
        "finite": all(bool(torch.isfinite(p).all()) for p in trainer.lightning_module.parameters()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main(Path(sys.argv[1]))
