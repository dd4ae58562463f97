"""
SigLIP -> 64 visual tokens -> safetensors cache (PAPER.md Sec. 2, DESIGN.md "Visual tokens").

    python encode.py                                        # every image of data/toy/{train,val}/*.jsonl
    torchrun --nproc_per_node=8 encode.py configs/8b.py     # the images split across 8 GPUs

The frozen vision tower runs once per image here, so training never runs it. The cache is <out_dir>/tokens/:
- shard-r<rank>-<k>.safetensors: one float16 tensor "tokens" (n, 64, d), written by one rank, and beside it
  shard-r<rank>-<k>.paths, the n image paths (as the JSONL writes them), one a line, written once the shard is whole
  (a shard without its .paths was cut short: it is ignored, and written again);
- index-hashes.npy / index-locations.npy: a sorted 64-bit hash of every path and its (shard, row), 16 bytes an image,
  memory-mapped when opened (no rank reads a 12M-entry index into memory); cache.json: the tower, the image root, sizes
  and shards.
Every file is written atomically; the index is rebuilt from the .paths files (linear in the images) once every rank is
done, so a crash or a kill leaves the shards written so far, and a rerun encodes only the images in none of them.
At paper scale the cache is big: 12M images x 64 tokens x 1152 x 2 bytes = ~1.8 TB (the dry run prints it).
Other stages import: visual_tokens, load_vision_tower, load_image, TokenCache, open_token_cache, fill_cache.
"""
import glob
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoImageProcessor, SiglipVisionModel
from transformers.utils import logging as hf_logging

from common import HASHES, LOCATIONS, META, TokenCache, path_hash, setup_distributed, wants_bf16, write_atomically
from configurator import BadInput, MissingFile

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"  # conversation JSONL under data_dir/train/*.jsonl and data_dir/val/*.jsonl
image_root = ""  # image paths in the JSONL are relative to this; "" means data_dir
out_dir = "out/tiny"  # cache goes to out_dir/tokens/
siglip_path = "toy/base/siglip"  # a local folder: our stand-in SiglipModel, or google/siglip-so400m-patch14-384
num_visual_tokens = 64  # PAPER Sec. 2: 8x8
encode_batch_size = 64
encode_shard_size = 4096  # images per safetensors shard
skip_bad_images = False  # True: a missing/corrupt image is skipped and counted instead of an error
device = "auto"  # auto: cuda if available else cpu
dtype = "auto"  # "auto": bf16 autocast on a bf16 GPU or a CPU with AMX or AVX512-BF16, else fp32 (BENCHMARKS.md)
# ---------------------------------------------------------------------------------------------------------------------


# ---- the visual tokens (Sec. 2) --------------------------------------------------------------------------------------
def load_vision_tower(path):
    """(SiglipVisionModel in eval mode, its image processor) from a local folder saved by save_pretrained, holding
    either a full SiglipModel (the text tower is ignored) or a SiglipVisionModel."""
    if not os.path.isdir(path):
        raise MissingFile(f"vision tower not found at {path}: make the toy stand-in with "
                          "`python -m toy.pretrain_tiny`, or get the real one with "
                          f"`hf download google/siglip-so400m-patch14-384 --local-dir {path}`")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists every text-tower weight as unexpected: we check below
    try:
        model, info = SiglipVisionModel.from_pretrained(path, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise BadInput(f"{path} is not a SigLIP vision tower: weights missing or mismatched: "
                       f"{sorted(info['missing_keys'])[:5]} {info['mismatched_keys'][:5]}")
    return model.eval().requires_grad_(False), processor


def interpolate_tokens(features, num_tokens=64):
    """(B, g*g, d) patch features -> (B, num_tokens, d) unit vectors: the patch grid is bilinearly resized to
    sqrt(num_tokens) x sqrt(num_tokens) in fp32 (27x27 -> 8x8 for SO400M@384), then each token is L2-normalized."""
    B, N, d = features.shape
    g, side = math.isqrt(N), math.isqrt(num_tokens)
    assert g * g == N, f"{N} patch features do not make a square grid"
    assert side * side == num_tokens, f"num_tokens={num_tokens} is not a perfect square"
    grid = features.transpose(1, 2).reshape(B, d, g, g).float()  # patches are in row-major order
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return F.normalize(grid.flatten(2).transpose(1, 2), dim=-1)


@torch.no_grad()  # not inference_mode: the tokens become training targets, which autograd must be able to save
def visual_tokens(vision_model, pixel_values, num_tokens=64):
    """Sec. 2: pixel_values (B, 3, H, W) -> float32 (B, num_tokens, d) visual tokens. The features are the last
    encoder layer's, taken *before* post_layernorm, as in the released code: the tower runs without post_layernorm
    and its pooling head, which would only be thrown away (BENCHMARKS.md, "Encoding")."""
    weight = next(vision_model.parameters())
    patches = vision_model.embeddings(pixel_values.to(weight.device, weight.dtype))
    return interpolate_tokens(vision_model.encoder(inputs_embeds=patches).last_hidden_state, num_tokens)


def image_tokens(vision_model, processor, images, num_tokens=64):
    """PIL images -> float32 (len(images), num_tokens, d) visual tokens (sample.py and eval.py encode with this too)."""
    return visual_tokens(vision_model, processor(images=images, return_tensors="pt")["pixel_values"], num_tokens)


# ---- the inputs ------------------------------------------------------------------------------------------------------
def load_image(path):
    """An RGB PIL image, or an error that names the file."""
    if not os.path.isfile(path):
        raise MissingFile(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # PIL raises several kinds for truncated or garbage files
        raise BadInput(f"cannot read image {path}: {e}") from e


def image_paths(data_dir):
    """Every image path in the `images` lists of data_dir/{train,val}/*.jsonl, deduplicated, sorted."""
    files = sorted(f for split in ("train", "val") for f in glob.glob(os.path.join(data_dir, split, "*.jsonl")))
    if not files:
        raise MissingFile(f"no conversation files in {data_dir}/train or {data_dir}/val: "
                          "make the toy world with `python -m toy.toyworld`")
    paths = set()
    for file in files:
        with open(file) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    sample = json.loads(line)
                except ValueError:
                    raise BadInput(f"{file}, line {lineno}: {'not valid JSON' if line.strip() else 'empty line'}") \
                        from None
                images = sample.get("images", []) if isinstance(sample, dict) else None
                if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                    raise BadInput(f"{file}, line {lineno}: a sample must be a JSON object whose `images` is a "
                                   "list of paths")
                paths.update(images)
    return sorted(paths)


# ---- the cache -------------------------------------------------------------------------------------------------------
def written_shards(folder):
    """[(shard file, its image paths)] of every whole shard in folder, in name order (a shard without its .paths file
    was cut short: it is not one)."""
    shards = []
    for listing in sorted(glob.glob(os.path.join(folder, "shard-*.paths"))):
        with open(listing) as f:
            shards.append((os.path.basename(listing)[:-len(".paths")] + ".safetensors", f.read().splitlines()))
    return shards


def cached_paths(folder):
    return {path for _, paths in written_shards(folder) for path in paths}


class CacheMismatch(BadInput):
    """A cache folder made from another model, size or image root: the user's choice of folder, not a bug."""


def check_meta(folder, made_by, num_tokens, images_from):
    """Start cache.json in a new folder, or check that the cache there was made by the same model and size, from images
    under the same root. The cache is keyed by the image paths the JSONL writes, relative to that root: another
    dataset's images/0001.png must not be read as this one's (an image changed in place keeps its old tokens: delete
    the cache)."""
    file = os.path.join(folder, META)
    if os.path.exists(os.path.join(folder, "index.json")):
        raise CacheMismatch(f"{folder} is a token cache of an older layout (index.json): delete it and encode again")
    meta = json.loads(Path(file).read_text()) if os.path.exists(file) else \
        {"siglip_path": made_by, "num_tokens": num_tokens, "dim": None, "shards": [], "images": 0}
    if (os.path.normpath(meta["siglip_path"]), meta["num_tokens"]) != (os.path.normpath(made_by), num_tokens):
        raise CacheMismatch(f"{file} holds {meta['num_tokens']} tokens per image from {meta['siglip_path']}, not "
                            f"{num_tokens} from {made_by}: delete {folder} or choose another out_dir")
    if os.path.normpath(meta.get("image_root", images_from)) != os.path.normpath(images_from):
        raise CacheMismatch(f"{file} holds the images under {meta['image_root']}, not {images_from}: delete {folder} "
                            "or choose another out_dir")
    if "image_root" not in meta:  # a new cache, or one from before the root was recorded: this one's from now on
        os.makedirs(folder, exist_ok=True)
        write_atomically(file, lambda temp: Path(temp).write_text(json.dumps({**meta, "image_root": images_from})))


class ShardWriter:
    """One rank's shards: shard-r<rank>-<k>.safetensors, then its .paths; k goes on after the rank's last whole one."""

    def __init__(self, folder, rank):
        self.folder, self.rank = folder, rank
        mine = [name for name, _ in written_shards(folder) if name.startswith(f"shard-r{rank:03d}-")]
        self.next = 1 + max((int(name[len("shard-r000-"):-len(".safetensors")]) for name in mine), default=-1)

    def write(self, paths, tokens):
        name = os.path.join(self.folder, f"shard-r{self.rank:03d}-{self.next:05d}")
        stacked = torch.stack(tokens).to(torch.float16).contiguous()
        write_atomically(name + ".safetensors", lambda temp: save_file({"tokens": stacked}, temp))
        write_atomically(name + ".paths", lambda temp: Path(temp).write_text("".join(p + "\n" for p in paths)))
        self.next += 1


def write_index(folder, shards, paths, shard_ids, rows, dim):
    """The index of folder's shards (file names): image paths[i] is row rows[i] of shards[shard_ids[i]]. Linear in the
    images but for one sort (10M images: 14 s on 2 cores, 6 s of it hashing); a key held twice is an error naming
    its paths."""
    hashes = np.fromiter(map(path_hash, paths), np.uint64, len(paths))
    order = np.argsort(hashes, kind="stable")  # (stable: a key held twice names its paths in their order)
    hashes, locations = hashes[order], np.stack([np.asarray(shard_ids, np.int32), np.asarray(rows, np.int32)], 1)[order]
    twice = np.flatnonzero(hashes[1:] == hashes[:-1])
    if len(twice):
        first, second = order[twice[0]], order[twice[0] + 1]
        raise BadInput(f"{folder}: {len(twice)} image paths share a 64-bit key with another, e.g. " + (
            f"{paths[first]} is in both {shards[shard_ids[first]]} and {shards[shard_ids[second]]} (two runs of "
            "encode.py into one folder at once?): delete the folder and encode again" if paths[first] == paths[second]
            else f"{paths[first]} and {paths[second]} (a hash collision): rename one of the images"))
    for name, array in ((HASHES, hashes), (LOCATIONS, locations)):
        write_atomically(os.path.join(folder, name), lambda temp: np.save(open(temp, "wb"), array))
    meta = json.loads(Path(os.path.join(folder, META)).read_text())
    meta.update(dim=dim, shards=list(shards), images=len(hashes))  # written last: the index is whole when it agrees
    write_atomically(os.path.join(folder, META), lambda temp: Path(temp).write_text(json.dumps(meta)))


def build_index(folder):
    """Index every whole shard of folder (rank 0, once every rank has written): one pass over the .paths files."""
    shards = written_shards(folder)
    counts = np.array([len(paths) for _, paths in shards], np.int64)
    paths = [p for _, listed in shards for p in listed]
    rows = np.arange(len(paths)) - np.repeat(np.cumsum(counts) - counts, counts)  # each path's row in its shard
    dim = None
    if shards:
        with safe_open(os.path.join(folder, shards[0][0]), framework="pt") as f:
            dim = f.get_slice("tokens").get_shape()[-1]
    write_index(folder, [name for name, _ in shards], paths, np.repeat(np.arange(len(shards)), counts), rows, dim)


def fill_cache(folder, todo, encode_batch, rank=0, batch_size=64, shard_size=4096, desc="encode"):
    """Encode todo (this rank's image paths) in batches with encode_batch(paths) -> (the paths it encoded, their
    tensors), written as this rank's shards of shard_size. Returns how many it encoded. (The decoder's VAE latents are
    cached the same way.)"""
    writer, pending_paths, pending, encoded = ShardWriter(folder, rank), [], [], 0
    with tqdm(total=len(todo), desc=desc, unit="img", disable=rank != 0) as bar:
        for i in range(0, len(todo), batch_size):
            paths, tensors = encode_batch(todo[i:i + batch_size])
            pending_paths, pending, encoded = pending_paths + paths, pending + list(tensors), encoded + len(paths)
            while len(pending_paths) >= shard_size or (pending_paths and i + batch_size >= len(todo)):
                writer.write(pending_paths[:shard_size], pending[:shard_size])
                del pending_paths[:shard_size], pending[:shard_size]
            bar.update(min(batch_size, len(todo) - i))
    return encoded


def finish_cache(folder, rank):
    """Once every rank has written its shards, rank 0 indexes them all; then every rank can open the cache."""
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        build_index(folder)
    if dist.is_initialized():
        dist.barrier()


# ---- main ------------------------------------------------------------------------------------------------------------
def load_or_error(path):
    """(image, None) or (None, the error), so that a worker thread never raises."""
    try:
        return load_image(path), None
    except (FileNotFoundError, ValueError) as e:
        return None, e


def main():
    rank, world, dev = setup_distributed(device)
    root, tokens_dir = image_root or data_dir, os.path.join(out_dir, "tokens")
    paths = image_paths(data_dir)
    if rank == 0:
        check_meta(tokens_dir, siglip_path, num_visual_tokens, root)
    if dist.is_initialized():
        dist.barrier()
    done = cached_paths(tokens_dir)
    todo = [p for p in paths if p not in done]
    indexed = os.path.exists(os.path.join(tokens_dir, HASHES)) and \
        json.loads(Path(os.path.join(tokens_dir, META)).read_text())["images"] == len(done)
    if not todo and indexed:
        if rank == 0:
            print(f"all {len(paths)} images are already cached in {tokens_dir}: nothing to do")
        return
    if rank == 0:
        print(f"{len(paths)} images in {data_dir}, {len(paths) - len(todo)} already cached, {len(todo)} to encode"
              + (f" on {world} ranks" if world > 1 else ""))
    mine, skipped, start = todo[rank::world], [], time.time()
    encoded = 0
    if mine:
        model, processor = load_vision_tower(siglip_path)
        model.to(dev)
        amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=wants_bf16(dtype, dev, cpu="native"))
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            def encode_batch(batch):
                images, good = [], []
                for path, (image, error) in zip(batch, pool.map(load_or_error, [os.path.join(root, p) for p in batch])):
                    if error is None:
                        images.append(image)
                        good.append(path)
                    elif skip_bad_images:
                        skipped.append(path)
                    else:
                        raise error
                if not images:
                    return [], []
                with amp:
                    return good, image_tokens(model, processor, images, num_visual_tokens).to("cpu", torch.float16)

            encoded = fill_cache(tokens_dir, mine, encode_batch, rank, encode_batch_size, encode_shard_size)
    counts = torch.tensor([encoded, len(skipped)], device=dev)  # (NCCL reduces GPU tensors only)
    if dist.is_initialized():
        dist.all_reduce(counts)
    finish_cache(tokens_dir, rank)
    if rank == 0:
        seconds = time.time() - start
        print(f"encoded {int(counts[0])} images into {tokens_dir} ({int(counts[0]) / seconds:.1f} images/s), "
              f"{len(TokenCache(tokens_dir))} cached in all")
        if skip_bad_images:
            print(f"skipped {int(counts[1])} missing or unreadable images" +
                  (f", e.g. {os.path.join(root, skipped[0])}" if skipped else ""))


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
    if dist.is_initialized():
        dist.destroy_process_group()
