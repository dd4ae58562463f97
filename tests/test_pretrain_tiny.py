"""Smoke test of pretrain_tiny.py at micro sizes (the session's `micro` fixture ran the real script): the real save
formats, loaded back the real way."""
import json
import os

import torch

from conftest import MICRO_MODELS, run
from toy import scenes, tasks


def test_stand_ins_train_save_and_load_in_real_formats(micro):
    from diffusers import AutoencoderKL
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipModel

    base = micro["base"]
    report = json.load(open(f"{base}/pretrain_report.json"))
    by_type = [key.split("/") for key in report if "/" in key]  # per type of first question
    assert {task for task, _ in by_type} == {"llm_text_scene_qa", "llm_text_grid_qa"}
    assert {qtype for _, qtype in by_type} <= set(tasks.QA_TYPES)
    report = {key: value for key, value in report.items() if "/" not in key}
    assert set(report) == {"llm_val_perplexity", "llm_fact_recall", "llm_text_scene_qa", "llm_text_video_qa",
                           "llm_text_keyed_copy", "llm_text_grid_qa", "llm_text_grid_draw",
                           "siglip_toy_retrieval_top1_of_32", "siglip_wide_retrieval_top1_of_32",
                           "vae_toy_val_psnr_db", "vae_wide_val_psnr_db", "vae_toy_val_objects_read_back"}
    assert not any(os.path.exists(f"{base}/{p}.tmp") for p in ("siglip", "llm", "vae"))

    tokenizer = AutoTokenizer.from_pretrained(f"{base}/llm")
    llm = AutoModelForCausalLM.from_pretrained(f"{base}/llm")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.config.vocab_size == len(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    assert llm(torch.tensor([tokenizer("a red circle")["input_ids"]])).logits.shape[-1] == len(tokenizer)
    grid = "".join(scenes.SLOT_WORDS)  # a grid's slot is one token, and it decodes back whole
    assert len(tokenizer(grid)["input_ids"]) == len(scenes.SLOT_WORDS)
    assert tokenizer.decode(tokenizer(grid)["input_ids"]) == grid

    siglip = SiglipModel.from_pretrained(f"{base}/siglip")
    processor = AutoImageProcessor.from_pretrained(f"{base}/siglip")
    grid = siglip.config.vision_config.image_size // siglip.config.vision_config.patch_size
    assert grid == 16 and processor.size["height"] == 64
    assert siglip.logit_bias.item() < -5  # SigLIP's init (b = -10), not HF's 0

    vae = AutoencoderKL.from_pretrained(f"{base}/vae")
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 32, 32) and vae.config.scaling_factor != 0.18215  # measured, not SD's constant


def test_objects_read_back_scores_the_round_trip_with_the_scene_reader(micro, monkeypatch):
    from types import SimpleNamespace

    from toy import pretrain_tiny

    monkeypatch.setattr(pretrain_tiny, "data_dir", micro["data_dir"])
    perfect = lambda pixels, sample_posterior: SimpleNamespace(sample=pixels)
    blank = lambda pixels, sample_posterior: SimpleNamespace(sample=torch.ones_like(pixels))  # all white
    for vae, expected in [(perfect, 1.0), (blank, 0.0)]:
        vae.eval = lambda: None
        assert pretrain_tiny.objects_read_back(vae, n=8) == expected


def test_second_run_trains_nothing_and_measures_again(micro):
    base = micro["base"]
    report = json.load(open(f"{base}/pretrain_report.json"))
    again = run("toy/pretrain_tiny.py", f"--data_dir={micro['data_dir']}", f"--siglip_path={base}/siglip",
                f"--llm_path={base}/llm", f"--vae_path={base}/vae", *MICRO_MODELS)
    assert "stand-in:" not in again.stderr  # no progress bar: nothing trained
    assert json.load(open(f"{base}/pretrain_report.json")) == report


def test_packing_keeps_documents_whole_and_targets_only_replies():
    import random

    from toy import pretrain_tiny
    docs = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6] * 7, [-100] * 6 + [6])]
    ids, labels = pretrain_tiny.pack(docs, 8, 0, random.Random(0))
    assert ids.shape[1] == 8 and ids.shape[0] >= 2
    rows = [r.tolist() for r in ids]
    for d_ids, _ in docs[:2]:  # each short document sits whole, followed by a separator, inside one block
        assert any(any(r[i:i + len(d_ids) + 1] == d_ids + [0] for i in range(8)) for r in rows)
    assert (labels[ids == 1] == -100).all() and (labels[ids == 2] == 2).all()
    assert (labels[ids == 0] == -100).all()  # the separator is never a target
    assert all(r[0] != 0 for r in rows)  # a block starts with a document, as a stage-2 sequence does


def test_wide_pictures_leave_the_toy_palette():
    import random

    import numpy as np

    from toy import scenes
    rng = random.Random(0)
    pictures = [scenes.wide_picture(rng) for _ in range(40)]
    pixels = np.concatenate([np.asarray(img).reshape(-1, 3) for img, _ in pictures])
    greys = (pixels.max(1) - pixels.min(1) < 8) & (pixels.min(1) < 230)
    assert greys.mean() > 0.05  # greys other than the toy's white background
    words = " ".join(caption for _, caption in pictures)
    assert "grey" in words and "background" in words
