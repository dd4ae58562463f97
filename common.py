"""
The machinery every stage shares, kept out of the stage files so they read as the method: processes and devices
(torchrun, DeepSpeed ZeRO-3, bf16), atomic saves and resumable checkpoints, which trained run to load, and the reader
of the token cache that encode.py writes.
"""
import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from configurator import BadInput, MissingFile


# ---- processes and devices -------------------------------------------------------------------------------------------
def setup_distributed(device="auto"):
    """(rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain run is rank 0 of 1. device:
    "auto" (this rank's GPU if there is one, else the CPU), "cpu", or a device by name ("cuda:1")."""
    cuda = torch.cuda.is_available() and device != "cpu"
    rank, world = 0, 1
    if "RANK" in os.environ:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dev = dev if device in ("auto", "cpu") else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL's barrier and all_reduce run on the current device: this rank's own GPU
    return rank, world, dev


def finish_distributed(deepspeed_config):
    """Tear down torchrun's process groups at the end of a run. DeepSpeed's engine keeps hooks on the parameters that it
    never removes, so it and its process groups outlive destroy_process_group(), and their communication threads can
    abort the interpreter's exit after a finished, saved run (2 of 101 two-process CPU runs): such a run leaves at once."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    if deepspeed_config:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def wants_bf16(dtype, device, cpu=None):
    """Whether a stage's `dtype` knob means bf16 autocast: "bfloat16" always; "auto" on a CUDA GPU with bf16 and, on
    a CPU, where the stage was measured to gain: cpu="amx" on a CPU with AMX bf16 units (toy/pretrain_tiny.py's SigLIP
    and VAE steps take 21% and 40% less time there), cpu="native" on one with AMX or AVX512-BF16 (encode.py's SigLIP
    forward: 40% less time with AMX, 41% on an AMD EPYC with AVX512-BF16, BENCHMARKS.md). The LLM's and the decoder
    UNet's steps gain on neither, so those stages leave cpu=None."""
    if dtype == "auto" and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dtype == "auto" and device.type == "cpu" and cpu is not None:
        amx = torch.cpu._is_amx_tile_supported()
        return amx or (cpu == "native" and torch.cpu._is_avx512_bf16_supported())
    return dtype == "bfloat16"


def broadcast_from_rank0(tokens, device):
    """Rank 0's list of token ids, on every rank."""
    import torch.distributed as dist

    shared = torch.tensor(tokens, device=device)
    dist.broadcast(shared, 0)
    return shared.tolist()


def whole(params):
    """A context in which parameters that DeepSpeed ZeRO-3 split across the ranks are whole, and what rank 0 writes
    into them is kept. Ordinary parameters need nothing."""
    params = list({id(p): p for p in params if hasattr(p, "ds_id")}.values())  # (a tied table once)
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


# ---- DeepSpeed ZeRO-3 ------------------------------------------------------------------------------------------------
def deepspeed_settings(hp, world, dev):
    """The DeepSpeed JSON the config names, with this run's batch sizes, clipping and precision filled in."""
    settings = json.load(open(hp["deepspeed_config"]))
    settings.update(train_micro_batch_size_per_gpu=hp["micro_batch_size"], train_batch_size=hp["batch_size"],
                    gradient_accumulation_steps=hp["batch_size"] // (hp["micro_batch_size"] * world),
                    gradient_clipping=hp["grad_clip"], bf16={"enabled": wants_bf16(hp["dtype"], dev)},
                    zero_allow_untested_optimizer=True)
    return settings


@contextlib.contextmanager
def built_in_shards(hp, world, dev):
    """Under a ZeRO-3 config, a model built (from_pretrained) in here comes out already split across the ranks
    (transformers loads it under deepspeed.zero.Init): no rank ever holds all of a 70B LLM. Otherwise nothing."""
    settings = deepspeed_settings(hp, world, dev) if hp["deepspeed_config"] else {}
    if settings.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed()  # DeepSpeed's view of torchrun's process group (its world size)
    zero3 = HfDeepSpeedConfig(settings)  # from_pretrained reads it while it lives
    yield
    del zero3


def partitioned(engine):
    """Whether the engine split the weights across the ranks (ZeRO-3): then every forward is a collective."""
    return getattr(engine, "zero_optimization_partition_weights", lambda: False)()


def load_dtype(hp, dev):
    """bf16 weights where DeepSpeed trains in bf16 (it keeps the fp32 master copy of what trains): an 8B LLM loads
    as 16 GB on each rank, not 32; fp32 otherwise (plain bf16 autocast keeps fp32 weights)."""
    return torch.bfloat16 if hp["deepspeed_config"] and wants_bf16(hp["dtype"], dev) else torch.float32


def whole_state_dict(engine):
    """Every rank calls it. Under ZeRO-3 the engine gathers the 16-bit weights one module at a time onto rank 0's CPU
    (no rank ever holds the whole model on its GPU); None where the modules are whole already."""
    if partitioned(engine):
        return engine._zero3_consolidated_16bit_state_dict()
    return None


def keep_latest_deepspeed_checkpoint(folder):
    """DeepSpeed saves every checkpoint to a new global_step<N> folder and removes none (8B: ~97 GB of fp32 weights and
    Adam moments each): once all ranks have written one, keep only the one its `latest` file names."""
    latest = open(os.path.join(folder, "latest")).read().strip()
    for name in os.listdir(folder):
        if name.startswith("global_step") and name != latest:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# ---- saving and loading ----------------------------------------------------------------------------------------------
def write_atomically(path, write):
    """write(temp_path), then rename over path: a reader sees the old file or the new one, never half of one."""
    temp = f"{path}.tmp"
    write(temp)
    os.replace(temp, path)


def save_atomically(save, path):
    """save(tmp) writes a folder; it replaces path only once complete, so a crash leaves the previous one intact."""
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)  # two renames: no moment without a complete folder but the instant between them
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path, model, save_model, optimizer, scheduler, step):
    """Atomic: the model in its stage's format + the trainer state (optimizer, schedule, step, RNG)."""
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    save_atomically(lambda tmp: (save_model(model, tmp), torch.save(state, os.path.join(tmp, "trainer.pt"))), path)


def trained_run(out_dir, shipped_run=""):
    """The run sample.py and eval.py use: out_dir when it holds a trained model (vpit/), else the shipped toy run
    (shipped_run, "" for none); says so on stderr when it is the shipped one."""
    for path in (out_dir, shipped_run):
        if path and os.path.exists(os.path.join(path, "vpit", "metamorph.json")):
            if path != out_dir:
                print(f"no trained model in {out_dir}: using the shipped toy run in {path}", file=sys.stderr)
            return path
    raise MissingFile(f"no trained model at {os.path.join(out_dir, 'vpit')}: run `python train_adapter.py && "
                      "python train_vpit.py` (with your config file)")


# ---- the token cache (encode.py writes it) ---------------------------------------------------------------------------
META, HASHES, LOCATIONS = "cache.json", "index-hashes.npy", "index-locations.npy"


def path_hash(path):
    """An image path's 64-bit key in the index."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


class TokenCache:
    """Read-only view of a cache folder: cache[image_path] -> float32 (num_tokens, dim), read lazily from its shard.
    The index is memory-mapped: opening costs the same for 10 images or 10 million."""

    def __init__(self, tokens_dir):
        if not os.path.exists(os.path.join(tokens_dir, HASHES)):
            raise MissingFile(f"no token cache at {tokens_dir} (no {HASHES}): run `python encode.py` first")
        meta = json.loads(Path(os.path.join(tokens_dir, META)).read_text())
        self.tokens_dir, self.shards = tokens_dir, meta["shards"]
        self.siglip_path, self.num_tokens, self.dim = meta["siglip_path"], meta["num_tokens"], meta["dim"]
        self.open_index()
        if not len(self.hashes) == len(self.locations) == meta["images"]:  # cut short between write_index's files
            raise BadInput(f"the token cache index in {tokens_dir} is half-written: run `python encode.py` again")

    def open_index(self):
        self.hashes = np.load(os.path.join(self.tokens_dir, HASHES), mmap_mode="r")
        self.locations = np.load(os.path.join(self.tokens_dir, LOCATIONS), mmap_mode="r")
        self._handles = {}  # shard number -> safe_open handle, one per shard

    def __len__(self):
        return len(self.hashes)

    def locate(self, path):
        """(shard, row) of path, or None."""
        key = np.uint64(path_hash(path))
        i = int(np.searchsorted(self.hashes, key))
        return tuple(int(x) for x in self.locations[i]) if i < len(self.hashes) and self.hashes[i] == key else None

    def __contains__(self, path):
        return self.locate(path) is not None

    def __getitem__(self, path):
        where = self.locate(path)
        if where is None:
            raise KeyError(f"image {path} is not in the token cache at {self.tokens_dir}: "
                           "run `python encode.py` with the data_dir that lists it")
        shard, row = where
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.tokens_dir, self.shards[shard]), framework="pt")
        return self._handles[shard].get_slice("tokens")[row].float()

    def get_many(self, paths):
        """float32 (len(paths), num_tokens, dim); no paths (a text-only conversation): (0, num_tokens, dim)."""
        if not paths:
            return torch.zeros(0, self.num_tokens, self.dim)
        return torch.stack([self[path] for path in paths])

    def __getstate__(self):  # DataLoader workers: each maps the index and opens the shards itself
        return {k: v for k, v in self.__dict__.items() if k not in ("hashes", "locations", "_handles")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.open_index()


@functools.lru_cache(maxsize=None)
def open_token_cache(tokens_dir):
    """One TokenCache per folder per process: the training set and every val set share it."""
    return TokenCache(tokens_dir)
