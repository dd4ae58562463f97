"""
Stage 2, Visual-Predictive Instruction Tuning (PAPER.md Sec. 2, App. A.1): the whole model but the vision tower, on a
per-task data mixture, with the dual-head loss of model.py. The training loop below is also stage 1's (train_adapter.py).

    python train_vpit.py                                        # one process, configs/tiny.py
    torchrun --nproc_per_node=2 train_vpit.py configs/tiny.py   # DDP: gloo on CPU, nccl on GPU
    torchrun --nproc_per_node=8 train_vpit.py configs/8b.py     # DeepSpeed ZeRO-3, as configs/8b.py names zero3.json
    python train_vpit.py configs/8b.py --dry_run=True           # sizes, FLOPs/token, memory and hours; no weights

Restarted with the same out_dir, it resumes from its latest checkpoint (model, optimizer, schedule, step, RNG).
"""
import contextlib
import json
import math
import os
import random
import shutil
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from data import batch_loader, length_grouped_batches, read_jsonl, stage_data
from common import (built_in_shards, deepspeed_settings, finish_distributed, keep_latest_deepspeed_checkpoint,
                    load_dtype, open_token_cache, partitioned, save_checkpoint, setup_distributed, wants_bf16,
                    whole_state_dict)
from configurator import ConfigError
from model import MetaMorph, build_sample

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
out_dir = "out/tiny"
llm_path = "toy/base/llm"
num_visual_tokens = 64
vpit_data = {"image_qa": -1, "video_qa": -1, "generation": -1, "image_edit": -1, "video_prediction": -1,
             "visual_thinking": -1}  # task -> number of samples (-1: all); ablations change this mix
vpit_val = 64  # val samples per task for the periodic val loss
vpit_init = "adapter"  # stage-1 checkpoint under out_dir whose adapter and delimiter rows start stage 2 ("": fresh)
vpit_lead_in = {}  # a mixture trained alone, for vpit_lead_in_epochs, before vpit_data ({}: none, the paper's recipe)
vpit_lead_in_epochs = 1  # tools/ablate.py's equal-steps runs use the lead-in to give every mix the same number of steps
vpit_lead_in_lr = 0.0  # the lead-in's constant learning rate (0.0: vpit_lr)
vpit_lead_in_frozen = []  # parts the lead-in leaves as they start, e.g. ["adapter"]: stage 1's reading of pictures
vpit_lead_out = {}  # a mixture trained after vpit_data, for one epoch ({}: none, the paper's recipe)
vpit_lead_out_lr = 0.0  # the lead-out's peak learning rate, warmed up and decayed as the mix's (0.0: vpit_lr)
vpit_lr = 3e-4  # the toy's (Tab. 2's 6.93e-5 is in configs/8b.py; why: docs/devlog.md)
vpit_weight_decay = 0.0  # Tab. 2
vpit_batch_size = 16  # global batch, in conversations (Tab. 2's 1536 is in configs/8b.py; docs/devlog.md)
vpit_epochs = 1
vpit_warmup_ratio = 0.03  # released scripts
micro_batch_size = 16  # per process; gradient accumulation makes up the global batch
max_seq_len = 1024
vision_loss_weight = 1.0  # Sec. 2: total = CE + 1.0 x cosine term
drawn_token_dropout = 0.0  # not in the paper: a drawn token read back as a blank in training (configs/tiny.py)
vision_loss = "cosine"  # Tab. 3: "cosine" (the paper's choice) or "l1" regression
grad_clip = 1.0
dtype = "auto"  # "auto": bf16 autocast where the hardware has it (a CUDA GPU with bf16), else fp32; or "bfloat16"
grad_checkpointing = False
data_workers = 2  # DataLoader workers reading and tokenizing the next micro-batches while the model steps
deepspeed_config = ""  # e.g. configs/zero3.json: the DeepSpeed engine does backward and step
log_interval = 10
eval_interval = 250  # steps between val-loss passes (a pass over the toy mix's 7 x 64 val conversations: ~5 s)
ckpt_interval = 100
stop_after = -1  # stop (as if killed) after this many steps; the next run resumes. -1: run to the end
seed = 1337
device = "auto"
dry_run = False
# ---------------------------------------------------------------------------------------------------------------------
FREEZABLE = {"adapter", "llm", "vision_head"}  # MetaMorph's trained parts, which vpit_lead_in_frozen may name


def cosine_schedule(step, total, warmup_ratio, decay=True):
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to 0 (released scripts), or constant."""
    warmup = max(1, round(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    if not decay:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def to_device(batch, dev):
    return {k: v.to(dev) for k, v in batch.items()}


@torch.no_grad()
def val_losses(model, val_sets, micro_batch, dev, amp):
    """Per task: mean text loss, and mean cosine of the predicted visual tokens (for tasks that output images)."""
    model.eval()
    report = {}
    for task, data in val_sets.items():
        text = cos = targets = rows = 0.0
        for i in range(0, len(data), micro_batch):
            batch = data.batch(range(i, min(i + micro_batch, len(data))))
            kept, n = batch.pop("kept"), int(batch["vision_mask"][:, 1:].sum())
            batch.pop("skipped")
            with amp:
                _, t, v = model(**to_device(batch, dev))
            text, cos, targets, rows = text + t.item() * kept, cos + (1 - v.item()) * n, targets + n, rows + kept
        report[task] = {"text_loss": text / max(rows, 1)}
        if targets:
            report[task]["vision_cos"] = cos / targets
    model.train()
    return report


def train(model, params, train_set, val_sets, save_model, name, hp, rank=0, world=1, dev=torch.device("cpu")):
    """The hand-written loop of both stages: AdamW, warm-up + cosine (constant if not hp["decay"]), gradient
    accumulation up to hp["batch_size"], clipping, optional bf16 autocast, periodic val loss per task, atomic
    checkpoints in out_dir/ckpt/<name> and resume from them, a log in out_dir/logs/<name>.jsonl.
    save_model(model, path) writes the stage's own format.
    Returns the engine that trained (the model, DDP or DeepSpeed) once all steps are done, else None."""
    accum = hp["batch_size"] // (hp["micro_batch_size"] * world)
    assert accum * hp["micro_batch_size"] * world == hp["batch_size"], \
        f"batch_size {hp['batch_size']} is not a multiple of micro_batch_size x world size"
    bf16 = wants_bf16(hp["dtype"], dev)
    micro_batches = [b for epoch in range(hp["epochs"]) for b in
                     length_grouped_batches(train_set.lengths(), hp["micro_batch_size"], hp["seed"] + epoch)]
    total_steps = len(micro_batches) // (accum * world)
    optimizer = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total_steps,
                                                                                       hp["warmup_ratio"], hp["decay"]))
    ckpt, step = os.path.join(hp["out_dir"], "ckpt", name), 0
    if os.path.exists(os.path.join(ckpt, "trainer.pt")):  # resume: the model was loaded from ckpt by the caller
        state = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}/{total_steps}")
    engine = model
    if hp["deepspeed_config"]:
        import deepspeed  # the engine shards parameters, gradients and optimizer state (ZeRO-3) and does the step

        settings = deepspeed_settings(hp, world, dev)
        if settings["bf16"]["enabled"]:  # DeepSpeed does not cast a model built in shards (zero.Init made the LLM bf16):
            for p in model.parameters():  # the heads built beside it follow
                if not hasattr(p, "ds_id"):
                    p.data = p.data.to(torch.bfloat16)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=settings)
        if os.path.exists(os.path.join(ckpt, "deepspeed")):
            _, client_state = engine.load_checkpoint(os.path.join(ckpt, "deepspeed"))
            step = client_state["step"]
    elif world > 1:
        # (every trainable module takes part in every step, text-only micro-batches too: MetaMorph.embed)
        engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and not hp["deepspeed_config"])
    os.makedirs(os.path.join(hp["out_dir"], "logs"), exist_ok=True)
    log = open(os.path.join(hp["out_dir"], "logs", f"{name}.jsonl"), "a") if rank == 0 else None
    # this rank's micro-batches from where the run stands (resume: mid-epoch), read and tokenized by the workers
    mine = micro_batches[rank::world][step * accum:total_steps * accum]
    loader = iter(batch_loader(train_set, mine, hp["data_workers"], pin_memory=dev.type == "cuda"))
    bar = tqdm(total=total_steps, initial=step, desc=name, disable=rank != 0)
    model.train()
    t0, tokens, skipped, skipped_all = time.time(), 0, 0, 0
    while step < total_steps and step != hp["stop_after"]:
        losses = torch.zeros(2, device=dev)  # text, vision: summed on the device, read once a step
        targets = 0
        lr = scheduler.get_last_lr()[0]  # this step's (the scheduler moves on with it)
        # the drawn-token dropout's draws: from (seed, rank, step) alone, so a resumed run repeats them
        blanks = torch.Generator(dev).manual_seed(hp["seed"] * 1_000_003 + step * 64 + rank) \
            if hp["drawn_token_dropout"] else None
        for k in range(accum):
            batch = next(loader)
            batch.pop("kept")
            skipped += batch.pop("skipped")
            tokens += int(batch["attention_mask"].sum()) * world  # (counted on the host, before the copy)
            targets += int(batch["vision_mask"].sum())
            batch = to_device(batch, dev)
            ddp = isinstance(engine, torch.nn.parallel.DistributedDataParallel)
            sync = engine.no_sync() if ddp and k < accum - 1 else contextlib.nullcontext()  # all-reduce once a step
            with sync, amp:
                loss, text_loss, vision_loss = engine(**batch, vision_loss_weight=hp["vision_loss_weight"],
                                                         vision_loss=hp["vision_loss"],
                                                         drawn_dropout=hp["drawn_token_dropout"], generator=blanks)
            if hp["deepspeed_config"]:
                engine.backward(loss)
                engine.step()
            else:
                (loss / accum).backward()
            losses += torch.stack([text_loss.detach(), vision_loss.detach()]).float() / accum
        if not hp["deepspeed_config"]:
            torch.nn.utils.clip_grad_norm_(params, hp["grad_clip"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        losses = torch.cat([losses, torch.tensor([targets, skipped], device=dev, dtype=torch.float)])
        if world > 1:  # log the global batch's losses, not rank 0's share
            dist.all_reduce(losses)
            losses[:2] /= world
        text_sum, vision_sum, targets, skipped_all = losses.tolist()
        if rank == 0:
            vision = ("vision_cos", 1 - vision_sum) if hp["vision_loss"] == "cosine" else ("vision_l1", vision_sum)
            record = {"step": step, "text_loss": text_sum, vision[0]: vision[1] if targets else None,
                      "lr": lr, "tokens_per_s": tokens / (time.time() - t0), "skipped": int(skipped_all)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % hp["log_interval"] == 0:
                bar.set_postfix(text=f"{text_sum:.3f}", **{vision[0][7:]: f"{vision[1]:.3f}" if targets else "-"},
                                lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
        if step % hp["eval_interval"] == 0 and val_sets and (rank == 0 or partitioned(engine)):  # ZeRO-3: all ranks
            report = val_losses(model, val_sets, hp["micro_batch_size"], dev, amp)
            if rank == 0:
                tqdm.write(f"step {step} val: {json.dumps(report)}")
        if step % hp["ckpt_interval"] == 0 and step < total_steps:
            if hp["deepspeed_config"]:  # every rank writes its shard of the ZeRO state
                engine.save_checkpoint(os.path.join(ckpt, "deepspeed"), client_state={"step": step})
            elif rank == 0:
                save_checkpoint(ckpt, model, save_model, optimizer, scheduler, step)
            if dist.is_initialized():
                dist.barrier()
            if hp["deepspeed_config"] and rank == 0:
                keep_latest_deepspeed_checkpoint(os.path.join(ckpt, "deepspeed"))
    bar.close()
    if rank == 0 and skipped_all:
        print(f"{name}: skipped {int(skipped_all)} conversations longer than max_seq_len (this run's steps)")
    return engine if step == total_steps else None


@torch.no_grad()
def exact_match(model, samples, cache, dev, lockstep=False, limit=200, batch_size=32):
    """Greedy answers to the first questions of val conversations (batch_size side by side in one KV cache, as eval.py
    draws) against the reference answers, exact match. lockstep: every rank runs it (ZeRO-3, model.generate_batch)."""
    model.eval()
    samples, right = samples[:limit], 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        prompts = [build_sample(model.tokenizer, s["conversations"][:1], len(s["images"]), model.num_visual_tokens,
                                add_generation_prompt=True) for s in chunk]
        replies, _ = model.generate_batch([(p["input_ids"].to(dev), p["slots"].to(dev)) for p in prompts],
                                          [cache.get_many(s["images"]).flatten(0, 1).to(dev) for s in chunk],
                                          max_new_tokens=16, lockstep=lockstep)
        right += sum(model.tokenizer.decode(pieces[-1], skip_special_tokens=True).strip() ==
                     s["conversations"][1]["value"].strip() for pieces, s in zip(replies, chunk))
    return right / max(1, len(samples))


def phases():
    """Stage 2's phases in order, (name, mixture, epochs, lr, decay, frozen parts): the lead-in if any, which keeps its
    learning rate after the warm-up (the toy learns to draw only under a sustained one) and leaves the parts
    vpit_lead_in_frozen names as they start; the mix; the lead-out if any. The last one is saved as out_dir/vpit."""
    lead_in = [("vpit_lead_in", vpit_lead_in, vpit_lead_in_epochs, vpit_lead_in_lr or vpit_lr, False,
                vpit_lead_in_frozen)] if vpit_lead_in else []
    lead_out = [("vpit", vpit_lead_out, 1, vpit_lead_out_lr or vpit_lr, True, [])] if vpit_lead_out else []
    return lead_in + [("vpit_mix" if lead_out else "vpit", vpit_data, vpit_epochs, vpit_lr, True, [])] + lead_out


def run_stage(name, start, mixture, epochs, lr, decay, frozen, rank, world, dev):
    """Train on mixture for epochs into out_dir/<name> (a MetaMorph folder), from start or, if empty, the LLM and
    stage 1's heads, leaving the parts named in frozen as they start; resumes from out_dir/ckpt/<name>. The last phase
    (out_dir/vpit) ends with stage 2's closing report (val losses, image_qa exact match). Returns whether it finished
    (not: stopped by stop_after)."""
    stage_dir, tokens_dir, ckpt = (os.path.join(out_dir, p) for p in (name, "tokens", f"ckpt/{name}"))
    hp = dict(lr=lr, weight_decay=vpit_weight_decay, batch_size=vpit_batch_size, micro_batch_size=micro_batch_size,
              epochs=epochs, warmup_ratio=vpit_warmup_ratio, grad_clip=grad_clip, dtype=dtype,
              vision_loss_weight=vision_loss_weight, vision_loss=vision_loss, drawn_token_dropout=drawn_token_dropout,
              deepspeed_config=deepspeed_config, log_interval=log_interval, eval_interval=eval_interval,
              stop_after=stop_after, seed=seed, ckpt_interval=ckpt_interval, out_dir=out_dir, decay=decay,
              data_workers=data_workers)
    with built_in_shards(hp, world, dev):
        if os.path.exists(os.path.join(ckpt, "trainer.pt")):
            model = MetaMorph.from_pretrained(ckpt, load_dtype(hp, dev))
        elif start:
            model = MetaMorph.from_pretrained(start, load_dtype(hp, dev))
        else:  # (under DeepSpeed the engine loads its own checkpoint over this)
            model = MetaMorph.from_llm(llm_path, open_token_cache(tokens_dir).dim, num_visual_tokens,
                                       load_dtype(hp, dev))
            if vpit_init:
                model.load_heads(os.path.join(out_dir, vpit_init), parts=("adapter", "delimiters"))
    if not deepspeed_config:  # (DeepSpeed places the model itself)
        model.to(dev)
    if grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    train_set, val_sets = stage_data(data_dir, mixture, vpit_val, model.tokenizer, tokens_dir, max_seq_len,
                                     num_visual_tokens, index_dir=os.path.join(out_dir, "data_index"))
    for part in frozen:
        getattr(model, part).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]  # everything but the vision tower (not in here)
    if rank == 0:
        print(f"{name}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters, {len(train_set)} "
              f"conversations, world size {world}")
    t0 = time.time()
    engine = train(model, params, train_set, val_sets, MetaMorph.save_pretrained, name, hp, rank, world, dev)
    if engine is None:
        return False
    results = {"minutes": (time.time() - t0) / 60}
    state = whole_state_dict(engine)
    if rank == 0:  # saved first: nothing in the report below can lose the trained model
        model.save_pretrained(stage_dir, state)
    if name == "vpit" and (rank == 0 or partitioned(engine)):  # rank 0 alone, but a ZeRO-3 forward needs every rank
        results["val"] = val_losses(model, val_sets, micro_batch_size, dev, contextlib.nullcontext())
        if "image_qa" in val_sets:  # the first questions of 200 val conversations (64 would be +-6 points)
            results["image_qa_exact_match"] = exact_match(
                model, read_jsonl(os.path.join(data_dir, "val", "image_qa.jsonl"), limit=200),
                open_token_cache(tokens_dir), dev, lockstep=partitioned(engine))
    if rank == 0:
        json.dump(results, open(os.path.join(out_dir, "logs", f"{name}_report.json"), "w"), indent=1)
        print(json.dumps(results, indent=1))
        shutil.rmtree(ckpt, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # every rank sees the saved folder before the next stage starts from it
    return True


def main():
    rank, world, dev = setup_distributed(device)
    torch.manual_seed(seed)
    random.seed(seed)
    if dry_run:
        from tools import estimate

        return estimate.report(llm_path, None, num_visual_tokens, {k: v for k, v in globals().items()
                                                                   if not k.startswith("_")})
    unknown = sorted(set(vpit_lead_in_frozen) - FREEZABLE)
    if unknown:
        raise ConfigError(f"vpit_lead_in_frozen names no part of the model: {', '.join(unknown)} "
                          f"(parts: {', '.join(sorted(FREEZABLE))})")
    stage_dir = os.path.join(out_dir, "vpit")
    if os.path.exists(os.path.join(stage_dir, "metamorph.json")):
        return print(f"{stage_dir} already holds the finished stage 2: delete it to train again")
    start = ""  # the first phase starts from the LLM + stage 1's heads, each later one from the phase before
    for name, mixture, epochs, lr, decay, frozen in phases():
        done = os.path.exists(os.path.join(out_dir, name, "metamorph.json"))
        if not done and not run_stage(name, start, mixture, epochs, lr, decay, frozen, rank, world, dev):
            break  # stopped by stop_after: the next run resumes it
        start = os.path.join(out_dir, name)
    finish_distributed(deepspeed_config)


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
