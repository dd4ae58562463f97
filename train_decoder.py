"""
The diffusion visualizer (PAPER.md Sec. 2.3, App. A.2): Stable Diffusion 1.5 finetuned to draw an image from its own
64 SigLIP tokens instead of a CLIP caption, a "diffusion autoencoder". It renders the tokens MetaMorph predicts.

    python train_decoder.py                                      # configs/tiny.py: a tiny UNet on 16x16x4 toy latents
    torchrun --nproc_per_node=8 train_decoder.py configs/8b.py   # SD-1.5 from sd_path, 512 px

Trained: the projector (tokens -> cross-attention states) and the UNet, on the MSE of the target that the scheduler
config names (SD-1.5: the noise, epsilon; configs/tiny.py's fresh UNet: the clean latent). Frozen: SigLIP (its
tokens come from encode.py's cache) and the VAE (its latents are encoded once, into out_dir/latents). Output:
out_dir/decoder/ (unet/, scheduler/, projector.safetensors, decoder.json, grid.png). The Decoder module and the sampler
live in visualizer.py; sample.py and eval.py use them as

    vis = load_visualizer(os.path.join(out_dir, "decoder"), vae_path)
    images = decode_tokens(vis, tokens)     # (B, 64, d_v) -> B PIL images: DDIM with classifier-free guidance

Restarted with the same out_dir, it resumes from out_dir/ckpt/decoder (model, optimizer, schedule, step).
"""
import contextlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from tqdm import tqdm

from common import TokenCache, save_atomically, save_checkpoint, setup_distributed, wants_bf16
from configurator import MissingFile
from data import load_mixture
from encode import cached_paths, check_meta, fill_cache, finish_cache, load_image
from toy.scenes import names_toy_scenes, scene_agreement
from visualizer import Decoder, Visualizer, decode_tokens, grid, load_vae

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
image_root = ""  # image paths in the JSONL are relative to this; "" means data_dir
out_dir = "out/tiny"
vae_path = "toy/base/vae"
sd_path = ""  # a local Stable Diffusion 1.5 folder (unet/, scheduler/); "" builds a fresh UNet from decoder_unet
decoder_unet = {"sample_size": 16, "block_out_channels": (32, 64, 64), "layers_per_block": 1,
                "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                "cross_attention_dim": 128, "attention_head_dim": 4}  # UNet2DConditionModel config (sd_path "")
decoder_noise_schedule = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                          "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
                          "steps_offset": 1, "prediction_type": "sample"}  # SD-1.5's, but predicting the clean
# latent ("sample") where SD-1.5 predicts the noise: from scratch in minutes, a target that weighs the noisiest steps
# (where the tokens decide what goes where) as much as the rest learns the scene ~5x faster (docs/devlog.md: decoder)
decoder_projector_hidden = 512  # Sec. 2.3: 2048 for SD-1.5
decoder_cond_len = 77  # App. A.2, released code: the 64 projected tokens zero-padded to CLIP's 77
decoder_spatial_channels = 16  # > 0: the projected tokens also enter as an 8x8 map stacked on the latents (Decoder)
decoder_data = {"caption": -1, "generation": -1, "image_qa": -1}  # images only (App. A.2): those of these train files
decoder_val = {"generation": 200}  # held-out images for the grids and the final report (first n of each val file)
decoder_resolution = 64  # pixels; images are centre-cropped to a square and resized to this
decoder_lr = 2e-3
decoder_weight_decay = 0.01  # App. A.2
decoder_warmup_steps = 50  # App. A.2: logarithmic warm-up from 0 to decoder_lr
decoder_decay_steps = 350  # App. A.2: then linear decay to 0; training lasts warm-up + decay (toy: docs/devlog.md)
decoder_batch_size = 32  # global batch; gradient accumulation makes it up
decoder_micro_batch_size = 32  # per process
decoder_cond_drop = 0.1  # App. A.2: 0.7 for SD-1.5 ("CFG level 0.7", configs/8b.py); the toy's: docs/devlog.md
decoder_sample_steps = 25  # DDIM steps when decoding
decoder_guidance = 1.5  # classifier-free guidance scale when decoding (the toy's best: docs/devlog.md, "The decoder")
decoder_grid_images = 16  # val images in each grid of originals beside their decodings
decoder_grid_interval = 200  # steps between grids in out_dir/logs/decoder_grids/
decoder_score_scenes = None  # score decodings of the val images with the toy world's read_scene; None: where the
# val data names toy scenes (the toy world: other pictures it would misread)
encode_batch_size = 64  # images per VAE batch when caching latents
encode_shard_size = 4096  # latents per safetensors shard
grad_clip = 1.0
grad_checkpointing = False
dtype = "auto"  # as in train_vpit.py: bf16 autocast on a CUDA GPU that has it, else fp32
log_interval = 10
ckpt_interval = 100
stop_after = -1  # stop (as if killed) after this many steps; the next run resumes. -1: run to the end
seed = 1337
# ---------------------------------------------------------------------------------------------------------------------


# ---- a new decoder (the Decoder class and decode_tokens are in visualizer.py) ----------------------------------------
def new_decoder(token_dim, latent_channels=4):
    """SD-1.5's UNet and noise schedule from sd_path, or a fresh UNet from decoder_unet; a new projector."""
    if sd_path:
        if not os.path.isdir(os.path.join(sd_path, "unet")):
            raise MissingFile(f"no Stable Diffusion UNet at {sd_path}/unet: put a local snapshot of "
                              "stable-diffusion-v1-5 there (unet/, scheduler/, vae/), or set sd_path=\"\"")
        unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
        noise_scheduler = DDPMScheduler.from_pretrained(sd_path, subfolder="scheduler")
        assert decoder_spatial_channels == 0, "SD-1.5's UNet takes the latents alone: set decoder_spatial_channels=0"
    else:
        unet = UNet2DConditionModel(**decoder_unet, in_channels=latent_channels + decoder_spatial_channels,
                                    out_channels=latent_channels)
        noise_scheduler = DDPMScheduler.from_config(decoder_noise_schedule)
    return Decoder(unet, token_dim, decoder_projector_hidden, decoder_cond_len, noise_scheduler, decoder_resolution,
                   decoder_spatial_channels)


# ---- data: image lists, latent cache ---------------------------------------------------------------------------------
def images_of(samples):
    """The images of samples, deduplicated."""
    return list(dict.fromkeys(p for s in samples for p in s.get("images", [])))


def square(image, resolution):
    """The centred square crop of a PIL image, resized to resolution x resolution."""
    w, h = image.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return image.crop(box).resize((resolution, resolution), Image.BICUBIC)


@torch.no_grad()
def cache_latents(vae, paths, rank, world, dev):
    """Encode every image not yet cached, once (App. A.2: the VAE is frozen), as its latent mean x the VAE's scaling
    factor, into out_dir/latents in encode.py's cache format (its siglip_path field names the VAE, num_tokens the
    resolution); rank r encodes every world-th of them. Returns the whole cache: cache.get_many(paths) -> (n, 4, h, w)."""
    latents_dir, root = os.path.join(out_dir, "latents"), image_root or data_dir
    if rank == 0:
        check_meta(latents_dir, vae_path, decoder_resolution, root)
    if dist.is_initialized():
        dist.barrier()
    done = cached_paths(latents_dir)
    todo = [p for p in paths if p not in done][rank::world]

    def encode_batch(batch):
        images = [square(im, decoder_resolution) for im in pool.map(load_image, [os.path.join(root, p) for p in batch])]
        pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1
        return batch, (vae.encode(pixels.to(dev)).latent_dist.mean * vae.config.scaling_factor).cpu()

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        fill_cache(latents_dir, todo, encode_batch, rank, encode_batch_size, encode_shard_size, desc="VAE latents")
    finish_cache(latents_dir, rank)
    return TokenCache(latents_dir)


# ---- training --------------------------------------------------------------------------------------------------------
def lr_factor(step, warmup, decay):
    """App. A.2: logarithmic warm-up from 0 to 1 over `warmup` steps (ln(1 + t) / ln(1 + W), the released code's),
    then linear decay to 0 over `decay` steps, and 0 after."""
    if step < warmup:
        return math.log1p(step) / math.log1p(warmup)
    return max(0.0, 1 - (step - warmup) / max(1, decay))


@lru_cache(maxsize=2)
def permutation(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def global_batch(step, n, batch_size):
    """Indices of step's global batch: one seeded permutation of the n images per epoch, read in order, so the data
    position is a function of the step (a resumed run needs nothing else)."""
    epoch, i = divmod(step, n // batch_size)
    return permutation(n, seed + epoch)[i * batch_size:(i + 1) * batch_size]


def training_noise(latent_shape, num_timesteps, cond_drop, generator):
    """Noise, timesteps and the condition mask of one micro batch; keep is False with probability cond_drop
    (App. A.2, "CFG level 0.7": the whole condition is zeroed)."""
    n = latent_shape[0]
    return (torch.randn(latent_shape, generator=generator),
            torch.randint(0, num_timesteps, (n,), generator=generator),
            torch.rand(n, generator=generator) >= cond_drop)


def training_target(noise_scheduler, x0, noise, t):
    """What the UNet learns to predict, as its scheduler config says: the noise (SD-1.5's "epsilon"), the clean latent
    ("sample", configs/tiny.py) or the velocity ("v_prediction"). The DDIM sampler reads the same config."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return x0
    return noise_scheduler.get_velocity(x0, noise, t)


def train(decoder, latents, tokens, paths, rank, world, dev, on_step):
    """AdamW + the App. A.2 schedule, MSE on the scheduler's prediction type, gradient accumulation to
    decoder_batch_size with the global batch sharded by global rank, atomic checkpoints and resume. Returns True once
    all steps are done."""
    accum = decoder_batch_size // (decoder_micro_batch_size * world)
    assert accum * decoder_micro_batch_size * world == decoder_batch_size, \
        f"decoder_batch_size {decoder_batch_size} is not a multiple of decoder_micro_batch_size x world size"
    assert len(paths) >= decoder_batch_size, f"{len(paths)} training images: fewer than decoder_batch_size"
    total = decoder_warmup_steps + decoder_decay_steps
    params = list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=decoder_lr, betas=(0.9, 0.999), weight_decay=decoder_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, decoder_warmup_steps, decoder_decay_steps))
    ckpt, step = os.path.join(out_dir, "ckpt", "decoder"), 0
    if os.path.exists(os.path.join(ckpt, "trainer.pt")):  # the caller loaded the model from ckpt
        state = torch.load(os.path.join(ckpt, "trainer.pt"), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}/{total}")
    engine = nn.parallel.DistributedDataParallel(decoder, device_ids=[dev.index] if dev.type == "cuda" else None) \
        if world > 1 else decoder
    bf16 = wants_bf16(dtype, dev)  # (not on AMX CPUs: the toy UNet's steps are slower in bf16 there)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    num_timesteps = decoder.noise_scheduler.config.num_train_timesteps
    os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
    log = open(os.path.join(out_dir, "logs", "decoder.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, desc="decoder", disable=rank != 0)
    decoder.train()
    t0, start = time.time(), step
    while step < total and step != stop_after:
        share = global_batch(step, len(paths), decoder_batch_size)[rank::world]
        loss_sum, lr = 0.0, scheduler.get_last_lr()[0]  # this step's (the scheduler moves on with it)
        for k in range(accum):
            idx = share[k * decoder_micro_batch_size:(k + 1) * decoder_micro_batch_size]
            x0 = latents.get_many([paths[i] for i in idx]).to(dev)
            cond = tokens.get_many([paths[i] for i in idx]).to(dev)
            generator = torch.Generator().manual_seed(seed + (step * world + rank) * accum + k)
            noise, t, keep = (v.to(dev) for v in training_noise(x0.shape, num_timesteps, decoder_cond_drop, generator))
            sync = engine.no_sync() if world > 1 and k < accum - 1 else contextlib.nullcontext()
            with sync, amp:
                pred = engine(decoder.noise_scheduler.add_noise(x0, noise, t), t, cond, keep)
            loss = F.mse_loss(pred.float(), training_target(decoder.noise_scheduler, x0, noise, t))
            (loss / accum).backward()
            loss_sum += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update()
        if world > 1:
            loss_sum = torch.tensor(loss_sum, device=dev)
            dist.all_reduce(loss_sum)
            loss_sum = loss_sum.item() / world
        if rank == 0:
            record = {"step": step, "loss": loss_sum, "lr": lr,
                      "images_per_s": (step - start) * decoder_batch_size / (time.time() - t0)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % log_interval == 0:
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.0f}")
            on_step(step)
        if step % ckpt_interval == 0 and step < total:
            if rank == 0:
                save_checkpoint(ckpt, decoder, Decoder.save_pretrained, optimizer, scheduler, step)
            if dist.is_initialized():
                dist.barrier()
    bar.close()
    return step == total


# ---- looking at the decodings ----------------------------------------------------------------------------------------
def reconstruct(vis, tokens, paths):
    """(originals at the decoder's resolution, decodings of their true visual tokens)."""
    root = image_root or data_dir
    originals = [square(load_image(os.path.join(root, p)), vis.decoder.resolution) for p in paths]
    decodings = decode_tokens(vis, tokens.get_many(paths), decoder_sample_steps, decoder_guidance, seed,
                              decoder_micro_batch_size)
    return originals, decodings


# ---- main ------------------------------------------------------------------------------------------------------------
def main():
    rank, world, dev = setup_distributed()
    torch.manual_seed(seed)
    stage_dir, ckpt = os.path.join(out_dir, "decoder"), os.path.join(out_dir, "ckpt", "decoder")
    if os.path.exists(os.path.join(stage_dir, "decoder.json")):
        return print(f"{stage_dir} already holds the finished decoder: delete it to train again")
    t0 = time.time()
    tokens = TokenCache(os.path.join(out_dir, "tokens"))
    val_samples = load_mixture(data_dir, "val", decoder_val)
    paths, val_paths = images_of(load_mixture(data_dir, "train", decoder_data)), images_of(val_samples)
    missing = [p for p in paths + val_paths if p not in tokens]
    if missing:
        raise KeyError(f"{len(missing)} images, e.g. {missing[0]}, are not in the token cache {tokens.tokens_dir}: "
                       "run `python encode.py` with this data_dir")
    vae = load_vae(vae_path).to(dev)
    latents = cache_latents(vae, paths, rank, world, dev)
    resumed = os.path.exists(os.path.join(ckpt, "trainer.pt"))
    decoder = Decoder.from_pretrained(ckpt) if resumed else new_decoder(tokens.dim, vae.config.latent_channels)
    decoder = decoder.to(dev)
    if grad_checkpointing:
        decoder.unet.enable_gradient_checkpointing()
    if rank == 0:
        print(f"decoder: {sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M trainable parameters (UNet + "
              f"projector), {len(paths)} train images, {len(val_paths)} val images, world size {world}")
    vis = Visualizer(decoder, vae, dev)

    def show_progress(step):  # rank 0, after each step: a grid now and then, so a person sees training progress
        if step % decoder_grid_interval == 0:
            decoder.eval()
            os.makedirs(os.path.join(out_dir, "logs", "decoder_grids"), exist_ok=True)
            grid(*reconstruct(vis, tokens, val_paths[:decoder_grid_images])).save(
                os.path.join(out_dir, "logs", "decoder_grids", f"step-{step:06d}.png"))
            decoder.train()

    done = train(decoder, latents, tokens, paths, rank, world, dev, show_progress)
    if done and rank == 0:
        decoder.eval()
        train_minutes = (time.time() - t0) / 60
        originals, decodings = reconstruct(vis, tokens, val_paths)
        final_grid = grid(originals[:decoder_grid_images], decodings[:decoder_grid_images])
        save_atomically(lambda tmp: (decoder.save_pretrained(tmp), final_grid.save(os.path.join(tmp, "grid.png"))),
                        stage_dir)
        report = {"minutes": (time.time() - t0) / 60, "train_minutes": train_minutes, "train_images": len(paths),
                  "val_images": len(val_paths), "sample_steps": decoder_sample_steps, "guidance": decoder_guidance,
                  "grid": os.path.join(stage_dir, "grid.png")}
        scored = names_toy_scenes(val_samples) if decoder_score_scenes is None else decoder_score_scenes
        report["scene_agreement"] = scene_agreement(originals, decodings) if scored else \
            "not scored: the toy world's scene reader reads only data that names toy scenes (decoder_score_scenes)"
        json.dump(report, open(os.path.join(out_dir, "logs", "decoder_report.json"), "w"), indent=1)
        print(json.dumps(report, indent=1))
        shutil.rmtree(ckpt, ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
