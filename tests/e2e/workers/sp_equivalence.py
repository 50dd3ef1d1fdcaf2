"""One step of the model split over the ranks of a sequence-parallel group, against the full sequence.

Started by torchrun with 2 CPU ranks (gloo). Every rank also computes the reference: the same model on the
whole sequence in one process. Rank 0 writes the loss and each parameter's gradient error as JSON.
"""

import argparse
import json

import torch
import torch.distributed as dist

from pretrain.config import ModelConfig
from pretrain.model.gpt import GPT
from pretrain.parallel.distributed import init_deepspeed_comm
from pretrain.parallel.sequence_parallel import apply_sequence_parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ulysses", "ring"], required=True)
    parser.add_argument("--zigzag", action="store_true")
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=44)
    parser.add_argument("--pos-encoding", default="alibi")
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--n-kv-head", type=int, default=None)
    parser.add_argument("--documents", action="store_true", help="a packed window: attention inside documents only")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    init_deepspeed_comm("gloo")  # Ulysses' all-to-all is DeepSpeed's comm
    group = dist.new_group(list(range(dist.get_world_size())))
    torch.manual_seed(0)
    cfg = ModelConfig(
        n_layer=2, n_head=args.n_head, d_model=8 * args.n_head, seq_len=args.seq_len, vocab_size=97,
        pos_encoding=args.pos_encoding, n_kv_head=args.n_kv_head,
    )  # fmt: skip
    model = GPT(cfg)
    tokens = torch.randint(0, 97, (2, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    docs = {}
    if args.documents:
        # Row 0: a one-token document, then documents that cross the shard and ring-block boundaries; row 1: one
        # document longer than the window.
        lengths = [1, 9, 15, 3, args.seq_len - 28]
        row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        docs["document_ids"] = torch.stack([row, torch.zeros_like(row)])

    reference = model(inputs, targets, window=args.window, **docs)
    reference.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    layout = apply_sequence_parallel(model, group, args.mode, args.seq_len, args.zigzag)
    local = model(
        layout.shard(inputs), layout.shard(targets), positions=layout.positions(), window=args.window, **docs
    )  # the ids of the whole window: global positions
    # Every rank holds the same number of tokens: the mean of the local means is the sequence's mean.
    (local / layout.sp_size).backward()
    loss = local.detach().clone()
    dist.all_reduce(loss, group=group)
    loss /= layout.sp_size
    errors = {}
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)  # what DeepSpeed's sequence-data-parallel reduction adds up
        errors[name] = ((grad - want[name]).norm() / want[name].norm().clamp_min(1e-30)).item()
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"loss": loss.item(), "reference": reference.item(), "grad_errors": errors}, f)
    # Every rank done communicating before any tears its connections down: a gloo peer closed mid-collective
    # aborts the other rank at exit ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
