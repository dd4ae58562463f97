"""
Speed measurements, each a ratio against a baseline run on the same machine in the same run.

    python benchmark.py --what=batching     # train_vpit's length-grouped batches vs plainly padded random batches

batching: the same conversations, model, micro-batch size and number of optimizer steps; throughput counts real
(non-padding) tokens per second, so padding shows up as lost speed.
"""
import json
import os
import time

import torch

from data import ConversationData, length_grouped_batches, load_mixture, random_batches
from encode import TokenCache
from model import MetaMorph

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


if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    torch.manual_seed(seed)
    result = {"batching": bench_batching}[what]()
    os.makedirs(os.path.join(out_dir, "bench"), exist_ok=True)
    json.dump(result, open(os.path.join(out_dir, "bench", f"{what}.json"), "w"), indent=1)
