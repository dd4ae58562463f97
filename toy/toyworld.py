"""
The toy world: 64x64 pictures of flat shapes (toy/scenes.py), every data category of MetaMorph (PAPER.md Sec. 2.2,
App. C) as instruction-tuning conversations (toy/tasks.py), text-only conversations for the stand-in LLM
(toy/text.py) and a text corpus, written to disk.

    python -m toy.toyworld   # -> data/toy/{images/, train/<task>.jsonl, val/<task>.jsonl, text/*.jsonl, corpus.txt,
                             #              world.json}

Same seed, byte-identical output. Every scene is a train scene or a val scene (scenes.is_val_scene): no val picture,
and no val scene in words, is ever seen in training.
"""
import json
import os
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from common import write_atomically

from toy.scenes import HELDOUT_COMBOS, compare_scenes, is_val_scene, read_scene, render, scene_keys, split_scene
from toy.tasks import HELDOUT, TASKS, caption, facts
from toy.text import write_text

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
seed = 1337
toy_train = {"caption": 4000, "image_qa": 8000, "video_qa": 1500, "generation": 4000, "image_edit": 1500,
             "video_prediction": 1000, "visual_thinking": 1500}
toy_val = {"caption": 200, "image_qa": 400, "video_qa": 200, "generation": 200, "image_edit": 200,
           "video_prediction": 200, "visual_thinking": 200}
toy_heldout_val = 200  # samples in each held-out file: generation_heldout.jsonl, generation_riddle.jsonl
toy_corpus_captions = 8000  # caption sentences in corpus.txt
toy_fact_repeats = 100  # copies of each fact and sum in corpus.txt, so the stand-in LLM knows them by heart
# Text-only conversations for the stand-in LLM's pretraining (text/train.jsonl): the prior a real LLM brings to VPiT,
# reading an answer out of its context (Sec. 2: the method starts from a pretrained instruction-tuned LLM), and
# scenes as grids of words, read and drawn (toy/text.py; docs/devlog.md)
toy_text = {"scene_qa": 30000, "video_qa": 6000, "keyed_copy": 8000, "repeat": 15000, "facts": 6000, "riddle": 4000,
            "grid_qa": 30000, "grid_caption": 5000, "grid_draw": 15000}
# text/val.jsonl, scored by toy/pretrain_tiny.py
toy_text_val = {"scene_qa": 200, "video_qa": 100, "keyed_copy": 100, "grid_qa": 100, "grid_draw": 100}
# Stage 2's text-only task (train/ and val/text.jsonl): the first conversations of these kinds in text/<split>.jsonl,
# questions about scenes in words and the world-knowledge facts, so stage 2 keeps the LLM's prior and the facts still
# reach the picture (Sec. 4.2-4.3: riddles; without them stage 2 forgets the facts, docs/devlog.md, (eighth))
toy_vpit_text = {"scene_qa": 1500, "facts": 1000}
# ---------------------------------------------------------------------------------------------------------------------
RECIPE = ("seed", "toy_train", "toy_val", "toy_heldout_val", "toy_corpus_captions", "toy_fact_repeats", "toy_text",
          "toy_text_val", "toy_vpit_text")  # the knobs a world is made from: world.json records them


def write_task(root, split, name, make, count, rng, avoid):
    task = name.split("_")[0] if name in HELDOUT else name
    os.makedirs(os.path.join(root, "images", split, name), exist_ok=True)
    with open(os.path.join(root, split, f"{name}.jsonl"), "w") as f:
        for i in range(count):
            while True:  # a sample whose scenes all belong to this split
                turns, images, meta = make(rng, avoid)
                if all(is_val_scene(k) == (split == "val") for k in scene_keys(name, meta["scenes"])):
                    break
            sid = f"{split}-{name}-{i:06d}"
            paths = [f"images/{split}/{name}/{sid}-{k}.png" for k in range(len(images))]
            for path, img in zip(paths, images):
                img.save(os.path.join(root, path))
            assert sum(t.count("<image>") for t in turns) == len(images), sid
            conversations = [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)]
            sample = {"id": sid, "task": task, "images": paths, "meta": meta, "conversations": conversations}
            f.write(json.dumps(sample) + "\n")


def write_vpit_text(root, split, counts):
    """<split>/text.jsonl, stage 2's text-only task: the first counts[kind] conversations of each kind in
    text/<split>.jsonl (as many as it has), their task named `text`."""
    kept = dict.fromkeys(counts, 0)
    with open(os.path.join(root, split, "text.jsonl"), "w") as f:
        for line in open(os.path.join(root, "text", f"{split}.jsonl")):
            sample = json.loads(line)
            if kept.get(sample["task"], 0) < counts.get(sample["task"], 0):
                kept[sample["task"]] += 1
                f.write(json.dumps({**sample, "task": "text"}) + "\n")


def write_corpus(path, rng, n_captions, repeats):
    lines = [caption(rng, split_scene(rng, "train")) for _ in range(n_captions)]
    lines += [f"{p} {a}." for p, a in facts() for _ in range(repeats)]
    rng.shuffle(lines)
    write_atomically(path, lambda temp: Path(temp).write_text("\n".join(lines) + "\n"))


def main():
    if os.path.exists(data_dir):
        shutil.rmtree(data_dir)  # a fresh world every time: same seed, same bytes
    for split in ("train", "val"):
        os.makedirs(os.path.join(data_dir, split))
    avoid = set(HELDOUT_COMBOS)
    jobs = [("train", name, toy_train.get(name, 0)) for name in TASKS] + \
           [("val", name, toy_val.get(name, 0)) for name in TASKS] + \
           [("val", name, toy_heldout_val) for name in HELDOUT]
    for split, name, count in tqdm(jobs, desc="toy world"):
        rng = random.Random(f"{seed}-{split}-{name}")  # one stream per file: changing one count changes one file
        write_task(data_dir, split, name, {**TASKS, **HELDOUT}[name], count, rng, avoid)
    os.makedirs(os.path.join(data_dir, "text"))
    for split, counts in (("train", toy_text), ("val", toy_text_val)):
        rng = random.Random(f"{seed}-text-{split}")
        write_text(os.path.join(data_dir, "text", f"{split}.jsonl"), split, counts, rng)
        write_vpit_text(data_dir, split, toy_vpit_text)
    write_corpus(os.path.join(data_dir, "corpus.txt"), random.Random(f"{seed}-corpus"), toy_corpus_captions,
                 toy_fact_repeats)
    scenes = [json.loads(line)["meta"]["scenes"][0] for line in open(os.path.join(data_dir, "val", "generation.jsonl"))]
    accuracy = scene_reader_accuracy(scenes)
    # written last, whole: pipeline.py takes the world as made when world.json holds the recipe in force
    write_atomically(os.path.join(data_dir, "world.json"), lambda temp: Path(temp).write_text(json.dumps(
        {"recipe": {knob: globals()[knob] for knob in RECIPE}, "scene_reader_accuracy": accuracy}, indent=1)))
    print(f"wrote {sum(c for _, _, c in jobs)} conversations to {data_dir}")
    print(f"scene reader accuracy on {len(scenes)} rendered val scenes: {100 * accuracy:.2f}% of objects "
          "(shape, colour, size and position all right)")


def scene_reader_accuracy(scenes):
    scores = [o["object"] for scene in scenes for o in compare_scenes(scene, read_scene(render(scene)))[0]]
    return sum(scores) / max(len(scores), 1)


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
