"""
Conversations -> training batches, shared by train_adapter.py and train_vpit.py. It streams (DESIGN.md, "Scale
contracts"): startup reads each conversation file once for the byte offset of every line and the number of images in
it (cached beside the run, a few bytes a conversation); lengths for batching are estimated from those; a conversation
is read, checked and tokenized only when its batch is built, in DataLoader workers. Visual tokens come from encode.py's
cache. Batches are length-grouped so little compute is spent on padding; collate pads them. At the end: val
conversations as eval.py's questions and pictures to draw, and answers matched as the LLaVA/Cambrian layouts give them.
"""
import hashlib
import json
import os
import re
import string
from array import array

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import open_token_cache
from configurator import BadInput, MissingFile
from model import IGNORE, IMAGE, ROLES, build_sample

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize; the fork must not deadlock them

# a conversation's host memory in a training process: byte offset (int64) + estimated length (int32) + its place in
# the batch order (int64); `tools/benchmark.py --what=scale` measures it, tools/estimate.py's dry run uses it
INDEX_BYTES_PER_CONVERSATION = 8 + 4 + 8
CALIBRATION = 256  # conversations tokenized at startup to fit the length estimate
INDEX_FIELDS = ("offsets", "chars", "turns", "images")


# ---- one conversation, checked ---------------------------------------------------------------------------------------
def conversation_problem(sample):
    """(reason, detail) if the sample is not one the loader takes (DESIGN.md), else None: a JSON object with a list of
    image paths and conversations of an optional system turn, then human/gpt pairs, text in every turn, one image per
    <image> placeholder. tools/prepare.py skips (and logs) such rows; the loader stops on them."""
    if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
        return "not a conversation", "a JSON object with a `conversations` list"
    images, turns = sample.get("images", []), sample["conversations"]
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        return "bad images field", "`images` must be a list of paths"
    if not all(isinstance(t, dict) and t.get("from") in ROLES and isinstance(t.get("value"), str) for t in turns):
        return "not a conversation", f"each turn needs `from` ({', '.join(ROLES)}) and a text `value`"
    roles = [t["from"] for t in turns][1 if turns and turns[0]["from"] == "system" else 0:]
    if not roles or roles != ["human", "gpt"] * (len(roles) // 2):
        return "turns out of order", roles
    if any(not t["value"].strip() for t in turns):
        return "empty text", "a turn"
    placeholders = sum(t["value"].count(IMAGE) for t in turns)
    if placeholders != len(images):
        return "placeholder mismatch", f"{placeholders} {IMAGE} placeholders but {len(images)} images"
    return None


def parse_line(line, where):
    """A line of a conversation file -> the sample, or a ValueError naming `where` (file and line) and the problem."""
    if not line.strip():
        raise BadInput(f"{where}: empty line")
    try:
        sample = json.loads(line)
    except ValueError as e:
        raise BadInput(f"{where}: not valid JSON ({e})") from None
    problem = conversation_problem(sample)
    if problem:
        raise BadInput(f"{where} ({sample.get('id') if isinstance(sample, dict) else None}): "
                       f"{problem[0]}: {problem[1]}")
    return sample


def read_jsonl(path, limit=None):
    """The samples of a small conversation file (val sets, eval), at most limit of them; a bad line is an error naming
    the file and line."""
    if not os.path.exists(path):
        raise MissingFile(f"conversation file not found: {path}")
    samples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(samples) >= limit:
                break
            samples.append(parse_line(line, f"{path}, line {lineno}"))
    return samples


def load_mixture(data_dir, split, mixture):
    """The first n samples of data_dir/split/<task>.jsonl for each task: n in the mixture dict; None or -1 = all."""
    samples = []
    for task, n in mixture.items():
        path = os.path.join(data_dir, split, f"{task}.jsonl")
        rows = read_jsonl(path, None if n is None or n < 0 else n)
        if n is not None and len(rows) < n:
            raise BadInput(f"mixture asks for {n} {task} samples but {path} has {len(rows)}")
        samples += rows
    return samples


# ---- the index: where each conversation starts, and how long it is ----------------------------------------------------
def scan_lines(path):
    """One pass over a conversation file: every line parsed and checked (a bad one is an error naming the file and
    line), and kept as numpy arrays: its byte offset, and for the length estimate the characters of its text, its
    turns and its images."""
    offsets, chars, turns, images, position = array("q"), array("q"), array("q"), array("q"), 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            sample = parse_line(line.decode(), f"{path}, line {lineno}")
            offsets.append(position)
            chars.append(sum(len(t["value"]) for t in sample["conversations"]))
            turns.append(len(sample["conversations"]))
            images.append(len(sample.get("images", [])))
            position += len(line)
    return tuple(np.frombuffer(a, np.int64) for a in (offsets, chars, turns, images))


def line_index(path, index_dir=None):
    """scan_lines(path), cached in index_dir (keyed by the file's path, size and modification time) when given."""
    if not os.path.exists(path):
        raise MissingFile(f"conversation file not found: {path}")
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
    cached = os.path.join(index_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz") if index_dir else None
    if cached and os.path.exists(cached):
        with np.load(cached) as z:
            return tuple(z[k] for k in INDEX_FIELDS)
    columns = scan_lines(path)
    if cached:
        os.makedirs(index_dir, exist_ok=True)
        temp = f"{cached}.{os.getpid()}.tmp.npz"  # (ranks may write it at once: each its own temp, then a rename)
        np.savez(temp, **dict(zip(INDEX_FIELDS, columns)))
        os.replace(temp, cached)
    return columns


class Conversations(Dataset):
    """The conversations of some JSONL files (the first n lines of each), read and tokenized on demand. Holds per
    conversation only its byte offset and estimated length. data[i] is the built sample and its visual tokens, or None
    when it is longer than max_seq_len; batch() skips and counts those, never silently."""

    def __init__(self, sources, tokenizer, cache, max_seq_len, num_visual_tokens=64, index_dir=None):
        self.tokenizer, self.cache, self.max_seq_len, self.num_visual_tokens = tokenizer, cache, max_seq_len, \
            num_visual_tokens
        self.pad_id = tokenizer.pad_token_id or 0
        self.files, self._handles, columns = [], {}, []
        for path, n in sources:
            index = line_index(path, index_dir)
            if n is not None and n >= 0:
                if n > len(index[0]):
                    raise BadInput(f"the mixture asks for {n} samples but {path} has {len(index[0])}")
                index = [column[:n] for column in index]
            self.files.append(path)
            columns.append(index)
        # conversation i is line i - starts[f] + 1 of file f = searchsorted(starts, i, "right") - 1
        self.starts = np.cumsum([0] + [len(index[0]) for index in columns])
        offsets, chars, turns, images = (np.concatenate([index[k] for index in columns]) if columns else
                                         np.zeros(0, np.int64) for k in range(len(INDEX_FIELDS)))
        self.offsets = offsets
        self.estimates = self.estimate_lengths(chars, turns, images)

    def __len__(self):
        return len(self.offsets)

    def lengths(self):
        """Estimated lengths in tokens (for length-grouped batches; the exact length is known once built)."""
        return self.estimates

    def where(self, i):
        f = int(np.searchsorted(self.starts, i, side="right")) - 1
        return f, i - int(self.starts[f]) + 1  # (file, line number)

    def sample(self, i):
        """The i-th conversation, read from its file and checked (a bad line is an error naming file and line)."""
        f, lineno = self.where(i)
        if self._handles.get("pid") != os.getpid():  # a forked DataLoader worker: its own files (a shared offset races)
            self._handles = {"pid": os.getpid()}
        if f not in self._handles:
            self._handles[f] = open(self.files[f], "rb")
        handle = self._handles[f]
        handle.seek(int(self.offsets[i]))
        return parse_line(handle.readline().decode(), f"{self.files[f]}, line {lineno}")

    def build(self, sample):
        return build_sample(self.tokenizer, sample["conversations"], len(sample.get("images", [])),
                            self.num_visual_tokens)

    def estimate_lengths(self, chars, turns, images):
        """Each image is exactly <image_start> + num_visual_tokens slots + <image_end>; the text's tokens are fitted as
        a x characters + b x turns (the chat template's markup) + c on up to CALIBRATION conversations tokenized
        exactly, spread over the set."""
        if len(chars) == 0:
            return np.zeros(0, np.int32)
        image_positions = images * (self.num_visual_tokens + 2)
        pick = np.unique(np.linspace(0, len(chars) - 1, min(CALIBRATION, len(chars))).astype(np.int64))
        exact = np.array([len(self.build(self.sample(int(i)))["input_ids"]) for i in pick]) - image_positions[pick]
        features = lambda idx: np.stack([chars[idx], turns[idx], np.ones(len(idx))], 1).astype(np.float64)
        coef = np.linalg.lstsq(features(pick), exact.astype(np.float64), rcond=None)[0]
        estimates = features(np.arange(len(chars))) @ coef + image_positions
        return np.clip(np.rint(estimates), 1, np.iinfo(np.int32).max).astype(np.int32)

    def __getitem__(self, i):
        sample = self.sample(i)
        built = self.build(sample)
        if len(built["input_ids"]) > self.max_seq_len:
            return None
        images = sample.get("images", [])
        missing = [p for p in images if p not in self.cache]
        if missing:
            f, lineno = self.where(i)
            raise MissingFile(f"{self.files[f]}, line {lineno}: image {missing[0]} is not in the token cache "
                              f"{self.cache.tokens_dir}: run `python encode.py`")
        return built, self.cache.get_many(images).flatten(0, 1)

    def collate(self, items):
        """Built samples -> one padded batch (model.collate) + "kept" (conversations in it) and "skipped" (longer
        than max_seq_len). A micro-batch whose every conversation was too long still steps, on a stand-in with no
        targets, so that every rank takes part in every step (DDP, ZeRO-3)."""
        kept = [item for item in items if item is not None]
        skipped = len(items) - len(kept)
        if not kept:
            kept = [self.stand_in()]
        batch = collate([b for b, _ in kept], [v for _, v in kept], self.pad_id)
        batch["kept"], batch["skipped"] = len(items) - skipped, skipped
        return batch

    def stand_in(self):
        """A one-token sample with no targets: trains nothing."""
        built = {"input_ids": torch.tensor([self.pad_id]), "slots": torch.tensor([-1]),
                 "labels": torch.tensor([IGNORE]), "vision_mask": torch.tensor([False])}
        return built, torch.zeros(0, self.cache.dim)

    def batch(self, indices):
        return self.collate([self[int(i)] for i in indices])

    def __getstate__(self):  # DataLoader workers: open files cannot be pickled, each worker opens its own
        return {**self.__dict__, "_handles": {}}


def stage_data(data_dir, mixture, val_per_task, tokenizer, tokens_dir, max_seq_len, num_visual_tokens=64,
               index_dir=None):
    """A stage's training set (the mixture from the train split) and one val set per task (val split), all reading
    one token cache."""
    cache = open_token_cache(tokens_dir)
    files = lambda split, mix: [(os.path.join(data_dir, split, f"{task}.jsonl"), n) for task, n in mix.items()]
    make = lambda sources: Conversations(sources, tokenizer, cache, max_seq_len, num_visual_tokens, index_dir)
    return make(files("train", mixture)), {task: make(files("val", {task: val_per_task})) for task in mixture}


def batch_loader(data, batches, num_workers=2, prefetch_factor=4, pin_memory=False):
    """The batches (lists of indices), in order, built by num_workers DataLoader workers ahead of the training step."""
    return DataLoader(data, batch_sampler=batches, collate_fn=data.collate, num_workers=num_workers,
                      prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory)


# ---- batching --------------------------------------------------------------------------------------------------------
def length_grouped_batches(lengths, batch_size, seed, group=64):
    """Shuffle, then sort within groups of group*batch_size samples by length and cut into batches: batches of
    similar lengths (little padding) in a random order. Deterministic from seed; index arrays into one order array."""
    rng, lengths = np.random.default_rng(seed), np.asarray(lengths)
    if len(lengths) == 0:
        return []
    order, size, cuts = rng.permutation(len(lengths)), group * batch_size, []
    for g in range(0, len(order), size):
        chunk = order[g:g + size]
        order[g:g + size] = chunk[np.argsort(lengths[chunk], kind="stable")]
        cuts += range(g, min(g + size, len(order)), batch_size)
    batches = np.split(order, cuts[1:])
    return [batches[i] for i in rng.permutation(len(batches))]


def random_batches(n, batch_size, seed):
    """Plain shuffled batches (the padded baseline the benchmark compares against)."""
    order = np.random.default_rng(seed).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(samples, visual_tokens, pad_id):
    """Right-pad samples to one length; slots are shifted to index the concatenation of their visual tokens."""
    length = max(len(s["input_ids"]) for s in samples)
    batch = {"input_ids": torch.full((len(samples), length), pad_id), "slots": torch.full((len(samples), length), -1),
             "labels": torch.full((len(samples), length), IGNORE),
             "vision_mask": torch.zeros(len(samples), length, dtype=torch.bool),
             "attention_mask": torch.zeros(len(samples), length, dtype=torch.long)}
    offset = 0
    for i, (s, v) in enumerate(zip(samples, visual_tokens)):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = s["input_ids"], s["labels"]
        batch["slots"][i, :n] = torch.where(s["slots"] >= 0, s["slots"] + offset, -1)
        batch["vision_mask"][i, :n], batch["attention_mask"][i, :n] = s["vision_mask"], 1
        offset += len(v)
    batch["visual_tokens"] = torch.cat(visual_tokens)  # (0, d) when no sample has an image
    return batch


# ---- conversations as questions and pictures to draw (eval.py) -------------------------------------------------------
def questions(task, samples):
    """Every assistant text turn as a question: (conversation up to it, its images, answer, question type). Earlier
    answers in a multi-turn conversation are given (teacher forcing). Visual thinking: the final answer after the image."""
    out = []
    for s in samples:
        turns, types = s["conversations"], s.get("meta", {}).get("qtypes") or [s.get("meta", {}).get("qtype", task)]
        for k in range(1, len(turns), 2):
            asked = turns[:k]
            n_images = sum(t["value"].count(IMAGE) for t in asked)
            answer = turns[k]["value"].replace(IMAGE, "").strip()
            out.append((asked, s["images"][:n_images], answer, types[min(k // 2, len(types) - 1)]))
    return out


def output_images(sample):
    """Indices (into sample["images"]) of the images inside assistant turns: the ones the model must draw."""
    indices, k = [], 0
    for turn in sample["conversations"]:
        n = turn["value"].count(IMAGE)
        if turn["from"] == "gpt":
            indices += range(k, k + n)
        k += n
    return indices


# ---- answers as the LLaVA / Cambrian eval layouts give them (eval.py) ------------------------------------------------
OPTION_PROMPT = "Answer with the option's letter from the given choices directly."  # LLaVA / Cambrian eval prompt


def with_options(question, options):
    """A multiple-choice question as the LLaVA / Cambrian evals pose it: lettered options, then OPTION_PROMPT."""
    return question + "".join(f"\n{string.ascii_uppercase[i]}. {o}" for i, o in enumerate(options)) + \
        f"\n{OPTION_PROMPT}"


def normalize(text):
    """Lower case, punctuation and surrounding space removed, inner space collapsed."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def option_letter(prediction, options=()):
    """The option letter a reply names: "B", "(B)", "B.", "B) circle", "b" alone, "The answer is B", or an option's
    text. Only the options' letters count (A-Z without options), and a letter that starts a longer reply must be upper
    case, so "a circle" is not option A."""
    letters = string.ascii_uppercase[:len(options)] if options else string.ascii_uppercase
    text = prediction.strip()
    for k, option in enumerate(options):  # first: an option's own text ("A dog" is option B's text, not letter A)
        if normalize(text) == normalize(option):
            return letters[k]
    found = re.fullmatch(r"\(?([A-Za-z])[).:]?", text) or re.match(r"\(?([A-Z])(?:[).:]|\s|$)", text) or \
        re.search(r"(?i:\banswer is) \(?([A-Z])\b", text)
    return found.group(1).upper() if found and found.group(1).upper() in letters else None


def is_correct(prediction, answer, options=()):
    """Letter scoring when there are options or the answer is a letter (the answer may be a letter or an option's
    text), else normalized exact match."""
    if options or re.fullmatch(r"[A-Z]", answer.strip()):
        expected = option_letter(answer, options)
        return expected is not None and option_letter(prediction, options) == expected
    return normalize(prediction) == normalize(answer)
