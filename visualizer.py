"""
The diffusion visualizer (PAPER.md Sec. 2.3): 64 visual tokens -> pixels. The Decoder (projector + UNet) that
train_decoder.py trains, the frozen VAE, and decode_tokens, the sampler that sample.py and eval.py share.

    tokens --projector--> 64 conditions --UNet (DDIM, classifier-free guidance)--> latents --VAE decoder--> pixels
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file


class Decoder(nn.Module):
    """What trains: the projector (Sec. 2.3: Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm) from visual tokens to
    the UNet's cross-attention states, and the UNet. It also carries its noise schedule and pixel resolution.
    spatial_channels > 0 (configs/tiny.py only) also lays the projected tokens out as their 8x8 grid, through a
    Linear to that many channels, upsampled and stacked onto the noisy latents (the UNet has as many more input
    channels, like SD's inpainting UNet): a UNet trained from scratch in minutes cannot learn where each token goes
    through cross-attention alone, SD-1.5's pretrained one can (see README, "The decoder")."""

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
        raise FileNotFoundError(f"VAE not found at {path}: make the toy stand-in with `python pretrain_tiny.py`, or "
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
        raise FileNotFoundError(f"no trained diffusion decoder at {decoder_dir}: train it with "
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
        pixels = vis.vae.decode(x / vis.vae.config.scaling_factor).sample
        pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images += [Image.fromarray(p) for p in pixels]
    return images
