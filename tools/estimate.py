"""
Dry run for the big configs: parameter counts, FLOPs, per-GPU memory and hours of stage 2 (VPiT), the token cache's
size on disk, the data index's host memory per rank, and the checkpoint and val cadence those hours call for, with no
weights read and no GPU. `train_vpit.py --dry_run=True` calls report(); stand-alone:

    python -m tools.estimate configs/8b.py [--gpu_count=128 ...]

The LLM is built on the meta device from its config.json only; when llm_path is not on this machine, a built-in copy of
the Llama-3.1-8B or -70B config stands in (chosen by "8b"/"70b" in the folder name), and the report says so.
"""
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from configurator import BadInput, MissingFile
from data import INDEX_BYTES_PER_CONVERSATION
from model import mlp

# ---------------------------------------------------------------------------------------------------------------------
llm_path = "toy/base/llm"
siglip_path = "toy/base/siglip"  # read for the vision width when present, else vision_dim
vision_dim = 1152  # SigLIP so400m width (PAPER.md Sec. 2)
num_visual_tokens = 64
gpu_count = 8
gpu_memory_gb = 80
assumed_mfu = 0.4  # model FLOPs utilisation: the model's FLOPs (no recompute) achieved / peak
gpu_peak_tflops = 989.0  # H100 SXM dense bf16
avg_sample_tokens = 600  # mean conversation length in tokens, images included (66 positions each)
dry_run_tokens = 0  # 0: estimate the tokens as sum(vpit_data) x avg_sample_tokens x vpit_epochs
vpit_data = {}
vpit_epochs = 1
vpit_batch_size = 1536
micro_batch_size = 4
max_seq_len = 4096
grad_checkpointing = True
# images a conversation holds, by task, for the token cache's size: our assumptions about the sets PAPER.md names
# (Sec. 2.2, App. C); a text-only conversation (a share of Cambrian's ImageQA) holds none, so image_qa's 1 is an upper
# bound. Images are counted per conversation, not deduplicated.
images_per_conversation = {"caption": 1, "image_qa": 1, "video_qa": 8, "generation": 1, "image_edit": 2,
                           "video_prediction": 8, "visual_thinking": 2}  # video: 8 frames at 1 fps; thinking: + a crop
ckpt_interval = 100  # steps; the report converts them to minutes of training
eval_interval = 100
# ---------------------------------------------------------------------------------------------------------------------
KNOBS = ["siglip_path", "vision_dim", "gpu_count", "gpu_memory_gb", "assumed_mfu", "gpu_peak_tflops",
         "avg_sample_tokens", "dry_run_tokens", "vpit_data", "vpit_epochs", "vpit_batch_size", "micro_batch_size",
         "max_seq_len", "grad_checkpointing", "images_per_conversation", "ckpt_interval", "eval_interval"]
DEFAULTS = {k: globals()[k] for k in KNOBS}
LLAMA_31 = dict(vocab_size=128256, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                eos_token_id=[128001, 128008, 128009],
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
CACHE_INDEX_BYTES_PER_IMAGE = 16  # encode.py's token-cache index: an image's path hash, shard and row
CKPT_BYTES_PER_PARAM = 12  # a ZeRO-3 checkpoint: the fp32 master weights and Adam's m and v, sharded over the ranks
CKPT_MINUTES, EVAL_MINUTES = 45, 20  # a crash loses at most ~45 min; a val pass at most every ~20 min
FALLBACKS = {"70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
             "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32)}


def llm_config(llm_path):
    """(config, where it came from): the folder's config.json, else the built-in Llama-3.1 config its name asks for."""
    if os.path.isdir(llm_path):
        return AutoConfig.from_pretrained(llm_path), f"{llm_path}/config.json"
    name = os.path.basename(os.path.normpath(llm_path)).lower()
    for size, shape in FALLBACKS.items():
        if size in name:
            source = f"built-in Llama-3.1-{size.upper()} config ({llm_path} not found)"
            return LlamaConfig(**LLAMA_31, **shape), source
    raise MissingFile(f"LLM not found at {llm_path}, and its name says neither 8B nor 70B for a built-in config")


def count_params(config, vision_dim):
    """Parameter counts of MetaMorph built on the meta device (no memory, no weights). The vision tower is not part of
    the model (training reads cached visual tokens), so stage 2 trains everything counted here."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
        d = config.hidden_size
        adapter, vision_head = mlp(vision_dim, d, d), mlp(d, d, vision_dim)
    n = lambda module: sum(p.numel() for p in module.parameters())
    linear = sum(m.weight.numel() for m in llm.modules() if isinstance(m, torch.nn.Linear))
    new_tokens = 2 * d * (1 if config.tie_word_embeddings else 2)  # <image_start>, <image_end>: input + output rows
    counts = {"llm_params": n(llm), "embedding_params": llm.get_input_embeddings().weight.numel(),
              "matmul_params": linear, "adapter_params": n(adapter), "vision_head_params": n(vision_head),
              "new_token_params": new_tokens}
    counts["trainable_params"] = sum(counts[k] for k in ("llm_params", "new_token_params", "adapter_params",
                                                         "vision_head_params"))
    return counts


def flops_per_token(matmul_params, config, seq_len, grad_checkpointing):
    """Training FLOPs per token (PaLM App. B convention): 6 N + 12 L d T, where
    N = weights of the LLM's Linear layers (the LM head included, the input-embedding lookup excluded: it is no matmul),
    12 L d T = attention scores and weighted values (2 matmuls x 2 FLOPs x 3 for forward + backward) over T = seq_len
    context positions, counted in full (no causal discount). The adapter and vision head run on a few positions only
    (<1% of the FLOPs) and are left out. Gradient checkpointing repeats the forward: x (6 + 2) / 6 = 4/3."""
    flops = 6 * matmul_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return flops * 4 / 3 if grad_checkpointing else flops


def memory_gb(config, trainable_params, gpu_count, micro_batch_size, seq_len, grad_checkpointing):
    """Per-GPU memory (GB = 1e9 bytes) under ZeRO-3 with bf16 mixed precision and flash attention:
    sharded   = 16 bytes x N / gpu_count: bf16 params (2) + bf16 grads (2) + fp32 master params, Adam m and v (12);
    gathered  = 2 bytes x 2 x the largest module (one decoder layer or the LM head): ZeRO-3 gathers full bf16 weights
                one module at a time, and prefetches the next;
    per layer = 2 bytes x b s (6 d + 2 d_kv + 4 d_ff): saved bf16 activations of a SwiGLU decoder layer (norm inputs and
                outputs, q k v, attention output, gate, up, act(gate), act(gate) * up; flash attention keeps no s x s);
    activations = L x per layer, or with gradient checkpointing 2 b s d x L (layer inputs) + one layer being recomputed;
    logits    = 6 bytes x b s V (bf16 logits + their fp32 copy for the loss; worst case: every position has a label)."""
    d, L, b, s = config.hidden_size, config.num_hidden_layers, micro_batch_size, seq_len
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    d_kv = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
    d_ff, vocab = config.intermediate_size, config.vocab_size
    layer_params = 2 * d * d + 2 * d * d_kv + 3 * d * d_ff
    per_layer = 2 * b * s * (6 * d + 2 * d_kv + 4 * d_ff)
    activations = 2 * b * s * d * L + per_layer if grad_checkpointing else per_layer * L
    parts = {"sharded": 16 * trainable_params / gpu_count, "gathered": 2 * 2 * max(layer_params, vocab * d),
             "activations": activations, "logits": 6 * b * s * vocab}
    parts = {k: v / 1e9 for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def human(n):
    return next(f"{n / u:.2f}{s}" for u, s in [(1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")] if abs(n) >= u or u == 1)


def hours(tokens, flops_per_token, gpu_count, gpu_peak_tflops, assumed_mfu):
    return tokens * flops_per_token / (gpu_count * gpu_peak_tflops * 1e12 * assumed_mfu) / 3600


def token_cache(counts, images_per_conversation, num_visual_tokens, vision_dim):
    """(images, bytes on disk) of the token cache a mixture reads: float16 (num_visual_tokens, vision_dim) per image and
    its index entry. counts: task -> conversations."""
    unknown = sorted(set(counts) - set(images_per_conversation))
    if unknown:
        raise BadInput(f"images_per_conversation has no count for {unknown}: add how many images such a "
                       "conversation holds")
    images = sum(n * images_per_conversation[task] for task, n in counts.items())
    return images, images * (num_visual_tokens * vision_dim * 2 + CACHE_INDEX_BYTES_PER_IMAGE)


def round2(x):
    """x to two significant digits, at least 1: a step interval a config can hold."""
    return max(1, int(float(f"{x:.2g}")))


def cadence(steps_per_hour):
    """(ckpt_interval, eval_interval) in steps: a checkpoint every ~CKPT_MINUTES, a val pass every ~EVAL_MINUTES."""
    return round2(steps_per_hour * CKPT_MINUTES / 60), round2(steps_per_hour * EVAL_MINUTES / 60)


def settings(cfg):
    """The knobs above: cfg's own, else those of the config file cfg names (a stage script that does not declare the
    dry-run knobs still gets the values its config file sets), else the defaults above."""
    from_file = {}
    if cfg.get("config_file") and os.path.exists(cfg["config_file"]):
        exec(open(cfg["config_file"]).read(), from_file)
    return {k: cfg.get(k, from_file.get(k, v)) for k, v in DEFAULTS.items()}


def report(llm_path, vision_dim, num_visual_tokens, cfg):
    """Print the dry-run estimate for stage 2 and return its numbers. cfg: a dict of knobs (see settings()).
    vision_dim None: the width of the SigLIP folder at siglip_path if there is one, else the vision_dim knob."""
    c = settings(cfg)
    if vision_dim is None:
        siglip = AutoConfig.from_pretrained(c["siglip_path"]) if os.path.isdir(c["siglip_path"]) else None
        vision_dim = getattr(siglip, "vision_config", siglip).hidden_size if siglip else c["vision_dim"]
    config, source = llm_config(llm_path)
    r = count_params(config, vision_dim)
    unknown = [task for task, n in c["vpit_data"].items() if n is None or n < 0]  # -1 / None: "all" of a task's file
    counts = {task: n for task, n in c["vpit_data"].items() if task not in unknown}
    samples = sum(counts.values()) * c["vpit_epochs"]
    r["tokens"] = c["dry_run_tokens"] or samples * c["avg_sample_tokens"]
    seq_len = min(c["avg_sample_tokens"], c["max_seq_len"])  # samples are not packed: T = a sample's length
    r["flops_per_token"] = flops_per_token(r["matmul_params"], config, seq_len, c["grad_checkpointing"])
    r["model_flops_per_token"] = flops_per_token(r["matmul_params"], config, seq_len, False)  # what MFU counts
    r["memory_gb"] = memory_gb(config, r["trainable_params"], c["gpu_count"], c["micro_batch_size"], c["max_seq_len"],
                               c["grad_checkpointing"])
    r["fits"] = r["memory_gb"]["total"] <= 0.9 * c["gpu_memory_gb"]  # 10% for CUDA context, fragmentation, buffers
    # MFU (PaLM App. B) counts the model's FLOPs, not the recomputed forward: hours from those
    r["hours"] = hours(r["tokens"], r["model_flops_per_token"], c["gpu_count"], c["gpu_peak_tflops"], c["assumed_mfu"])
    per_step = c["micro_batch_size"] * c["gpu_count"]
    r["grad_accum"] = c["vpit_batch_size"] / per_step
    r["steps"] = int(r["tokens"] / c["avg_sample_tokens"]) // c["vpit_batch_size"]  # (dry_run_tokens too)
    r["cache_images"], r["cache_bytes"] = token_cache(counts, c["images_per_conversation"], num_visual_tokens,
                                                      vision_dim)
    r["index_bytes"] = sum(counts.values()) * INDEX_BYTES_PER_CONVERSATION  # every rank holds the whole index
    r["ckpt_bytes"] = CKPT_BYTES_PER_PARAM * r["trainable_params"]
    r["steps_per_hour"] = r["steps"] / r["hours"] if r["hours"] else 0.0
    r["ckpt_interval"], r["eval_interval"] = cadence(r["steps_per_hour"])
    B, m = 1e9, r["memory_gb"]
    print(f"LLM config: {source} (meta device, no weights read); vision width {vision_dim}")
    print(f"  d={config.hidden_size} layers={config.num_hidden_layers} heads={config.num_attention_heads}"
          f"/{config.num_key_value_heads} kv  d_ff={config.intermediate_size} vocab={config.vocab_size}")
    print(f"parameters: LLM {human(r['llm_params'])} (input embedding {human(r['embedding_params'])}, "
          f"matmul {human(r['matmul_params'])})  adapter {human(r['adapter_params'])}  "
          f"vision head {human(r['vision_head_params'])}  new token rows {human(r['new_token_params'])}")
    print(f"  trainable in stage 2: {human(r['trainable_params'])} (the vision tower is not in the model: "
          f"visual tokens are cached, {num_visual_tokens} + 2 positions an image)")
    print(f"FLOPs/token: {r['model_flops_per_token'] / B:.3g} GFLOP (6N + 12·L·d·T, T={seq_len})"
          + (f", {r['flops_per_token'] / B:.3g} with gradient checkpointing's recomputed forward (x4/3)"
             if c["grad_checkpointing"] else ""))
    print(f"memory/GPU (ZeRO-3 over {c['gpu_count']} GPUs, micro batch {c['micro_batch_size']} x {c['max_seq_len']}): "
          f"sharded states {m['sharded']:.1f} + gathered weights {m['gathered']:.1f} + activations "
          f"{m['activations']:.1f} + logits {m['logits']:.1f} = {m['total']:.1f} GB -> "
          f"{'fits' if r['fits'] else 'does NOT fit'} in {c['gpu_memory_gb']} GB (90% usable)")
    if r["grad_accum"] != int(r["grad_accum"]) or r["grad_accum"] < 1:
        print(f"  WARNING: vpit_batch_size {c['vpit_batch_size']} is not a multiple of micro_batch_size x gpu_count "
              f"= {per_step}")
    if unknown and not c["dry_run_tokens"]:
        print(f"  WARNING: vpit_data asks for all of {unknown}, a count this dry run cannot know: they are left out; "
              f"set their sample counts or dry_run_tokens")
    source = "dry_run_tokens" if c["dry_run_tokens"] else f"{samples:,} samples x {c['avg_sample_tokens']} tokens"
    print(f"time: {human(r['tokens'])} tokens ({source}), {r['steps']:,} steps of {c['vpit_batch_size']} "
          f"(grad accumulation {r['grad_accum']:g}) -> {r['hours']:.1f} h on {c['gpu_count']} GPUs at "
          f"{c['assumed_mfu']:.0%} MFU of {c['gpu_peak_tflops']:g} TFLOPS ({r['hours'] * c['gpu_count']:,.0f} GPU-hours)")
    per_task = ", ".join(f"{task} {n / 1e6:g}M x {c['images_per_conversation'][task]}" for task, n in counts.items())
    print(f"token cache: {human(r['cache_images'])} images ({per_task}) x {num_visual_tokens} x {vision_dim} x 2 bytes "
          f"(float16) + {CACHE_INDEX_BYTES_PER_IMAGE} bytes of index = {r['cache_bytes'] / 1e12:.2f} TB on disk")
    print(f"data index: {human(sum(counts.values()))} conversations x {INDEX_BYTES_PER_CONVERSATION} bytes = "
          f"{r['index_bytes'] / 1e9:.2f} GB of host memory per rank")
    if r["steps_per_hour"]:
        minutes = lambda steps: f"{steps / r['steps_per_hour'] * 60:.0f} min"
        print(f"cadence: {r['steps_per_hour']:,.0f} steps/h -> ckpt_interval {r['ckpt_interval']} (~{CKPT_MINUTES} "
              f"min; a ZeRO-3 checkpoint is {CKPT_BYTES_PER_PARAM} bytes/param = {r['ckpt_bytes'] / 1e9:.0f} GB), "
              f"eval_interval {r['eval_interval']} (~{EVAL_MINUTES} min)")
        print(f"  this config: ckpt_interval {c['ckpt_interval']} = {minutes(c['ckpt_interval'])}, eval_interval "
              f"{c['eval_interval']} = {minutes(c['eval_interval'])}")
    return r


if __name__ == "__main__":
    from configurator import configure, run_main
    knobs = configure(globals())  # first: it sets llm_path and num_visual_tokens too
    run_main(report, llm_path, None, num_visual_tokens, knobs)
