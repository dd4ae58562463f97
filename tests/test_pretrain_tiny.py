"""Smoke test of pretrain_tiny.py at micro sizes (the session's `micro` fixture ran the real script): the real save
formats, loaded back the real way."""
import json
import os

import torch

from conftest import MICRO_MODELS, run


def test_stand_ins_train_save_and_load_in_real_formats(micro):
    from diffusers import AutoencoderKL
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipModel

    base = micro["base"]
    report = json.load(open(f"{base}/pretrain_report.json"))
    assert set(report) == {"llm_val_perplexity", "llm_fact_recall", "siglip_retrieval_top1_of_32", "vae_val_psnr_db"}
    assert not any(os.path.exists(f"{base}/{p}.tmp") for p in ("siglip", "llm", "vae"))

    tokenizer = AutoTokenizer.from_pretrained(f"{base}/llm")
    llm = AutoModelForCausalLM.from_pretrained(f"{base}/llm")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    assert llm(torch.tensor([tokenizer("a red circle")["input_ids"]])).logits.shape[-1] == len(tokenizer)

    siglip = SiglipModel.from_pretrained(f"{base}/siglip")
    processor = AutoImageProcessor.from_pretrained(f"{base}/siglip")
    grid = siglip.config.vision_config.image_size // siglip.config.vision_config.patch_size
    assert grid == 16 and processor.size["height"] == 64
    assert siglip.logit_bias.item() < -5  # SigLIP's init (b = -10), not HF's 0

    vae = AutoencoderKL.from_pretrained(f"{base}/vae")
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32) and vae.config.scaling_factor != 0.18215  # measured, not SD's constant


def test_second_run_trains_nothing_and_measures_again(micro):
    base = micro["base"]
    report = json.load(open(f"{base}/pretrain_report.json"))
    again = run("pretrain_tiny.py", f"--data_dir={micro['data_dir']}", f"--siglip_path={base}/siglip",
                f"--llm_path={base}/llm", f"--vae_path={base}/vae", *MICRO_MODELS)
    assert "stand-in:" not in again.stderr  # no progress bar: nothing trained
    assert json.load(open(f"{base}/pretrain_report.json")) == report
