"""
SigLIP -> 64 visual tokens -> safetensors cache (PAPER.md Sec. 2, DESIGN.md "Visual tokens").

    python encode.py                        # every image of data/toy/{train,val}/*.jsonl -> out/tiny/tokens/

The frozen vision tower runs once per image here, so training never runs it. The cache is <out_dir>/tokens/:
shard-00000.safetensors, ... (one float16 tensor "tokens" of shape (n, 64, d) each) and index.json, which maps each
image path, as written in the JSONL, to [shard, row]. Every file is written atomically and index.json is rewritten
after each shard, so a crash leaves a consistent cache, and a rerun encodes only the images not yet in it.
Other stages import: visual_tokens, load_vision_tower, load_image, TokenCache.
"""
import glob
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoImageProcessor, SiglipVisionModel
from transformers.utils import logging as hf_logging

from model import wants_bf16

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"  # conversation JSONL under data_dir/train/*.jsonl and data_dir/val/*.jsonl
image_root = ""  # image paths in the JSONL are relative to this; "" means data_dir
out_dir = "out/tiny"  # cache goes to out_dir/tokens/
siglip_path = "out/tiny/base/siglip"  # a local folder: our stand-in SiglipModel, or google/siglip-so400m-patch14-384
num_visual_tokens = 64  # PAPER Sec. 2: 8x8
encode_batch_size = 64
encode_shard_size = 4096  # images per safetensors shard
skip_bad_images = False  # True: a missing/corrupt image is skipped and counted instead of an error
device = "auto"  # auto: cuda if available else cpu
dtype = "auto"  # "auto": bf16 autocast on a bf16 GPU or an AMX CPU (toy: 1.6x the images/s, tokens' cosine to fp32's
#                 > 0.9999), else fp32; or "bfloat16" / "float32"
# ---------------------------------------------------------------------------------------------------------------------


# ---- the visual tokens (Sec. 2) --------------------------------------------------------------------------------------
def load_vision_tower(path):
    """(SiglipVisionModel in eval mode, its image processor) from a local folder saved by save_pretrained, holding
    either a full SiglipModel (the text tower is ignored) or a SiglipVisionModel."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"vision tower not found at {path}: make the toy stand-in with "
                                "`python pretrain_tiny.py`, or get the real one with "
                                f"`hf download google/siglip-so400m-patch14-384 --local-dir {path}`")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists every text-tower weight as unexpected: we check below
    try:
        model, info = SiglipVisionModel.from_pretrained(path, output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{path} is not a SigLIP vision tower: weights missing or mismatched: "
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
    encoder layer, hidden_states[-1], taken *before* post_layernorm, as in the released code."""
    weight = next(vision_model.parameters())
    out = vision_model(pixel_values.to(weight.device, weight.dtype), output_hidden_states=True)
    return interpolate_tokens(out.hidden_states[-1], num_tokens)


def image_tokens(vision_model, processor, images, num_tokens=64):
    """PIL images -> float32 (len(images), num_tokens, d) visual tokens (sample.py and eval.py encode with this too)."""
    return visual_tokens(vision_model, processor(images=images, return_tensors="pt")["pixel_values"], num_tokens)


# ---- the inputs ------------------------------------------------------------------------------------------------------
def load_image(path):
    """An RGB PIL image, or an error that names the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:  # PIL raises several kinds for truncated or garbage files
        raise ValueError(f"cannot read image {path}: {e}") from e


def image_paths(data_dir):
    """Every image path in the `images` lists of data_dir/{train,val}/*.jsonl, deduplicated, sorted."""
    files = sorted(f for split in ("train", "val") for f in glob.glob(os.path.join(data_dir, split, "*.jsonl")))
    if not files:
        raise FileNotFoundError(f"no conversation files in {data_dir}/train or {data_dir}/val: "
                                "make the toy world with `python toyworld.py`")
    paths = set()
    for file in files:
        with open(file) as f:
            for lineno, line in enumerate(f, 1):
                try:
                    sample = json.loads(line)
                except ValueError:
                    raise ValueError(f"{file}, line {lineno}: {'not valid JSON' if line.strip() else 'empty line'}") \
                        from None
                images = sample.get("images", []) if isinstance(sample, dict) else None
                if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                    raise ValueError(f"{file}, line {lineno}: a sample must be a JSON object whose `images` is a "
                                     "list of paths")
                paths.update(images)
    return sorted(paths)


# ---- the cache -------------------------------------------------------------------------------------------------------
def write_atomically(path, write):
    """write(temp_path), then rename over path: a reader sees the old file or the new one, never half of one."""
    temp = f"{path}.tmp"
    write(temp)
    os.replace(temp, path)


def write_shard(tokens_dir, index, paths, tokens):
    """Save tokens, a list of (T, d) tensors, as the next shard (float16), then record their rows in index.json."""
    name = f"shard-{len(index['shards']):05d}.safetensors"
    stacked = torch.stack(tokens).to(torch.float16).contiguous()
    write_atomically(os.path.join(tokens_dir, name), lambda temp: save_file({"tokens": stacked}, temp))
    index["index"].update({path: [len(index["shards"]), row] for row, path in enumerate(paths)})
    index["shards"].append(name)
    write_atomically(os.path.join(tokens_dir, "index.json"), lambda temp: Path(temp).write_text(json.dumps(index)))


def open_index(tokens_dir, siglip_path, num_tokens):
    """The cache's index, a new one for an empty folder, or an error if it was made with another tower or size."""
    file = os.path.join(tokens_dir, "index.json")
    if not os.path.exists(file):
        return {"siglip_path": siglip_path, "num_tokens": num_tokens, "dim": None, "shards": [], "index": {}}
    index = json.loads(Path(file).read_text())
    if (os.path.normpath(index["siglip_path"]), index["num_tokens"]) != (os.path.normpath(siglip_path), num_tokens):
        raise ValueError(f"{file} holds {index['num_tokens']} tokens per image from {index['siglip_path']}, not "
                         f"{num_tokens} from {siglip_path}: delete {tokens_dir} or choose another out_dir")
    return index


class TokenCache:
    """Read-only view of <out_dir>/tokens: cache[image_path] -> float32 (num_tokens, dim), read lazily from its shard
    (memory-mapped, so a cache of millions of images is never loaded whole)."""

    def __init__(self, tokens_dir):
        file = os.path.join(tokens_dir, "index.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no token cache at {tokens_dir} (no index.json): run `python encode.py` first")
        meta = json.loads(Path(file).read_text())
        self.tokens_dir, self.shards, self.index = tokens_dir, meta["shards"], meta["index"]
        self.siglip_path, self.num_tokens, self.dim = meta["siglip_path"], meta["num_tokens"], meta["dim"]
        self._handles = {}  # shard number -> safe_open handle, one per shard

    def __len__(self):
        return len(self.index)

    def __contains__(self, path):
        return path in self.index

    def __getitem__(self, path):
        if path not in self.index:
            raise KeyError(f"image {path} is not in the token cache at {self.tokens_dir}: "
                           "run `python encode.py` with the data_dir that lists it")
        shard, row = self.index[path]
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.tokens_dir, self.shards[shard]), framework="pt")
        return self._handles[shard].get_slice("tokens")[row].float()

    def get_many(self, paths):
        """float32 (len(paths), num_tokens, dim); no paths (a text-only conversation): (0, num_tokens, dim)."""
        if not paths:
            return torch.zeros(0, self.num_tokens, self.dim)
        return torch.stack([self[path] for path in paths])

    def __getstate__(self):  # DataLoader workers: open handles cannot be pickled, each worker opens its own
        return {**self.__dict__, "_handles": {}}


# ---- main ------------------------------------------------------------------------------------------------------------
def load_or_error(path):
    """(image, None) or (None, the error), so that a worker thread never raises."""
    try:
        return load_image(path), None
    except (FileNotFoundError, ValueError) as e:
        return None, e


def main():
    root = image_root or data_dir
    tokens_dir = os.path.join(out_dir, "tokens")
    paths = image_paths(data_dir)
    index = open_index(tokens_dir, siglip_path, num_visual_tokens)
    todo = [p for p in paths if p not in index["index"]]
    if not todo:
        print(f"all {len(paths)} images are already cached in {tokens_dir}: nothing to do")
        return
    print(f"{len(paths)} images in {data_dir}, {len(paths) - len(todo)} already cached, {len(todo)} to encode")
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, processor = load_vision_tower(siglip_path)
    model.to(dev)
    dim = model.config.hidden_size
    if index["dim"] not in (None, dim):
        raise ValueError(f"{tokens_dir} holds tokens of width {index['dim']}, but {siglip_path} makes width {dim}")
    index["dim"] = dim
    os.makedirs(tokens_dir, exist_ok=True)

    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=wants_bf16(dtype, torch.device(dev), amx_cpu=True))
    pending_paths, pending_tokens, skipped, start = [], [], [], time.time()
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool, tqdm(total=len(todo), desc="encode", unit="img") as bar:
        for i in range(0, len(todo), encode_batch_size):
            batch = todo[i:i + encode_batch_size]
            images, good = [], []
            for path, (image, error) in zip(batch, pool.map(load_or_error, [os.path.join(root, p) for p in batch])):
                if error is None:
                    images.append(image)
                    good.append(path)
                elif skip_bad_images:
                    skipped.append(path)
                else:
                    raise error
            if images:
                with amp:
                    tokens = image_tokens(model, processor, images, num_visual_tokens)
                pending_tokens += list(tokens.to("cpu", torch.float16))
                pending_paths += good
            while len(pending_paths) >= encode_shard_size:
                write_shard(tokens_dir, index, pending_paths[:encode_shard_size], pending_tokens[:encode_shard_size])
                del pending_paths[:encode_shard_size], pending_tokens[:encode_shard_size]
            bar.update(len(batch))
    if pending_paths:
        write_shard(tokens_dir, index, pending_paths, pending_tokens)
    seconds = time.time() - start
    encoded = len(todo) - len(skipped)
    print(f"encoded {encoded} images into {tokens_dir} ({encoded / seconds:.1f} images/s), "
          f"{len(index['index'])} cached in all")
    if skip_bad_images:
        print(f"skipped {len(skipped)} missing or unreadable images" + (f", e.g. {os.path.join(root, skipped[0])}"
                                                                         if skipped else ""))


if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    main()
