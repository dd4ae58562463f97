"""
Stage 1, adapter pretraining (PAPER.md App. A.1): on caption data, only the adapter learns to map visual tokens into
the LLM's input space (and, as in the released code, the new `<image_start>`/`<image_end>` rows). The LLM is frozen;
the vision head is not used (captions have no visual targets) and stays untrained until stage 2.

    python train_adapter.py                                       # configs/tiny.py -> out/tiny/adapter/
    torchrun --nproc_per_node=8 train_adapter.py configs/8b.py    # DeepSpeed ZeRO-2 (adapter_deepspeed_config)

The loop is stage 2's (train_vpit.train); only what trains, the data and the hyperparameters differ.
"""
import contextlib
import json
import os
import random
import shutil
import time

import torch

from data import stage_data
from common import (built_in_shards, finish_distributed, load_dtype, open_token_cache, partitioned, save_atomically,
                    setup_distributed, whole)
from model import MetaMorph
from train_vpit import train, val_losses

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
out_dir = "out/tiny"
llm_path = "toy/base/llm"
num_visual_tokens = 64
adapter_data = {"caption": -1}
adapter_val = 64
adapter_lr = 1e-3  # the toy's; 1.6e-2 reads pictures better, draws worse (docs/devlog.md, (twelfth), (fourteenth))
adapter_weight_decay = 0.0  # Tab. 2 (and 0 keeps the frozen embedding rows exactly frozen under AdamW)
adapter_batch_size = 32  # the toy's; configs/8b.py sets the paper's (why 32: docs/devlog.md)
adapter_epochs = 8  # the toy's 4,000 captions; 250 steps leave the picture off the LLM's words (docs/devlog.md)
adapter_warmup_ratio = 0.03
adapter_deepspeed_config = ""  # e.g. configs/zero2.json
micro_batch_size = 16
max_seq_len = 1024
grad_clip = 1.0
dtype = "auto"  # as in train_vpit.py
grad_checkpointing = False  # the frozen LLM's activations still carry the adapter's gradient: at 8B, recompute them
data_workers = 2
log_interval = 10
eval_interval = 250  # steps between val-loss passes
ckpt_interval = 100
stop_after = -1
seed = 1337
device = "auto"
# ---------------------------------------------------------------------------------------------------------------------


def freeze_all_but_adapter(model):
    """Trainable: the adapter, and of the input embedding table only the two new delimiter rows (a gradient mask).
    PAPER.md Sec. 2: only the adapter (released code: and the input embeddings); an untied output table stays frozen,
    as its delimiter rows, never a target in captions, would only be pushed down."""
    model.requires_grad_(False)
    model.adapter.requires_grad_(True)
    table = model.llm.get_input_embeddings().weight
    keep = torch.zeros(table.shape[0], 1)
    keep[[model.image_start_id, model.image_end_id]] = 1
    table.requires_grad_(True)
    table.register_hook(lambda grad: grad * keep.to(grad.device, grad.dtype))
    return list(model.adapter.parameters()) + [table]


def main():
    rank, world, dev = setup_distributed(device)
    torch.manual_seed(seed)
    random.seed(seed)
    stage_dir, tokens_dir, ckpt = (os.path.join(out_dir, p) for p in ("adapter", "tokens", "ckpt/adapter"))
    if os.path.exists(os.path.join(stage_dir, "metamorph.json")):
        return print(f"{stage_dir} already holds the finished stage 1: delete it to train again")
    hp = dict(lr=adapter_lr, weight_decay=adapter_weight_decay, batch_size=adapter_batch_size,
              micro_batch_size=micro_batch_size, epochs=adapter_epochs, warmup_ratio=adapter_warmup_ratio,
              grad_clip=grad_clip, dtype=dtype, vision_loss_weight=1.0, vision_loss="cosine", drawn_token_dropout=0.0,
              deepspeed_config=adapter_deepspeed_config,
              log_interval=log_interval, eval_interval=eval_interval, stop_after=stop_after, seed=seed,
              ckpt_interval=ckpt_interval, out_dir=out_dir, decay=True, data_workers=data_workers)
    with built_in_shards(hp, world, dev):
        model = MetaMorph.from_llm(llm_path, open_token_cache(tokens_dir).dim, num_visual_tokens, load_dtype(hp, dev))
    if os.path.exists(os.path.join(ckpt, "trainer.pt")):
        model.load_heads(ckpt)
    params = freeze_all_but_adapter(model)
    if not adapter_deepspeed_config:  # (DeepSpeed places the model itself)
        model.to(dev)
    if grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    train_set, val_sets = stage_data(data_dir, adapter_data, adapter_val, model.tokenizer, tokens_dir, max_seq_len,
                                     num_visual_tokens, index_dir=os.path.join(out_dir, "data_index"))
    if rank == 0:
        print(f"stage 1: {sum(p.numel() for p in model.adapter.parameters()) / 1e6:.2f}M adapter parameters + 2 "
              f"delimiter rows, {len(train_set)} conversations, world size {world}")
    t0 = time.time()
    engine = train(model, params, train_set, val_sets, MetaMorph.save_heads, "adapter", hp, rank, world, dev)
    if engine is not None:
        report = {"minutes": (time.time() - t0) / 60}
        if rank == 0 or partitioned(engine):  # rank 0 alone, but a ZeRO-3 forward needs every rank
            report["val"] = val_losses(model, val_sets, micro_batch_size, dev, contextlib.nullcontext())
        tables = [model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight]
        with whole([*model.adapter.parameters(), *model.vision_head.parameters(), *tables]):  # ZeRO-3: gathered
            if rank == 0:
                save_atomically(model.save_heads, stage_dir)
                shutil.rmtree(ckpt, ignore_errors=True)
                json.dump(report, open(os.path.join(out_dir, "logs", "adapter_report.json"), "w"), indent=1)
                print(json.dumps(report, indent=1))
    finish_distributed(adapter_deepspeed_config)


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
