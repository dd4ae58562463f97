"""
Speed measurements on this machine: batching and generation each against a baseline in the same run; scale against the
targets of DESIGN.md's "Scale contracts".

    python -m tools.benchmark --what=batching     # train_vpit's length-grouped batches vs plainly padded random batches
    python -m tools.benchmark --what=generation   # 64 visual tokens: model.generate's KV cache vs recomputing every step
    python -m tools.benchmark --what=scale --conversations=1000000   # the streaming data path at Cambrian size
    python -m tools.benchmark --what=encode       # encode.py's vision-tower forward: bf16 autocast vs fp32

batching: the same conversations, model, micro-batch size and number of optimizer steps; throughput counts real
(non-padding) tokens per second, so padding shows up as lost speed.
generation: one picture (64 vision-mode steps) after an image-edit prompt of about 100 positions, greedy, with the KV
cache against recomputing the whole sequence for every new token as the released code does; same model, same prompt,
and the two must produce the same tokens. Then bench_batch copies of it side by side, as eval.py draws.
bench_llm_path="" uses the trained run (out_dir/vpit); a path to any HF LLM (e.g. the SmolLM2 conversion) times a
bigger model with fresh heads, its LM head set to open an image at once.
scale: a synthetic Cambrian-shaped set and a fake token cache under out_dir/bench/scale (made again only when its knobs
change), read as training reads it (data.py, SmolLM2's tokenizer: `python -m tools.prepare_smol` first) in fresh processes,
twice (line index built, then cached): startup to the first batch, resident bytes per conversation, conversations/s
of 2 loader workers, padding of length-grouped vs random batches; then the opening of a token-cache index of
index_entries images. The last line holds every number as key=value.
encode: encode.py's visual_tokens on the same bench_images val pictures (processed once), batch encode_batch_size, under
bf16 autocast and in fp32, best of bench_repeats each; the lowest cosine of a bf16 token to its fp32 twin is asserted
above 0.999. What `dtype="auto"` picks on this machine is printed beside it.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer

import encode
from common import open_token_cache, wants_bf16
from configurator import ROOT, MissingFile
from data import Conversations, batch_loader, length_grouped_batches, load_mixture, random_batches, stage_data
from model import IMAGE, IMAGE_END, IMAGE_START, MetaMorph, build_sample

# ---------------------------------------------------------------------------------------------------------------------
what = "batching"
data_dir = "data/toy"
out_dir = "out/tiny"
llm_path = "toy/base/llm"
siglip_path = "toy/base/siglip"  # encode
num_visual_tokens = 64
vpit_data = {"image_qa": 512, "video_qa": 128, "generation": 256, "image_edit": 128, "video_prediction": 128,
             "visual_thinking": 128}
micro_batch_size = 16
max_seq_len = 1024
bench_steps = 40
bench_llm_path = ""  # generation: "" = the trained out_dir/vpit, else an HF LLM folder with fresh heads
bench_repeats = 3
bench_batch = 32  # generation: pictures drawn side by side in the second measurement (eval.py's eval_batch_size)
seed = 1337
conversations = 1_000_000  # scale: the synthetic set's size
smol_path = "out/smol/base/llm"  # scale: the tokenizer and chat template (prepare_smol.py)
bench_images = 1024  # encode: val pictures timed
scale_images = 2048  # scale: distinct fake images in the token cache, which every image path maps onto
scale_batches = 100  # scale: micro-batches drawn for the loader's speed and the padding
index_entries = 10_000_000  # scale: images in the token-cache index whose opening is timed
# ---------------------------------------------------------------------------------------------------------------------
# the synthetic set: shares of the conversations; text lengths in characters (~8 a token of these words)
MIX = {"image_qa": 0.82, "generation": 0.10, "video_qa": 0.08}
TEXT_ONLY = 0.10  # of all conversations: image_qa lines with no image (Cambrian's text-only share)
FRAMES = 8  # video_qa: frames at 1 fps, each an image
QUESTION_CHARS, ANSWER_CHARS, CAPTION_CHARS = 150, 1550, 120
SCALE_MAX_SEQ_LEN = 4096  # configs/8b.py
SCALE_VAL = 64  # val conversations per task (train_vpit.py's vpit_val)


def train_throughput(model, data, batches):
    """Real tokens per second and the padding fraction of plain AdamW steps over the given micro-batches."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    real = padded = 0
    start = time.time()
    for idx in batches:
        batch = {k: v for k, v in data.batch(idx).items() if k not in ("kept", "skipped")}
        loss, _, _ = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real, padded = real + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
    return {"tokens_per_s": real / (time.time() - start), "padding": 1 - real / padded}


def bench_batching():
    cache = open_token_cache(os.path.join(out_dir, "tokens"))
    model = MetaMorph.from_llm(llm_path, cache.dim, num_visual_tokens)
    sources = [(os.path.join(data_dir, "train", f"{task}.jsonl"), n) for task, n in vpit_data.items()]
    data = Conversations(sources, model.tokenizer, cache, max_seq_len, num_visual_tokens)
    grouped = length_grouped_batches(data.lengths(), micro_batch_size, seed)[:bench_steps]
    plain = random_batches(len(data), micro_batch_size, seed)[:bench_steps]
    train_throughput(model, data, plain[:3])  # warm-up
    results = {"padded": train_throughput(model, data, plain), "grouped": train_throughput(model, data, grouped)}
    results["speedup"] = results["grouped"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"{len(data)} conversations, micro-batch {micro_batch_size}, {bench_steps} steps each")
    for name in ("padded", "grouped"):
        r = results[name]
        print(f"  {name:8s} {r['tokens_per_s']:8.0f} real tokens/s   {100 * r['padding']:5.1f}% padding")
    print(f"  length grouping: {results['speedup']:.2f}x the padded baseline's throughput")
    return results


@torch.no_grad()
def generate_recomputing(model, input_ids, slots, visual_tokens, max_new_tokens=64, copies=1):
    """model.generate() (greedy) without a KV cache, as the released code generates: the whole sequence is run
    again for every new token, text or visual. Returns the same pieces. copies: that many rows of the sequence side
    by side (what recomputing a batch costs); they are the same, so the first one decides."""
    ids, slots, visual = input_ids.tolist(), slots.tolist(), list(visual_tokens)

    def last_hidden():
        rows = [[s + k * len(visual) if s >= 0 else -1 for s in slots] for k in range(copies)]
        tokens = torch.stack(visual).repeat(copies, 1) if visual else visual_tokens
        return model.hidden_states(torch.tensor([ids] * copies), torch.tensor(rows), tokens)[0, -1]

    pieces, text = [], []
    for _ in range(max_new_tokens):
        token = int(model.llm.get_output_embeddings()(last_hidden()).argmax())
        if token in model.stop_ids():
            break
        text.append(token)
        ids, slots = ids + [token], slots + [-1]
        if token != model.image_start_id:
            continue
        image = []
        for _ in range(model.num_visual_tokens):
            image.append(F.normalize(model.vision_head(last_hidden()).float(), dim=-1))
            ids, slots = ids + [0], slots + [len(visual)]
            visual.append(image[-1])
        pieces += [text, torch.stack(image)]
        text, ids, slots = [model.image_end_id], ids + [model.image_end_id], slots + [-1]
    pieces.append(text)
    return pieces


def edit_prompt(model, cache):
    """The first val image_edit conversation as a prompt: its input image and instruction (about 100 positions)."""
    sample = load_mixture(data_dir, "val", {"image_edit": 1})[0]
    prompt = build_sample(model.tokenizer, sample["conversations"][:1], 1, num_visual_tokens,
                          add_generation_prompt=True)
    return prompt, cache.get_many(sample["images"][:1]).flatten(0, 1).float()


def bench_generation():
    cache = open_token_cache(os.path.join(out_dir, "tokens"))
    if bench_llm_path:
        model = MetaMorph.from_llm(bench_llm_path, cache.dim, num_visual_tokens)
        opens = lambda module, inputs, logits: logits.index_fill(-1, torch.tensor([model.image_start_id]), 1e4)
        model.llm.get_output_embeddings().register_forward_hook(opens)  # fresh heads: open an image at once
    else:
        model = MetaMorph.from_pretrained(os.path.join(out_dir, "vpit"))
    model.eval()
    prompt, visual = edit_prompt(model, cache)
    args = (prompt["input_ids"], prompt["slots"], visual)

    def timed(fn):
        times = []
        for _ in range(bench_repeats):
            start = time.time()
            pieces = fn()
            times.append(time.time() - start)
        return min(times), pieces

    results = {"model": bench_llm_path or os.path.join(out_dir, "vpit"), "prompt_positions": len(args[0]),
               "visual_tokens": num_visual_tokens}
    print(f"{results['model']}: {num_visual_tokens} visual tokens after a {len(args[0])}-position prompt, best of "
          f"{bench_repeats}")
    for rows in (1, bench_batch):  # one picture (sample.py), and a batch of them side by side (eval.py)
        cached_s, cached = timed(lambda: model.generate_batch([args[:2]] * rows, [args[2]] * rows, 1)[0])
        recompute_s, recomputed = timed(lambda: generate_recomputing(model, *args, max_new_tokens=1, copies=rows))
        for pieces in cached:
            assert len(pieces) == 3 and pieces[0] == recomputed[0] == [model.image_start_id], "no picture was drawn"
            assert torch.allclose(pieces[1], recomputed[1], atol=1e-4), "KV cache and recomputation disagree"
        results[f"batch_{rows}"] = {"kv_cache_s": cached_s, "recompute_s": recompute_s,
                                    "speedup": recompute_s / cached_s}
        print(f"  {rows:3d} picture(s) at once: KV cache {cached_s:.3f}s, recompute {recompute_s:.3f}s -> "
              f"{recompute_s / cached_s:.1f}x")
    return results


def bench_encode():
    model, processor = encode.load_vision_tower(siglip_path)
    paths = encode.image_paths(data_dir)[-bench_images:]
    batch = encode.encode_batch_size
    pixels = [processor(images=[encode.load_image(os.path.join(data_dir, p)) for p in paths[i:i + batch]],
                        return_tensors="pt")["pixel_values"] for i in range(0, len(paths), batch)]

    @torch.inference_mode()
    def forward(bf16):
        start = time.time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tokens = torch.cat([encode.visual_tokens(model, x, num_visual_tokens).float() for x in pixels])
        return time.time() - start, tokens

    forward(False)  # warm-up
    fp32_s, fp32 = min((forward(False) for _ in range(bench_repeats)), key=lambda r: r[0])
    bf16_s, bf16 = min((forward(True) for _ in range(bench_repeats)), key=lambda r: r[0])
    cosine = F.cosine_similarity(fp32, bf16, dim=-1).min().item()
    assert cosine > 0.999, f"bf16 tokens drift from fp32 ones (lowest cosine {cosine:.5f})"
    auto = wants_bf16("auto", torch.device("cpu"), cpu="native")
    results = {"images": len(paths), "fp32_images_per_s": len(paths) / fp32_s, "bf16_images_per_s": len(paths) / bf16_s,
               "speedup": fp32_s / bf16_s, "lowest_cosine": cosine, "auto_picks_bf16": auto}
    print(f"{len(paths)} images, best of {bench_repeats}: fp32 {results['fp32_images_per_s']:.0f} images/s, bf16 "
          f"{results['bf16_images_per_s']:.0f} -> {results['speedup']:.2f}x; lowest token cosine {cosine:.5f}; "
          f"dtype=\"auto\" picks {'bf16' if auto else 'fp32'} here")
    return results


# ---- scale: the streaming data path at Cambrian size -----------------------------------------------------------------
def snippets(corpus, rng, mean_chars, n):
    """n pieces of the corpus, of lognormal lengths around mean_chars (the long tail of real answers)."""
    lengths = np.clip(rng.lognormal(np.log(mean_chars) - 0.5, 1.0, n), 20, 20_000).astype(np.int64)
    starts = rng.integers(0, len(corpus) - 20_000, n)
    return [corpus[a:a + k] for a, k in zip(starts.tolist(), lengths.tolist())]


def turn(role, text):
    return f'{{"from": "{role}", "value": "{text}"}}'


def synthetic_lines(task, ids, rng, corpus):
    """JSONL lines of one task, one per id, and the image paths they name, from string templates (the corpus' words
    need no JSON escaping). image_qa: 1-8 question-answer turns about one picture, or none (text-only);
    generation: a MetaCLIP-style caption to draw; video_qa: FRAMES frames, a question, an answer."""
    n = len(ids)
    turns = rng.geometric(0.4, n).clip(1, 8) if task == "image_qa" else np.ones(n, np.int64)
    images = np.full(n, FRAMES if task == "video_qa" else 1)
    if task == "image_qa":
        images[rng.random(n) < TEXT_ONLY / MIX["image_qa"]] = 0
    questions = iter(snippets(corpus, rng, CAPTION_CHARS if task == "generation" else QUESTION_CHARS, turns.sum()))
    answers = iter(snippets(corpus, rng, ANSWER_CHARS if task == "image_qa" else QUESTION_CHARS, turns.sum()))
    lines, paths = [], []
    for i, k, m in zip(ids, turns.tolist(), images.tolist()):
        names = [f"{task}/{i}-{j}.jpg" for j in range(m)]
        if task == "generation":
            body = [turn("human", f"Generate an image of {next(questions)}."),
                    turn("gpt", f"Here is an image based on your request: {IMAGE}")]
        else:  # the pictures open the first question
            first = IMAGE * m + "\\n" if m else ""
            body = [turn(role, text) for q in range(k) for role, text in
                    (("human", (first if q == 0 else "") + next(questions)), ("gpt", next(answers)))]
        lines.append(f'{{"id": "{i}", "task": "{task}", "images": {json.dumps(names)}, '
                     f'"conversations": [{", ".join(body)}]}}\n')
        paths += names
    return lines, paths


def fake_token_cache(tokens_dir, paths, images):
    """A token cache in encode.py's format whose paths map onto `images` random unit tokens (one shard)."""
    encode.check_meta(tokens_dir, "fake", num_visual_tokens, "fake")
    tokens = torch.randn(images, num_visual_tokens, 1152, generator=torch.Generator().manual_seed(seed))
    shard = "shard-r000-00000.safetensors"
    save_file({"tokens": F.normalize(tokens, dim=-1).half()}, os.path.join(tokens_dir, shard))
    encode.write_index(tokens_dir, [shard], paths, np.zeros(len(paths), np.int32), np.arange(len(paths)) % images, 1152)


def cached(folder, spec, make):
    """make() into folder, unless folder was made with this spec (a dict of what shapes it). Whether it made it."""
    stamp = os.path.join(folder, "spec.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == spec:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    make()
    json.dump(spec, open(stamp, "w"))
    return True


def whole_words(tokenizer):
    """The lower-case words the tokenizer holds as one token after a space (byte-level BPE's "\u0120")."""
    return sorted(w[1:] for w in tokenizer.get_vocab() if w[0] == "\u0120" and w[1:].isalpha() and w[1:].islower())


def write_scale_set(root, n, words, images):
    """The synthetic set of n conversations under root: train/ and val/ conversation files, and tokens/, a fake cache
    of `images` distinct images that their paths map onto. Text is random words."""
    rng = np.random.default_rng(seed)
    corpus = " ".join(rng.choice(words, 1 << 21))
    paths = []
    for split, counts in [("train", {t: round(n * share) for t, share in MIX.items()}),
                          ("val", {t: SCALE_VAL for t in MIX})]:
        os.makedirs(os.path.join(root, split))
        for task, count in counts.items():
            with open(os.path.join(root, split, f"{task}.jsonl"), "w") as f:
                for start in range(0, count, 100_000):  # (in chunks: a million lines are gigabytes)
                    ids = [f"{split}-{i:08d}" for i in range(start, min(count, start + 100_000))]
                    lines, names = synthetic_lines(task, ids, rng, corpus)
                    f.writelines(lines)
                    paths += names
    fake_token_cache(os.path.join(root, "tokens"), paths, images)


def token_index(tokens_dir):
    """Seconds to open a token-cache index of index_entries images (made once) and read one, and its bytes per entry on
    disk (its files but the shards)."""
    last = f"images/{index_entries - 1:09d}.jpg"
    cached(tokens_dir, {"entries": index_entries},
           lambda: fake_token_cache(tokens_dir, [f"images/{i:09d}.jpg" for i in range(index_entries)], 1))
    start = time.time()
    open_token_cache(tokens_dir).get_many([last])
    seconds = time.time() - start
    size = sum(os.path.getsize(os.path.join(tokens_dir, f)) for f in os.listdir(tokens_dir)
               if not f.startswith("shard-") and f != "spec.json")
    return {"index_open_s": seconds, "index_bytes_per_entry": size / index_entries}


def rss():
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def padding(batches):
    """Padding positions / real tokens over collated batches."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return sum(b["attention_mask"].numel() for b in batches) / real - 1


def data_path(root, index_dir, launched, draws, micro_batch, tokenizer_path, seed):
    """Run in a fresh process: the training data path as train_vpit.py starts it, to its first batch; then (draws > 1)
    draws length-grouped batches in all, as many random ones, and their numbers. Prints them as JSON."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)  # as MetaMorph.from_llm
    base = rss()
    train, _ = stage_data(root, {task: -1 for task in MIX}, SCALE_VAL, tokenizer, os.path.join(root, "tokens"),
                          SCALE_MAX_SEQ_LEN, index_dir=index_dir)
    batches = length_grouped_batches(train.lengths(), micro_batch, seed)
    result = {"rss_bytes_per_conversation": (rss() - base) / len(train)}
    loader = iter(batch_loader(train, batches[:draws], num_workers=2))
    grouped = [next(loader)]
    result["startup_s"], start = time.time() - launched, time.time()
    if draws > 1:
        grouped += list(loader)
        seconds = time.time() - start
        result["loader_conversations_per_s"] = sum(b["kept"] + b["skipped"] for b in grouped[1:]) / seconds
        plain = list(batch_loader(train, random_batches(len(train), micro_batch, seed)[:draws], num_workers=2))
        result.update(padding_ratio_grouped=padding(grouped), padding_ratio_random=padding(plain),
                      mean_tokens=sum(int(b["attention_mask"].sum()) for b in plain) / sum(b["kept"] for b in plain),
                      skipped=sum(b["skipped"] for b in grouped + plain))
    print(json.dumps(result))


def launch(root, index_dir, draws):
    """data_path() in a fresh Python process, timed from its launch."""
    code = (f"from tools import benchmark; benchmark.data_path({root!r}, {index_dir!r}, {time.time()!r}, {draws}, "
            f"{micro_batch_size}, {smol_path!r}, {seed})")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the data path failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def bench_scale():
    if not os.path.exists(os.path.join(smol_path, "tokenizer_config.json")):
        raise MissingFile(f"no SmolLM2 tokenizer at {smol_path}: run `python -m tools.prepare_smol` first")
    root = os.path.join(out_dir, "bench", "scale")
    start = time.time()
    spec = {"conversations": conversations, "scale_images": scale_images, "seed": seed, "mix": MIX,
            "text_only": TEXT_ONLY, "frames": FRAMES, "chars": [QUESTION_CHARS, ANSWER_CHARS, CAPTION_CHARS]}
    words = whole_words(AutoTokenizer.from_pretrained(smol_path))
    made = cached(root, spec, lambda: write_scale_set(root, conversations, words, scale_images))
    print(f"{conversations:,} synthetic conversations in {root}: {'written' if made else 'cached'} "
          f"({time.time() - start:.0f}s)")
    index_dir = os.path.join(root, "data_index")
    shutil.rmtree(index_dir, ignore_errors=True)
    first = launch(root, index_dir, 1)  # the line index is built and cached in index_dir
    result = {"conversations": conversations, "startup_first_s": first["startup_s"],
              **launch(root, index_dir, scale_batches)}
    result["grouping_speedup"] = (1 + result["padding_ratio_random"]) / (1 + result["padding_ratio_grouped"])
    result.update(token_index(os.path.join(out_dir, "bench", f"token_index-{index_entries}")))
    r = result
    print(f"startup to the first batch {r['startup_first_s']:.1f}s (line index built), {r['startup_s']:.1f}s (cached); "
          f"index {r['rss_bytes_per_conversation']:.0f} bytes/conversation resident; loader "
          f"{r['loader_conversations_per_s']:.0f} conversations/s (2 workers); mean {r['mean_tokens']:.0f} tokens")
    print(f"padding/real tokens, {scale_batches} batches of {micro_batch_size}: length-grouped "
          f"{r['padding_ratio_grouped']:.3f}, random {r['padding_ratio_random']:.3f} -> {r['grouping_speedup']:.2f}x "
          f"the real tokens per step; a token-cache index of {index_entries:,} images opens in "
          f"{r['index_open_s']:.2f}s, {r['index_bytes_per_entry']:.1f} bytes/entry")
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    torch.manual_seed(seed)
    result = run_main({"batching": bench_batching, "generation": bench_generation, "scale": bench_scale,
                       "encode": bench_encode}[what])
    os.makedirs(os.path.join(out_dir, "bench"), exist_ok=True)
    name = what + (f"-{os.path.basename(bench_llm_path.rstrip('/'))}" if what == "generation" and bench_llm_path else "")
    json.dump(result, open(os.path.join(out_dir, "bench", f"{name}.json"), "w"), indent=1)
