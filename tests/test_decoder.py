"""train_decoder.py: the App. A.2 schedule, the projector, condition dropout, resume, one step of an SD-1.5-shaped
UNet, the shared sampler, and the scene-agreement score (only on data that names toy scenes), at micro size."""
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

from toy import scenes
from conftest import run
from data import read_jsonl
from visualizer import Decoder, decode_tokens, load_visualizer
from toy.scenes import scene_agreement
from train_decoder import decoder_lr, lr_factor, training_noise, training_target

MICRO_UNET = ("--decoder_unet={'sample_size': 32, 'block_out_channels': (16, 16), 'layers_per_block': 1, "
              "'down_block_types': ('CrossAttnDownBlock2D', 'DownBlock2D'), 'up_block_types': ('UpBlock2D', "
              "'CrossAttnUpBlock2D'), 'cross_attention_dim': 16, 'attention_head_dim': 2, 'norm_num_groups': 8}")
MICRO = [MICRO_UNET, "--decoder_projector_hidden=32", "--decoder_val={'generation': 4}", "--decoder_warmup_steps=2",
         "--decoder_decay_steps=2", "--decoder_batch_size=8", "--decoder_micro_batch_size=4", "--decoder_sample_steps=2",
         "--decoder_grid_images=4", "--decoder_grid_interval=2", "--ckpt_interval=2"]


def fresh_out(micro, tmp_path, name):
    """A new out_dir that shares the micro run's token cache."""
    out = tmp_path / name
    out.mkdir()
    os.symlink(os.path.join(micro["out_dir"], "tokens"), out / "tokens")
    return str(out)


def train(micro, out, *args):
    return run("train_decoder.py", f"--data_dir={micro['data_dir']}", f"--out_dir={out}",
               f"--vae_path={micro['base']}/vae", *MICRO, *args)


def curve(out):
    return [json.loads(line) for line in open(os.path.join(out, "logs", "decoder.jsonl"))]


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory):
    out = fresh_out(micro, tmp_path_factory.mktemp("decoder"), "whole")
    train(micro, out)
    return out


def sd15_shaped_unet():
    """SD-1.5's layout (block types, 2 layers per block, cross-attention width 768), with micro channels."""
    return UNet2DConditionModel(sample_size=32, block_out_channels=(8, 8, 16, 16), layers_per_block=2,
                                cross_attention_dim=768, attention_head_dim=2, norm_num_groups=8)


def test_schedule_log_warmup_then_linear_decay():
    W, D = 100, 200
    assert lr_factor(0, W, D) == 0
    assert lr_factor(W // 2, W, D) == pytest.approx(math.log(1 + W / 2) / math.log(1 + W))
    assert lr_factor(W // 2, W, D) > 0.8  # logarithmic, not linear: most of the way up at half the warm-up
    assert lr_factor(W, W, D) == 1
    assert lr_factor(W + D // 2, W, D) == pytest.approx(0.5)
    assert lr_factor(W + D, W, D) == 0 and lr_factor(W + D + 50, W, D) == 0
    assert all(lr_factor(s, W, D) < lr_factor(s + 1, W, D) for s in range(W))


def test_projector_shapes_and_dropped_condition():
    torch.manual_seed(0)
    decoder = Decoder(sd15_shaped_unet(), 1152, 2048, 77, None, 256)
    shapes = [tuple(p.shape) for p in decoder.projector.parameters()]
    assert shapes == [(2048, 1152), (2048,), (2048,), (2048,), (768, 2048), (768,), (768,), (768,)]
    assert [type(m).__name__ for m in decoder.projector] == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm"]
    states = decoder.condition(torch.randn(3, 64, 1152), keep=torch.tensor([True, False, True]))
    assert states.shape == (3, 64, 768)
    assert states[1].abs().sum() == 0 and (states[[0, 2]].abs().sum(-1) > 0).all()  # the dropped one is zero


def test_spatial_map_puts_each_token_on_its_own_cell():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4 + 3, out_channels=4, block_out_channels=(8, 8),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=4,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, layers_per_block=1)
    decoder = Decoder(unet, 5, 16, 77, None, 64, spatial_channels=3)
    seen = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[0], kwargs["encoder_hidden_states"])),
                                   with_kwargs=True)
    tokens, latents = torch.randn(1, 64, 5), torch.randn(1, 4, 16, 16)
    moved = tokens.clone()
    moved[0, 8 * 2 + 5] += 1  # the token of grid row 2, column 5
    decoder(latents, torch.tensor([10]), tokens)
    decoder(latents, torch.tensor([10]), moved)
    (a, states), (b, _) = seen
    assert a.shape == (1, 7, 16, 16) and torch.equal(a[:, :4], latents) and states.shape == (1, 77, 8)
    changed = (a[0, 4:] != b[0, 4:]).any(0)  # latent pixels whose spatial condition changed: the 2x2 of that cell
    assert changed.nonzero().tolist() == [[4, 10], [4, 11], [5, 10], [5, 11]]


def test_training_target_follows_the_scheduler_config():
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    target = lambda kind: training_target(DDPMScheduler(prediction_type=kind), x0, noise, t)
    assert torch.equal(target("epsilon"), noise) and torch.equal(target("sample"), x0)
    ab = DDPMScheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target("v_prediction"), ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6)


def test_condition_drop_rate_is_measured_at_the_configured_probability():
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.1, 0.7):
        _, t, keep = training_noise((20000, 1, 1, 1), 1000, p, g)
        assert 1 - keep.float().mean().item() == pytest.approx(p, abs=0.015)
        assert t.min() >= 0 and t.max() < 1000


def test_trains_saves_report_and_grids(trained):
    assert sorted(os.listdir(os.path.join(trained, "decoder"))) == \
        ["decoder.json", "grid.png", "projector.safetensors", "scheduler", "unet"]
    assert not os.path.exists(os.path.join(trained, "ckpt", "decoder"))
    report = json.load(open(os.path.join(trained, "logs", "decoder_report.json")))
    assert report["val_images"] == 4 and report["scene_agreement"]["objects"] > 0
    assert sorted(os.listdir(os.path.join(trained, "logs", "decoder_grids"))) == ["step-000002.png", "step-000004.png"]
    assert [r["step"] for r in curve(trained)] == [1, 2, 3, 4]
    # each step logs the lr it trained with: the first step of the log warm-up trains at 0
    assert [r["lr"] for r in curve(trained)] == pytest.approx([decoder_lr * lr_factor(s, 2, 2) for s in range(4)])


def test_interrupt_and_resume_reproduces_the_run(micro, trained, tmp_path):
    broken = fresh_out(micro, tmp_path, "broken")
    train(micro, broken, "--stop_after=2")
    assert not os.path.exists(os.path.join(broken, "decoder")) and len(curve(broken)) == 2
    assert "resumed from" in train(micro, broken).stdout
    assert curve(broken) == [{**a, "images_per_s": b["images_per_s"]} for a, b in zip(curve(trained), curve(broken))]
    whole, resumed = (load_file(os.path.join(out, "decoder", "unet", "diffusion_pytorch_model.safetensors"))
                      for out in (trained, broken))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_one_step_on_an_sd15_shaped_unet(micro, tmp_path):
    sd = tmp_path / "sd"
    sd15_shaped_unet().save_pretrained(sd / "unet")
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(sd / "scheduler")
    out = fresh_out(micro, tmp_path, "out")
    train(micro, out, f"--sd_path={sd}", "--decoder_spatial_channels=0", "--decoder_projector_hidden=2048",
          "--decoder_warmup_steps=0", "--decoder_decay_steps=1")
    before = load_file(sd / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(os.path.join(out, "decoder", "unet", "diffusion_pytorch_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    config = json.load(open(os.path.join(out, "decoder", "unet", "config.json")))
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["cross_attention_dim"] == 768
    projector = load_file(os.path.join(out, "decoder", "projector.safetensors"))
    assert sorted(projector) == [f"projector.{i}.{w}" for i in (0, 1, 3, 4) for w in ("bias", "weight")]
    assert projector["projector.0.weight"].shape == (2048, 32) and projector["projector.3.weight"].shape == (768, 2048)
    assert json.load(open(os.path.join(out, "decoder", "scheduler", "scheduler_config.json")))["beta_end"] == 0.012


def test_sampler_is_deterministic_for_a_seed_and_batch_independent(micro, trained):
    vis = load_visualizer(os.path.join(trained, "decoder"), f"{micro['base']}/vae")
    tokens = torch.nn.functional.normalize(torch.randn(3, 64, 32), dim=-1).half()
    a = decode_tokens(vis, tokens, steps=3, guidance=3.0, seed=0, batch_size=3)
    assert len(a) == 3 and all(im.mode == "RGB" and im.size == (64, 64) for im in a)
    arrays = lambda images: np.stack([np.asarray(im, dtype=np.int16) for im in images])
    assert np.array_equal(arrays(a), arrays(decode_tokens(vis, tokens, steps=3, guidance=3.0, seed=0, batch_size=3)))
    assert np.abs(arrays(a) - arrays(decode_tokens(vis, tokens, steps=3, guidance=3.0, seed=0, batch_size=1))).max() <= 1
    assert not np.array_equal(arrays(a), arrays(decode_tokens(vis, tokens, steps=3, seed=1, batch_size=3)))


def test_load_visualizer_without_a_trained_decoder_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python train_decoder.py"):
        load_visualizer(str(tmp_path / "decoder"), str(tmp_path / "vae"))


def test_scene_agreement_at_position_and_anywhere():
    scene = [{"shape": "circle", "colour": "red", "size": "large", "x": 11, "y": 11},
             {"shape": "square", "colour": "blue", "size": "large", "x": 53, "y": 53}]
    moved = [{**o, "x": 64 - o["x"], "y": o["y"]} for o in scene]
    original = [scenes.render(scene)]
    assert scene_agreement(original, original) == {"objects": 2, "shape_colour_at_position": 1.0,
                                                   "shape_colour_anywhere": 1.0}
    assert scene_agreement(original, [scenes.render(moved)])["shape_colour_at_position"] == 0
    assert scene_agreement(original, [scenes.render(moved)])["shape_colour_anywhere"] == 1
    assert scene_agreement(original, [scenes.render([])])["shape_colour_anywhere"] == 0


def test_no_scene_score_on_data_without_toy_scenes(micro, tmp_path):
    """A user's own pictures (no toy-world scenes named in the data): the toy world's scene reader does not score
    them, and the report says so (decoder_score_scenes None follows the data)."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        for task in ("caption", "generation", "image_qa"):
            rows = [{k: v for k, v in s.items() if k != "meta"}
                    for s in read_jsonl(os.path.join(micro["data_dir"], split, f"{task}.jsonl"))]
            (data / split / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.symlink(os.path.join(micro["data_dir"], "images"), data / "images")
    out = fresh_out(micro, tmp_path, "own")
    printed = train(micro, out, f"--data_dir={data}", "--decoder_warmup_steps=0", "--decoder_decay_steps=1").stdout
    report = json.load(open(os.path.join(out, "logs", "decoder_report.json")))
    assert report["scene_agreement"].startswith("not scored") and "shape_colour" not in printed
