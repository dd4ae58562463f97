"""
Text-only conversations, the stand-in LLM's prior (toy/pretrain_tiny.py): scenes and videos in words with the
questions image_qa and video_qa ask, keyed copying, descriptions said back, the facts as questions, riddles said
plainly, and scenes as grids of words (scenes.grid) read, described and drawn, as a real LLM has met pictures drawn in
text. Sec. 2: the method starts from a pretrained instruction-tuned LLM that already reads its context.
"""
import json

from toy.scenes import (COLOUR_OF, CORNERS, HELDOUT_COMBOS, NUMBERS, SHAPE_OF, SHAPES, article, describe, grid,
                        is_val_scene, position_name, scene_keys, split_scene)
from toy.tasks import CAPTION_PROMPTS, caption, riddle, scene_questions, task_video_qa

SCENE_INTROS = ["Scene: {}.", "Picture this: {}.", "In a picture there is {}.", "Imagine {}."]
KEYS = [f"{box} {n}" for box in ("box", "card", "slot") for n in NUMBERS[1:]]


def text_scene_qa(rng, split):
    """A scene in words, then one to four questions answered from the words (image_qa's questions, and
    visual_thinking's "the small shape in the center")."""
    scene = split_scene(rng, split)
    turns, qtypes = scene_questions(rng, scene)
    if rng.random() < 0.25:
        o = rng.choice(scene)
        pos = position_name(o["x"], o["y"])
        qtypes[0] = "colour" if rng.random() < 0.5 else "shape"
        turns[:2] = [f"What colour is the {o['size']} shape in the {pos}?", o["colour"]] if qtypes[0] == "colour" else \
            [f"What shape is the {o['colour']} object in the {pos}?", o["shape"]]
    turns[0] = rng.choice(SCENE_INTROS).format(describe(scene)) + "\n" + turns[0]
    return turns, {"qtype": qtypes[0]}


def text_video_qa(rng, split):
    """video_qa's questions about frames written as words."""
    while True:
        turns, images, meta = task_video_qa(rng, ())
        if is_val_scene(scene_keys("video_qa", meta["scenes"])[0]) == (split == "val"):
            break
    frames = "\n".join(f"Frame {t + 1}: {describe(s)}." for t, s in enumerate(meta["scenes"]))
    return [f"{frames}\nThese are the frames of a video. {turns[0].split('video. ', 1)[1]}", turns[1]], {}


def text_keyed_copy(rng, split):
    """Keyed copying: a few labelled things, then one asked for by its label (the retrieval a reply needs)."""
    keys = rng.sample(KEYS, rng.randint(2, 6))
    values = [describe(split_scene(rng, "train", 1)) for _ in keys]
    lines = "\n".join(f"{k}: {v}." for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return [f"Remember these.\n{lines}\nWhat is in {keys[i]}?", values[i]], {}


def text_repeat(rng, split):
    """A scene's description said back word for word: copying, the cheapest lesson in attending to the context."""
    text = describe(split_scene(rng, "train"))
    return [f"Repeat this exactly: {text}.", text], {}


def text_facts(rng, split):
    """The facts and sums as questions and answers, one to four to a conversation."""
    turns = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["colour", "shape", "corners", "sum"])
        if kind == "colour":
            thing = rng.choice(list(COLOUR_OF))
            turns += [f"What colour is {article(thing)} {thing}?", COLOUR_OF[thing]]
        elif kind == "shape":
            thing = rng.choice(list(SHAPE_OF))
            turns += [f"What shape is {article(thing)} {thing}?", SHAPE_OF[thing]]
        elif kind == "corners":
            shape = rng.choice(SHAPES)
            turns += [f"How many corners does a {shape} have?", CORNERS[shape]]
        else:
            a, b = rng.randrange(6), rng.randrange(6)
            turns += [f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", NUMBERS[a + b]]
    return turns, {}


def riddle_of_split(rng, split, avoid=()):
    """A riddle (toy.tasks.riddle) whose scene belongs to split, none of avoid's compositions in it."""
    while True:
        request, scene = riddle(rng, avoid)
        if is_val_scene(describe(scene)) == (split == "val"):
            return request, scene


def text_riddle(rng, split):
    """A riddle's request said plainly: the facts composed into a scene description (Sec. 4.3's reasoning, in words)."""
    request, scene = riddle_of_split(rng, split)
    return [f"Say it plainly: {request}.", describe(scene)], {}


def text_grid_qa(rng, split):
    """image_qa's questions about a scene given as a grid of words: what is where, read from a place among 64, as
    image_qa reads it from the 64 visual tokens."""
    scene = split_scene(rng, split)
    turns, qtypes = scene_questions(rng, scene)
    turns[0] = f"Grid: {grid(scene)}\n{turns[0]}"
    return turns, {"qtype": qtypes[0]}


def text_grid_caption(rng, split):
    """A scene given as a grid of words, described (stage 1's captions, from the grid)."""
    scene = split_scene(rng, split)
    return [f"Grid: {grid(scene)}\n{rng.choice(CAPTION_PROMPTS)}", caption(rng, scene)], {}


def text_grid_draw(rng, split):
    """A scene drawn as a grid of words from its description, or from a riddle (one in five), so the facts reach the
    grid: generation's request, answered in text. Held-out compositions are never drawn (Sec. 3.1's test)."""
    if rng.random() < 0.2:
        request, scene = riddle_of_split(rng, split, HELDOUT_COMBOS)
    else:
        scene = split_scene(rng, split, avoid=HELDOUT_COMBOS)
        request = describe(scene)
    return [f"Draw {request} as a grid.", grid(scene)], {}


TEXT_TASKS = {"scene_qa": text_scene_qa, "video_qa": text_video_qa, "keyed_copy": text_keyed_copy,
              "repeat": text_repeat, "facts": text_facts, "riddle": text_riddle, "grid_qa": text_grid_qa,
              "grid_caption": text_grid_caption, "grid_draw": text_grid_draw}


def write_text(path, split, counts, rng):
    """Text-only conversations in the conversation format (no images), `task` naming their kind (and `meta.qtype` the
    first question's type, where it is one of image_qa's)."""
    with open(path, "w") as f:
        for name, count in counts.items():
            for i in range(count):
                turns, meta = TEXT_TASKS[name](rng, split)
                conversations = [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)]
                f.write(json.dumps({"id": f"{split}-text-{name}-{i:06d}", "task": name, "conversations": conversations,
                                    **({"meta": meta} if meta else {})}) + "\n")
