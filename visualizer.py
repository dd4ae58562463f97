"""
The diffusion visualizer (PAPER.md Sec. 2.3): 64 visual tokens -> pixels. The Decoder (projector + UNet) that
train_decoder.py trains, the frozen VAE, and decode_tokens, the sampler that sample.py and eval.py share; then what
the stages do with pictures: grids to look at, and the feature spaces eval.py measures generated pictures in.

    tokens --projector--> 64 conditions --UNet (DDIM, classifier-free guidance)--> latents --VAE decoder--> pixels
"""
import json
import math
import os
import textwrap

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from configurator import MissingFile


class Decoder(nn.Module):
    """What trains: the projector (Sec. 2.3: Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm) from visual tokens to
    the UNet's cross-attention states, and the UNet. It also carries its noise schedule and pixel resolution.
    spatial_channels > 0 (configs/tiny.py only) also lays the projected tokens out as their 8x8 grid, through a
    Linear to that many channels, upsampled and stacked onto the noisy latents (the UNet has as many more input
    channels, like SD's inpainting UNet): a UNet trained from scratch in minutes cannot learn where each token goes
    through cross-attention alone, SD-1.5's pretrained one can (docs/devlog.md, "The decoder")."""

    def __init__(self, unet, token_dim, hidden, cond_len, noise_scheduler, resolution, spatial_channels=0):
        super().__init__()
        width = unet.config.cross_attention_dim
        self.unet, self.cond_len, self.noise_scheduler, self.resolution = unet, cond_len, noise_scheduler, resolution
        self.projector = nn.Sequential(nn.Linear(token_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                       nn.Linear(hidden, width), nn.LayerNorm(width))
        self.spatial = nn.Linear(width, spatial_channels) if spatial_channels else None

    def condition(self, tokens, keep=None):
        """(B, 64, d_v) -> (B, 64, width) projected tokens, zeroed where keep is False (the unconditional branch)."""
        states = self.projector(tokens)
        return states if keep is None else states * keep[:, None, None].to(states.dtype)

    def forward(self, noisy_latents, timesteps, tokens, keep=None):
        states = self.condition(tokens, keep)
        if self.spatial is not None:
            side = math.isqrt(states.shape[1])
            grid = self.spatial(states).transpose(1, 2).reshape(len(states), -1, side, side)
            noisy_latents = torch.cat([noisy_latents, F.interpolate(grid, size=noisy_latents.shape[-2:])], 1)
        padded = F.pad(states, (0, 0, 0, self.cond_len - states.shape[1]))  # zero rows up to CLIP's 77
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=padded).sample

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.unet.save_pretrained(os.path.join(path, "unet"))
        self.noise_scheduler.save_pretrained(os.path.join(path, "scheduler"))
        save_file({k: v for k, v in self.state_dict().items() if not k.startswith("unet.")},
                  os.path.join(path, "projector.safetensors"))
        meta = {"token_dim": self.projector[0].in_features, "projector_hidden": self.projector[0].out_features,
                "cond_len": self.cond_len, "resolution": self.resolution}
        json.dump(meta, open(os.path.join(path, "decoder.json"), "w"), indent=1)

    @classmethod
    def from_pretrained(cls, path):
        meta = json.load(open(os.path.join(path, "decoder.json")))
        unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"))
        decoder = cls(unet, meta["token_dim"], meta["projector_hidden"], meta["cond_len"],
                      DDPMScheduler.from_pretrained(os.path.join(path, "scheduler")), meta["resolution"],
                      unet.config.in_channels - unet.config.out_channels)  # the spatial map's channels
        missing, unexpected = decoder.load_state_dict(load_file(os.path.join(path, "projector.safetensors")),
                                                      strict=False)
        assert not unexpected and all(k.startswith("unet.") for k in missing), (missing, unexpected)
        return decoder


def load_vae(path):
    if not os.path.isdir(path):
        raise MissingFile(f"VAE not found at {path}: make the toy stand-in: `python -m toy.pretrain_tiny`, or "
                          "point vae_path at Stable Diffusion 1.5's vae/ folder")
    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


# ---- decoding tokens to pictures -------------------------------------------------------------------------------------
class Visualizer:
    def __init__(self, decoder, vae, device):
        self.decoder, self.vae, self.device = decoder, vae, torch.device(device)
        self.latent_side = decoder.resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def load_visualizer(decoder_dir, vae_path, device="cpu"):
    """The trained decoder (out_dir/decoder) and the frozen VAE, ready for decode_tokens."""
    if not os.path.exists(os.path.join(decoder_dir, "decoder.json")):
        raise MissingFile(f"no trained diffusion decoder at {decoder_dir}: train it with "
                          "`python train_decoder.py` (with the same config)")
    return Visualizer(Decoder.from_pretrained(decoder_dir).to(device).eval(), load_vae(vae_path).to(device), device)


@torch.no_grad()
def decode_tokens(vis, tokens, steps=25, guidance=1.5, seed=0, batch_size=64):
    """(B, 64, d_v) visual tokens -> B RGB PIL images: DDIM (eta 0) with classifier-free guidance, the all-zero
    condition being the unconditional branch (App. A.2). Image i's starting noise depends only on seed and i, so the
    images do not depend on batch_size."""
    side = vis.latent_side
    noise = torch.randn((len(tokens), vis.vae.config.latent_channels, side, side),
                        generator=torch.Generator().manual_seed(seed))
    scheduler = DDIMScheduler.from_config(vis.decoder.noise_scheduler.config)
    scheduler.set_timesteps(steps)
    images = []
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size].to(vis.device, torch.float32)
        both, keep = torch.cat([batch, batch]), torch.arange(2 * len(batch), device=vis.device) >= len(batch)
        x = noise[i:i + batch_size].to(vis.device)
        for t in scheduler.timesteps:
            uncond, cond = vis.decoder(torch.cat([x, x]), t.expand(len(both)), both, keep).chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample  # any prediction type
        images += to_images(vis.vae.decode(x / vis.vae.config.scaling_factor).sample)
    return images


def to_images(pixels):
    """A VAE's output, (B, 3, H, W) in [-1, 1] -> B RGB PIL images."""
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


# ---- pictures side by side -------------------------------------------------------------------------------------------
def grid(originals, decodings, per_row=8):
    """Rows of originals, each with a row of their decodings under it."""
    s = originals[0].size[0]
    rows = math.ceil(len(originals) / per_row)
    canvas = Image.new("RGB", (s * min(per_row, len(originals)), 2 * s * rows), "white")
    for i, (a, b) in enumerate(zip(originals, decodings)):
        x, y = s * (i % per_row), 2 * s * (i // per_row)
        canvas.paste(a, (x, y))
        canvas.paste(b, (x, y + s))
    return canvas


def save_grid(rows, path, size, scale=2):
    """One row per prompt: the real picture, the one decoded from its true tokens, the model's, each shown at size x
    scale pixels; then the prompt."""
    side, text_width = size * scale, 560
    grid = Image.new("RGB", (3 * (side + 4) + text_width, 20 + len(rows) * (side + 4)), "white")
    draw = ImageDraw.Draw(grid)
    for k, title in enumerate(["real", "true tokens", "model"]):
        draw.text((k * (side + 4) + 4, 4), title, fill="black")
    for r, (prompt, *pictures) in enumerate(rows):
        y = 20 + r * (side + 4)
        for k, picture in enumerate(pictures):
            grid.paste(picture.resize((side, side), Image.NEAREST), (k * (side + 4), y))
        draw.multiline_text((3 * (side + 4) + 4, y + 8), "\n".join(textwrap.wrap(prompt, 80)[:6]), fill="black")
    grid.save(path)


# ---- the feature spaces generated pictures are measured in (eval.py) -------------------------------------------------
def frechet_distance(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (N, d):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 via symmetric eigendecompositions."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


def text_image_model(path, dev):
    """(model, tokenizer, image processor) of a local CLIP or SigLIP folder: both give normalized image_embeds and
    text_embeds."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return (AutoModel.from_pretrained(path).eval().to(dev), AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path))


def in_chunks(features, pictures, size=64):
    """features(chunk) of pictures, size at a time, concatenated."""
    return torch.cat([features(pictures[i:i + size]) for i in range(0, len(pictures), size)])


class Judges:
    """The feature spaces generated pictures are measured in: SigLIP (always), Inception and CLIP (when local weights
    are configured)."""

    def __init__(self, tower, processor, dev, siglip_path, clip_path="", inception_path=""):
        self.tower, self.processor, self.dev = tower, processor, dev
        self.siglip = text_image_model(siglip_path, dev)
        self.clip = text_image_model(clip_path, dev) if clip_path else None
        self.inception = torch.jit.load(inception_path).eval().to(dev) if inception_path else None

    @torch.no_grad()
    def pooled(self, pictures):
        pixels = lambda chunk: self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.dev)
        return in_chunks(lambda chunk: self.tower(pixels(chunk)).pooler_output.cpu(), pictures)

    @torch.no_grad()
    def inception_features(self, pictures):  # the TorchScript detector of StyleGAN-ADA's metrics takes uint8 NCHW
        """Inception features of pictures of any sizes: each resized to the detector's 299 x 299, 64 at a time."""
        pixels = lambda chunk: torch.tensor(np.stack([np.asarray(p.convert("RGB").resize((299, 299), Image.BICUBIC))
                                                      for p in chunk])).permute(0, 3, 1, 2).to(self.dev)
        return in_chunks(lambda chunk: self.inception(pixels(chunk), return_features=True).cpu(), pictures)

    @torch.no_grad()
    def text_score(self, judge, pictures, prompts):
        """100 x max(cos(image embedding, text embedding), 0), averaged: the CLIP score (CLIP) or its analogue."""
        model, tokenizer, processor = judge
        scores = []
        for i in range(0, len(pictures), 64):
            text = tokenizer(prompts[i:i + 64], padding="max_length", truncation=True,
                             max_length=min(tokenizer.model_max_length, 77), return_tensors="pt").to(self.dev)
            pixels = processor(images=pictures[i:i + 64], return_tensors="pt")["pixel_values"].to(self.dev)
            out = model(input_ids=text["input_ids"], pixel_values=pixels)
            scores.append(100 * F.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0).cpu())
        return float(torch.cat(scores).mean())

    def metrics(self, pictures, real, texts):
        """Frechet distances of the pictures to the real ones, text-image scores against their texts; None (n/a) where
        there are too few pictures: a score needs one, a Frechet distance two (a covariance)."""
        distance = lambda features: frechet_distance(features(pictures), features(real)) if len(pictures) > 1 else None
        score = lambda judge: self.text_score(judge, pictures, texts) if pictures else None
        out = {"fd_siglip": distance(self.pooled), "siglip_score": score(self.siglip)}
        if self.inception is not None:
            out["fid"] = distance(self.inception_features)
        if self.clip is not None:
            out["clip_score"] = score(self.clip)
        return out
