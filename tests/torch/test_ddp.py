"""The Guard under DistributedDataParallel: 2 processes, gloo on CPU, one rank fed a NaN
sample. Both ranks must skip the same step (nobody steps while the other skips, nothing
hangs), stay bit-identical, and the diagnosis must name the rank that saw the NaN first.
Also a backward-only NaN on one rank, and nanscope failing on one rank only."""

import json
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import json, sys, warnings
    from datetime import timedelta
    from pathlib import Path

    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nanscope.torch import Guard

    BAD_RANK, BAD_STEP, BAD_SAMPLE = 1, 2, 3


    def worker(rank, world, port, out):
        warnings.simplefilter("ignore")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        ddp = DDP(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        batches = [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(4)]
        if rank == BAD_RANK:
            batches[BAD_STEP][0][BAD_SAMPLE, 1] = float("nan")

        def train_step(batch):
            x, y = batch
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss

        guard = Guard(ddp, opt, policy="skip", reports=str(Path(out) / "reports"))
        applied = []
        for batch in batches:
            before = [p.detach().clone() for p in model.parameters()]
            guard.step(train_step, batch)
            applied.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
        d = guard.last
        result = {"applied": applied, "skipped": guard.skipped,
                  "diagnosis": d.fields_dict() if d else None,
                  "weights": [p.detach().double().sum().item() for p in model.parameters()],
                  "finite": all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
                                if t.is_floating_point())}

        # A backward-only failure on rank 0: sqrt of a distance that is exactly 0. Both losses
        # are finite; the gradient all-reduce spreads rank 0's NaN to rank 1.
        torch.manual_seed(1)
        enc = nn.Linear(5, 4)
        ddp2 = DDP(enc)
        opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
        a = torch.randn(3, 5, generator=g)
        b = a.clone() if rank == 0 else torch.randn(3, 5, generator=g)

        def pair_step(batch):
            x1, x2 = batch
            loss = torch.sqrt(((ddp2(x1) - ddp2(x2)) ** 2).sum(dim=1)).mean()
            loss.backward()
            return loss

        guard2 = Guard(ddp2, opt2, policy="skip", reports=None)
        guard2.step(pair_step, (a, b))
        result["backward"] = guard2.last.fields_dict() if guard2.last else None
        result["backward_skipped"] = guard2.skipped

        # nanscope fails on rank 1 only. Rank 1 goes on unguarded at once; rank 0 keeps guarding
        # the healthy steps (they need no collective), and steps aside too at the first bad
        # step (rank 1's NaN batch, last), when the guarded rank exchanges flags: nothing may
        # hang, and the unguarded step then applies what it would without nanscope.
        guard3 = Guard(ddp, opt, policy="skip", reports=None)
        if rank == 1:
            def broken():
                raise RuntimeError("injected failure on rank 1")
            guard3._before = broken
        disabled_at = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in batches[:2] + batches[3:] + batches[2:3]:
                guard3.step(train_step, batch)
                disabled_at.append(guard3.disabled)
        result["internal_warnings"] = [str(w.message) for w in caught]
        result["internal_disabled"] = guard3.disabled
        result["disabled_at"] = disabled_at
        result["weights_after"] = [repr(p.detach().double().sum().item()) for p in model.parameters()]
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()


    if __name__ == "__main__":
        port, out = int(sys.argv[1]), sys.argv[2]
        mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_and_the_bad_rank_is_named(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(WORKER)
    run = subprocess.run(
        [sys.executable, str(script), str(free_port()), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Same decision on both ranks: step 2 skipped everywhere, the others applied.
    assert r0["applied"] == r1["applied"] == [True, True, False, True]
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["weights"] == r1["weights"] and r0["finite"] and r1["finite"]
    for r in (r0, r1):
        d = r["diagnosis"]
        assert (
            d["category"] == "nonfinite_input"
            and d["ranks"] == [1]
            and d["samples"] == [3]
            and d["step"] == 2
        )
        assert any("rank 1 saw it first" in e for e in d["evidence"])
    for r in (r0, r1):
        d = r["backward"]
        assert r["backward_skipped"] == 1
        assert (d["category"], d["phase"], d["op_kind"], d["ranks"]) == (
            "singular_gradient",
            "backward",
            "sqrt",
            [0],
        )
    for r, text in ((r0, "failed on rank 1"), (r1, "injected failure on rank 1")):
        assert (
            r["internal_disabled"]
            and len(r["internal_warnings"]) == 1
            and text in r["internal_warnings"][0]
        )
    assert r0["disabled_at"] == [False, False, False, True]
    assert r1["disabled_at"] == [True, True, True, True]
    assert r0["weights_after"] == r1["weights_after"]  # both went on training, in step
    bundles = list((tmp_path / "reports").iterdir())
    assert len(bundles) == 1 and r1["diagnosis"]["bundle"] == str(
        bundles[0]
    )  # written once, by the bad rank
