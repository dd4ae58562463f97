"""
Speed measurements, each a ratio against a baseline run on the same machine in the same run.

    python benchmark.py --what=batching     # train_vpit's length-grouped batches vs plainly padded random batches
    python benchmark.py --what=generation   # 64 visual tokens: model.generate's KV cache vs recomputing every step

batching: the same conversations, model, micro-batch size and number of optimizer steps; throughput counts real
(non-padding) tokens per second, so padding shows up as lost speed.
generation: one picture (64 vision-mode steps) after an image-edit prompt of about 100 positions, greedy, with the KV
cache against recomputing the whole sequence for every new token as the released code does; same model, same prompt,
and the two must produce the same tokens. Then bench_batch copies of it side by side, as eval.py draws.
bench_llm_path="" uses the trained run (out_dir/vpit); a path to any HF LLM (e.g. the SmolLM2 conversion) times a
bigger model with fresh heads, its LM head set to open an image at once.
"""
import json
import os
import time

import torch
import torch.nn.functional as F

from data import ConversationData, length_grouped_batches, load_mixture, random_batches
from encode import TokenCache
from model import MetaMorph, build_sample

# ---------------------------------------------------------------------------------------------------------------------
what = "batching"
data_dir = "data/toy"
out_dir = "out/tiny"
llm_path = "out/tiny/base/llm"
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
# ---------------------------------------------------------------------------------------------------------------------


def train_throughput(model, data, batches):
    """Real tokens per second and the padding fraction of plain AdamW steps over the given micro-batches."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    real = padded = 0
    start = time.time()
    for idx in batches:
        batch = data.batch(idx)
        loss, _, _ = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real, padded = real + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
    return {"tokens_per_s": real / (time.time() - start), "padding": 1 - real / padded}


def bench_batching():
    tokens_dir = os.path.join(out_dir, "tokens")
    model = MetaMorph.from_llm(llm_path, TokenCache(tokens_dir).dim, num_visual_tokens)
    data = ConversationData(load_mixture(data_dir, "train", vpit_data), model.tokenizer, tokens_dir, max_seq_len,
                            num_visual_tokens)
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
    cache = TokenCache(os.path.join(out_dir, "tokens"))
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


if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    torch.manual_seed(seed)
    result = {"batching": bench_batching, "generation": bench_generation}[what]()
    os.makedirs(os.path.join(out_dir, "bench"), exist_ok=True)
    name = what + (f"-{os.path.basename(bench_llm_path.rstrip('/'))}" if what == "generation" and bench_llm_path else "")
    json.dump(result, open(os.path.join(out_dir, "bench", f"{name}.json"), "w"), indent=1)
