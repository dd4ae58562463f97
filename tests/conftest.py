"""Shared fixtures: a micro toy world, micro stand-ins and their token cache, made once per test session by the real
scripts (toyworld.py, pretrain_tiny.py, encode.py) at micro sizes."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MICRO_WORLD = ["--toy_train={'caption': 16, 'image_qa': 24, 'video_qa': 4, 'generation': 16, 'image_edit': 8, "
               "'video_prediction': 4, 'visual_thinking': 8}",
               "--toy_val={'caption': 4, 'image_qa': 8, 'video_qa': 2, 'generation': 4, 'image_edit': 2, "
               "'video_prediction': 2, 'visual_thinking': 2}", "--toy_heldout_val=4", "--toy_corpus_captions=50"]
MICRO_MODELS = ["--siglip_width=32", "--siglip_layers=1", "--siglip_steps=3", "--siglip_batch=8", "--vocab_size=300",
                "--llm_width=48", "--llm_layers=1", "--llm_heads=2", "--llm_block=32", "--llm_steps=3",
                "--llm_batch=4", "--vae_channels=[8, 8]", "--vae_steps=3", "--vae_batch=4"]


def run(script, *args, env=None, check=True):
    """Run a project script (or torchrun ...) from the repo root; return the CompletedProcess."""
    cmd = [sys.executable, script, *args] if script.endswith(".py") else [script, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
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
    run("toyworld.py", f"--data_dir={data_dir}", *MICRO_WORLD)
    run("pretrain_tiny.py", f"--data_dir={data_dir}", *paths, *MICRO_MODELS)
    run("encode.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", paths[0])
    return {"data_dir": data_dir, "out_dir": out_dir, "base": base,
            "args": [f"--data_dir={data_dir}", f"--out_dir={out_dir}", paths[1]]}
