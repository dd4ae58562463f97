"""Shared fixtures: a micro toy world, micro stand-ins and their token cache, made once per test session by the real
scripts (toy/toyworld.py, toy/pretrain_tiny.py, encode.py) at micro sizes; and a run of untrained micro models over
them."""
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import TokenCache  # noqa: E402
from configurator import script_args  # noqa: E402  (the project's modules, once ROOT is on the path)
from model import MetaMorph  # noqa: E402
from visualizer import Decoder  # noqa: E402

MICRO_WORLD = ["--toy_train={'caption': 16, 'image_qa': 24, 'video_qa': 4, 'generation': 16, 'image_edit': 8, "
               "'video_prediction': 4, 'visual_thinking': 8}",
               "--toy_val={'caption': 4, 'image_qa': 8, 'video_qa': 2, 'generation': 4, 'image_edit': 2, "
               "'video_prediction': 2, 'visual_thinking': 2}", "--toy_heldout_val=4", "--toy_corpus_captions=50",
               "--toy_text={'scene_qa': 20, 'video_qa': 4, 'keyed_copy': 4, 'repeat': 4, 'facts': 4, 'riddle': 4, "
               "'grid_qa': 4, 'grid_caption': 2, 'grid_draw': 4}",
               "--toy_text_val={'scene_qa': 4, 'video_qa': 2, 'keyed_copy': 2, 'grid_qa': 2, 'grid_draw': 2}"]
MICRO_MODELS = ["--siglip_width=32", "--siglip_layers=1", "--siglip_steps=3", "--siglip_batch=8", "--vocab_size=300",
                "--llm_width=48", "--llm_layers=1", "--llm_heads=2", "--llm_block=32", "--llm_steps=3",
                "--llm_batch=4", "--llm_eval_interval=2", "--llm_copy_steps=1", "--vae_channels=[8, 8]", "--vae_steps=3", "--vae_batch=4"]


def run(script, *args, env=None, check=True, timeout=None):
    """Run a project script (or torchrun ...) from the repo root; return the CompletedProcess. timeout: seconds, for
    runs that could hang (a collective one rank never joins)."""
    cmd = [sys.executable, *script_args(script), *args] if script.endswith(".py") else [script, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="session")
def micro(tmp_path_factory):
    """{data_dir, out_dir, args}: a micro world with micro stand-ins and a token cache; args point a stage at them."""
    root = tmp_path_factory.mktemp("micro")
    data_dir, out_dir = str(root / "world"), str(root / "out")
    base = f"{out_dir}/base"
    paths = [f"--siglip_path={base}/siglip", f"--llm_path={base}/llm", f"--vae_path={base}/vae"]
    run("toy/toyworld.py", f"--data_dir={data_dir}", *MICRO_WORLD)
    run("toy/pretrain_tiny.py", f"--data_dir={data_dir}", *paths, *MICRO_MODELS)
    run("encode.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", paths[0])
    return {"data_dir": data_dir, "out_dir": out_dir, "base": base,
            "args": [f"--data_dir={data_dir}", f"--out_dir={out_dir}", paths[1]]}


MICRO_UNET = dict(sample_size=16, block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16,
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)


@pytest.fixture(scope="session")
def micro_run(micro, tmp_path_factory):
    """{out, args}: an out_dir holding an untrained micro VPiT model, a micro decoder and (a link to) the micro
    token cache; args point sample.py or eval.py at it."""
    out = tmp_path_factory.mktemp("sample_run")
    dim = TokenCache(f"{micro['out_dir']}/tokens").dim
    torch.manual_seed(0)
    MetaMorph.from_llm(f"{micro['base']}/llm", dim).save_pretrained(str(out / "vpit"))
    decoder = Decoder(UNet2DConditionModel(**MICRO_UNET), dim, 32, 77, DDPMScheduler(num_train_timesteps=1000), 64)
    decoder.save_pretrained(str(out / "decoder"))
    os.symlink(f"{micro['out_dir']}/tokens", out / "tokens")
    args = [f"--out_dir={out}", f"--siglip_path={micro['base']}/siglip", f"--vae_path={micro['base']}/vae",
            "--decoder_sample_steps=2"]
    return {"out": str(out), "args": args}
