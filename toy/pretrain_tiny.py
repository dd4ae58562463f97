"""
Toy-scale stand-ins for the three pretrained models configs/8b.py loads from disk, saved with save_pretrained in the
real formats, so every later stage loads them exactly as it loads the real ones. The repo ships them in toy/base; this
script is how they were made (one command, about 73 min on 2 cores without AMX):

    siglip_path  a SiglipModel (64x64 input, patch 4 -> a 16x16 grid, as 384/14 -> 27x27 at full scale), sigmoid loss
    llm_path     a LlamaForCausalLM + a byte-level BPE tokenizer with a ChatML chat template, pretrained on the toy
                 world's sentences and text-only conversations (scenes in words and as grids of 64 slot words), so
                 it arrives reading its context as a real LLM does
    vae_path     a diffusers AutoencoderKL (downsampling x4 -> 16x16x4 latents)

    rm -r toy/base && python -m toy.toyworld && python -m toy.pretrain_tiny  # each part is skipped (but measured)
                                                                             # when its folder already exists
"""
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import save_atomically, wants_bf16
from model import IGNORE, build_sample
from toy import scenes, tasks
from visualizer import to_images

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
siglip_path = "toy/base/siglip"  # the shipped stand-ins: remove toy/base to make them again
llm_path = "toy/base/llm"
vae_path = "toy/base/vae"
seed = 1337
dtype = "auto"  # "auto": bf16 autocast for the SigLIP and VAE steps where the CPU has AMX bf16, else fp32
# SigLIP stand-in
siglip_width = 128
siglip_layers = 2  # shallow: patch tokens stay local (the 64 tokens must say what is where)
siglip_text_len = 48
siglip_steps = 600
siglip_batch = 64
siglip_lr = 1e-3
# LLM stand-in
vocab_size = 1024
llm_width = 128  # 4 x 128 reads its context sooner per CPU-second than 4 x 192 (docs/devlog.md)
llm_layers = 4
llm_heads = 4
llm_block = 256
llm_steps = 10000  # twice as many over the same text did not raise text-only scene_qa; this text is twice as long
llm_copy_steps = 400  # copying alone first: attention to the context forms in ~300 steps alone, not in 1,500 mixed
llm_batch = 16
llm_lr = 1e-3
llm_eval_interval = 1000  # steps between text-only val scores on the progress bar
# VAE stand-in
vae_channels = [16, 32, 32]
vae_steps = 4000  # 1,000 blurred small shapes: 66% of objects read back whole after a round trip (docs/devlog.md)
vae_batch = 16
vae_lr = 1e-3
vae_kl_weight = 1e-6
wide_share = 0.25  # of SigLIP's and the VAE's training pictures: pictures beyond the toy world (scenes.wide_picture)
# ---------------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def train(params, loss_fn, steps, lr, desc, bf16=False):
    """AdamW, linear warm-up over 5% of the steps, cosine decay to 10%; loss_fn(step) -> scalar loss, under bf16
    autocast if bf16 (the weights stay fp32)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(s / steps, 1.0)))))
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def read_conversations(split, task):
    with open(os.path.join(data_dir, split, f"{task}.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---- LLM: tokenizer + LlamaForCausalLM ------------------------------------------------------------------------------
# The prior the paper relies on (Sec. 2: VPiT starts from a pretrained instruction-tuned LLM): plain sentences
# (captions, facts) and text-only conversations (text/train.jsonl: scenes in words with questions answered from the
# words, frames of a video in words, keyed copying, descriptions said back, the facts as questions, riddles said
# plainly), in the chat format stage 2 uses, with the loss on the replies as in instruction tuning.
def train_tokenizer(texts, size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens(scenes.SLOT_WORDS)  # a grid's slot is one token, as a picture's slot is one visual token
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def text_conversations(split):
    with open(os.path.join(data_dir, "text", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def documents(tokenizer, lines, conversations):
    """(ids, labels) of every document: a plain line is all target; a conversation, only its replies (build_sample,
    the tokenization stage 2 uses)."""
    docs = [(ids, ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    for c in tqdm(conversations, desc="tokenizing conversations", mininterval=5):
        sample = build_sample(tokenizer, c["conversations"], 0)
        docs.append((sample["input_ids"].tolist(), sample["labels"].tolist()))
    return docs


def pack(docs, block, bos, rng):
    """Documents in a random order, each followed by a separator, packed whole into (n, block) blocks (one longer than
    a block is cut); (input_ids, labels) with the unused tail padded and ignored. A block starts as a stage-2 sequence
    does, with its first document's first token."""
    blocks, ids, labels = [], [], []
    padded = lambda ids, labels: (ids + [bos] * (block - len(ids)), labels + [IGNORE] * (block - len(ids)))
    for i in rng.sample(range(len(docs)), len(docs)):
        d_ids, d_labels = docs[i][0][:block - 1] + [bos], docs[i][1][:block - 1] + [IGNORE]
        if len(ids) + len(d_ids) > block:
            blocks.append(padded(ids, labels))
            ids, labels = [], []
        ids, labels = ids + d_ids, labels + d_labels
    blocks.append(padded(ids, labels))
    ids_t, labels_t = zip(*blocks)
    return torch.tensor(ids_t), torch.tensor(labels_t)


@torch.no_grad()
def fact_recall(model, tokenizer):
    """Fraction of tasks.facts() the model completes greedily and exactly ("a lime is" -> "green")."""
    model.eval()
    right = 0
    for prompt, answer in tasks.facts():
        ids = [tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]
        want = tokenizer(" " + answer + ".")["input_ids"]
        for _ in range(len(want)):
            ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
        right += tokenizer.decode(ids[-len(want):]).strip() == answer + "."
    return right / len(tasks.facts())


@torch.no_grad()
def text_accuracy(model, tokenizer, conversations, limit=None):
    """Per task of the val conversations: the fraction of first replies the model gives greedily and exactly, from
    the words alone (scene_qa is the skill image_qa needs, before any image is seen); and, unless limited (the probes
    during training), as "<task>/<type>" per type of first question where one is recorded (meta.qtype: image_qa's)."""
    model.eval()
    right, total = {}, {}
    for c in conversations:
        if limit and total.get(c["task"], 0) >= limit:
            continue
        prompt = build_sample(tokenizer, c["conversations"][:1], 0, add_generation_prompt=True)["input_ids"]
        out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=80,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()
        qtype = c.get("meta", {}).get("qtype")
        for key in [c["task"]] + ([f"{c['task']}/{qtype}"] if qtype and not limit else []):
            right[key] = right.get(key, 0) + (reply == c["conversations"][1]["value"])
            total[key] = total.get(key, 0) + 1
    return {key: right[key] / total[key] for key in sorted(total)}


@torch.no_grad()
def perplexity(model, tokenizer, lines):
    model.eval()
    ids = [i for line in lines for i in [tokenizer.bos_token_id] + tokenizer(line)["input_ids"]]
    blocks = torch.tensor(ids[: len(ids) // llm_block * llm_block]).view(-1, llm_block)
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
    return math.exp(sum(losses) / len(losses))


def pretrain_llm():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    val = text_conversations("val")
    if not os.path.exists(llm_path):
        lines = open(os.path.join(data_dir, "corpus.txt")).read().splitlines()
        conversations = text_conversations("train")
        tokenizer = train_tokenizer(lines + [t["value"] for c in conversations for t in c["conversations"]] +
                                    ["user", "assistant", "system"], vocab_size)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=llm_width, intermediate_size=llm_width * 8 // 3,
                             num_hidden_layers=llm_layers, num_attention_heads=llm_heads, num_key_value_heads=llm_heads,
                             max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        docs = documents(tokenizer, lines, conversations)
        rng = random.Random(f"{seed}-llm")
        everything = pack(docs, llm_block, tokenizer.bos_token_id, rng)
        copying = pack([d for d, c in zip(docs[len(lines):], conversations) if c["task"] == "repeat"], llm_block,
                       tokenizer.bos_token_id, rng)
        print(f"LLM stand-in: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"vocab {len(tokenizer)}, {len(docs)} documents in {len(everything[0])} blocks of {llm_block} "
              f"({(everything[1] != IGNORE).sum().item() / 1e6:.1f}M target tokens)")

        def loss_fn(step):
            if step and step % llm_eval_interval == 0:
                tqdm.write(f"step {step}: text-only val first replies {text_accuracy(model, tokenizer, val, 32)}")
            model.train()
            ids, labels = copying if step < llm_copy_steps else everything
            i = torch.randint(len(ids), (llm_batch,))
            return model(input_ids=ids[i], labels=labels[i]).loss

        train(list(model.parameters()), loss_fn, llm_steps, llm_lr, "LLM stand-in")
        save_atomically(lambda p: (model.save_pretrained(p), tokenizer.save_pretrained(p)), llm_path)
    model, tokenizer = LlamaForCausalLM.from_pretrained(llm_path), AutoTokenizer.from_pretrained(llm_path)
    val_text = [c["conversations"][1]["value"] for c in read_conversations("val", "caption")]
    return {"llm_val_perplexity": perplexity(model, tokenizer, val_text),
            "llm_fact_recall": fact_recall(model, tokenizer),
            **{f"llm_text_{task}": acc for task, acc in text_accuracy(model, tokenizer, val).items()}}


# ---- SigLIP: sigmoid loss on caption pairs --------------------------------------------------------------------------
def caption_pairs(rng, n):
    """n (picture, caption) pairs: toy train scenes, and a wide_share of wide pictures."""
    wide = [scenes.wide_picture(rng) for _ in range(round(n * wide_share))]
    toy = [scenes.split_scene(rng, "train") for _ in range(n - len(wide))]
    return [scenes.render(s) for s in toy] + [img for img, _ in wide], \
        [tasks.caption(rng, s) for s in toy] + [text for _, text in wide]


def embed(model, tokenizer, processor, images, texts):
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=siglip_text_len,
                    return_tensors="pt")["input_ids"]
    return model(input_ids=ids, pixel_values=pixels, return_loss=True)


def val_pairs():
    """(pictures, captions) of the toy world's val captions, and of wide pictures never trained on."""
    toy = [(Image.open(os.path.join(data_dir, c["images"][0])).convert("RGB"), c["conversations"][1]["value"])
           for c in read_conversations("val", "caption")]
    rng = random.Random(f"{seed}-wide-val")
    return {"toy": toy, "wide": [scenes.wide_picture(rng) for _ in range(len(toy))]}


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, processor, pairs, candidates=32):
    """Caption -> picture top-1 among groups of `candidates` pictures with distinct captions."""
    model.eval()
    seen, images, texts = set(), [], []
    for image, text in pairs:
        if text not in seen:
            seen.add(text)
            images.append(image)
            texts.append(text)
    candidates, right, total = min(candidates, len(texts)), 0, 0  # (micro worlds in tests have fewer)
    for i in range(0, len(texts) - candidates + 1, candidates):
        logits = embed(model, tokenizer, processor, images[i:i + candidates], texts[i:i + candidates]).logits_per_text
        right += (logits.argmax(-1) == torch.arange(candidates)).sum().item()
        total += candidates
    return right / total


def pretrain_siglip():
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    if not os.path.exists(siglip_path):
        tokenizer = AutoTokenizer.from_pretrained(llm_path)  # the toy world's words; any tokenizer would do
        processor = SiglipImageProcessorPil(size={"height": scenes.SIZE, "width": scenes.SIZE})
        tower = dict(hidden_size=siglip_width, intermediate_size=4 * siglip_width, num_attention_heads=4)
        config = SiglipConfig(
            text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=siglip_text_len,
                             num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **tower),
            vision_config=dict(image_size=scenes.SIZE, patch_size=4, num_hidden_layers=siglip_layers, **tower))
        model = SiglipModel(config)
        with torch.no_grad():  # SigLIP paper's init: t' = log 10, b = -10 (HF initialises both to 0)
            model.logit_scale.fill_(math.log(10))
            model.logit_bias.fill_(-10)
            # Real SigLIP's patch tokens say where they are; this shallow stand-in keeps that only when its position
            # rows start as strong as its patch rows (std 1, not HF's 1/sqrt(width)): a linear probe then reads a
            # token's grid cell from its value 99% of the time instead of 12%, which the decoder's cross-attention needs.
            model.vision_model.embeddings.position_embedding.weight.normal_(std=1.0)
        rng = random.Random(f"{seed}-siglip")

        def loss_fn(step):
            model.train()
            return embed(model, tokenizer, processor, *caption_pairs(rng, siglip_batch)).loss

        train(list(model.parameters()), loss_fn, siglip_steps, siglip_lr, "SigLIP stand-in",
              bf16=wants_bf16(dtype, torch.device("cpu"), cpu="amx"))
        tokenizer.model_max_length = siglip_text_len
        save_atomically(lambda p: (model.save_pretrained(p), tokenizer.save_pretrained(p),
                                   processor.save_pretrained(p)), siglip_path)
    model = SiglipModel.from_pretrained(siglip_path)
    tokenizer, processor = AutoTokenizer.from_pretrained(siglip_path), SiglipImageProcessorPil.from_pretrained(siglip_path)
    return {f"siglip_{kind}_retrieval_top1_of_32": retrieval_accuracy(model, tokenizer, processor, pairs)
            for kind, pairs in val_pairs().items()}


# ---- VAE: AutoencoderKL on toy images --------------------------------------------------------------------------------
def to_pixels(images):
    arrays = np.stack([np.asarray(img.convert("RGB")) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1  # in [-1, 1]


def load_pixels(split, limit):
    """Up to `limit` images of every kind the toy world draws (scenes, video frames, zoomed crops)."""
    paths = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data_dir, "images", split)) for f in fs)
    paths = random.Random(seed).sample(paths, min(limit, len(paths)))
    return to_pixels([Image.open(p) for p in paths])


def wide_pixels(split, n):
    rng = random.Random(f"{seed}-wide-{split}")
    return to_pixels([scenes.wide_picture(rng)[0] for _ in range(n)])


@torch.no_grad()
def round_trip(vae, pixels):
    vae.eval()
    out = torch.cat([vae(pixels[i:i + 64], sample_posterior=False).sample for i in range(0, len(pixels), 64)])
    return out.clamp(-1, 1)


def psnr(vae, pixels):
    mse = ((round_trip(vae, pixels) - pixels) / 2).square().mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def objects_read_back(vae, n=200):
    """Of the objects in n val generation pictures, the share the scene reader finds whole (shape, colour and size at
    their cell) after an encode-decode round trip: the most any decoder drawing into this VAE's latents can score."""
    rows = read_conversations("val", "generation")[:n]
    pixels = to_pixels([Image.open(os.path.join(data_dir, row["images"][-1])) for row in rows])
    targets = [row["meta"]["scenes"][-1] for row in rows]
    return scenes.scene_accuracy(to_images(round_trip(vae, pixels)), targets)["object"]


def pretrain_vae():
    from diffusers import AutoencoderKL

    val = {"toy": load_pixels("val", 512), "wide": wide_pixels("val", 256)}
    if not os.path.exists(vae_path):
        n = len(vae_channels)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(vae_channels),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=scenes.SIZE,
                            mid_block_add_attention=False)
        toy = load_pixels("train", 8000)  # and a wide_share of wide pictures
        pixels = torch.cat([toy, wide_pixels("train", round(len(toy) * wide_share / (1 - wide_share)))])

        def loss_fn(step):
            vae.train()
            x = pixels[torch.randint(len(pixels), (vae_batch,))]
            posterior = vae.encode(x).latent_dist
            return F.mse_loss(vae.decode(posterior.sample()).sample, x) + vae_kl_weight * posterior.kl().mean()

        train(list(vae.parameters()), loss_fn, vae_steps, vae_lr, "VAE stand-in",
              bf16=wants_bf16(dtype, torch.device("cpu"), cpu="amx"))
        with torch.no_grad():  # latents scaled to unit variance, as SD's 0.18215 does for its VAE
            std = vae.encode(pixels[:512]).latent_dist.mean.std().item()
        vae.register_to_config(scaling_factor=1.0 / std)
        save_atomically(vae.save_pretrained, vae_path)
    vae = AutoencoderKL.from_pretrained(vae_path)
    return {**{f"vae_{kind}_val_psnr_db": psnr(vae, pixels) for kind, pixels in val.items()},
            "vae_toy_val_objects_read_back": objects_read_back(vae)}


def main():
    torch.manual_seed(seed)
    results = {}
    for name, part in [("LLM", pretrain_llm), ("SigLIP", pretrain_siglip), ("VAE", pretrain_vae)]:
        t0 = time.time()
        results.update(part())
        print(f"{name} stand-in ready in {time.time() - t0:.0f}s")
    print(json.dumps(results, indent=1))
    os.makedirs(os.path.dirname(llm_path) or ".", exist_ok=True)
    with open(os.path.join(os.path.dirname(llm_path) or ".", "pretrain_report.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
