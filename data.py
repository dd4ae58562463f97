"""
Conversations -> training batches, shared by train_adapter.py and train_vpit.py:
the per-task mixture from the config, the visual tokens from encode.py's cache, and length-grouped batches so little
compute is spent on padding.
"""
import json
import os
import random

from tqdm import tqdm

from encode import TokenCache
from model import IMAGE, ROLES, build_sample, collate


def conversation_problem(sample):
    """(reason, detail) if the sample is not one the loader takes (DESIGN.md), else None: a JSON object with a list of
    image paths and conversations of an optional system turn, then human/gpt pairs, text in every turn, one image per
    <image> placeholder. prepare.py skips (and logs) such rows; read_jsonl stops on them."""
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


def read_jsonl(path):
    """Samples of a conversation file; an empty or malformed line, or a sample the loader cannot take
    (conversation_problem), is an error naming the file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"conversation file not found: {path}")
    samples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}, line {lineno}"
            if not line.strip():
                raise ValueError(f"{where}: empty line")
            try:
                s = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            problem = conversation_problem(s)
            if problem:
                raise ValueError(f"{where} ({s.get('id') if isinstance(s, dict) else None}): {problem[0]}: {problem[1]}")
            samples.append(s)
    return samples


def load_mixture(data_dir, split, mixture):
    """The first n samples of data_dir/split/<task>.jsonl for each task: n in the mixture dict; None or -1 = all."""
    samples = []
    for task, n in mixture.items():
        rows = read_jsonl(os.path.join(data_dir, split, f"{task}.jsonl"))
        if n is not None and n >= 0:
            if n > len(rows):
                raise ValueError(f"mixture asks for {n} {task} samples but {data_dir}/{split}/{task}.jsonl has "
                                 f"{len(rows)}")
            rows = rows[:n]
        samples += rows
    return samples


class ConversationData:
    """Tokenized conversations (built once, up front) + their visual tokens (read from the cache per batch).
    Samples longer than max_seq_len are skipped and counted, never silently."""

    def __init__(self, samples, tokenizer, tokens_dir, max_seq_len, num_visual_tokens=64, desc="tokenize"):
        self.cache, self.pad_id = TokenCache(tokens_dir), tokenizer.pad_token_id or 0
        self.samples, self.built, self.skipped = [], [], 0
        for s in tqdm(samples, desc=desc, leave=False):
            built = build_sample(tokenizer, s["conversations"], len(s.get("images", [])), num_visual_tokens)
            if len(built["input_ids"]) > max_seq_len:
                self.skipped += 1
                continue
            missing = [p for p in s.get("images", []) if p not in self.cache]
            if missing:
                raise KeyError(f"sample {s.get('id')}: image {missing[0]} is not in the token cache {tokens_dir}: "
                               "run `python encode.py`")
            self.samples.append(s)
            self.built.append(built)
        if self.skipped:
            print(f"{desc}: skipped {self.skipped} conversations longer than max_seq_len={max_seq_len}")

    def __len__(self):
        return len(self.built)

    def lengths(self):
        return [len(b["input_ids"]) for b in self.built]

    def batch(self, indices):
        visual = [self.cache.get_many(self.samples[i].get("images", [])) for i in indices]
        return collate([self.built[i] for i in indices], [v.flatten(0, 1) for v in visual], self.pad_id)


def stage_data(data_dir, mixture, val_per_task, tokenizer, tokens_dir, max_seq_len, num_visual_tokens=64):
    """A stage's training set (the mixture from the train split) and one val set per task (val split)."""
    load = lambda split, mix, desc: ConversationData(load_mixture(data_dir, split, mix), tokenizer, tokens_dir,
                                                     max_seq_len, num_visual_tokens, desc=desc)
    return load("train", mixture, "tokenize train"), {task: load("val", {task: val_per_task}, f"tokenize val {task}")
                                                      for task in mixture}


def length_grouped_batches(lengths, batch_size, seed, group=64):
    """Shuffle, then sort within groups of group*batch_size samples by length and cut into batches: batches of
    similar lengths (little padding) in a random order. Deterministic from seed."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for g in range(0, len(order), group * batch_size):
        chunk = sorted(order[g:g + group * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n, batch_size, seed):
    """Plain shuffled batches (the padded baseline the benchmark compares against)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
