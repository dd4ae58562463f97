"""
The toy world: 64x64 pictures of flat shapes, and every data category of MetaMorph (PAPER.md Sec. 2.2, App. C) written
as instruction-tuning conversations, plus a text corpus for the stand-in LLM and a scene reader for evaluation.

    python toyworld.py     # -> data/toy/{images/, train/<task>.jsonl, val/<task>.jsonl, text/*.jsonl, corpus.txt}

Same seed, byte-identical output. A scene is a list of objects {shape, colour, size, x, y}; grid scenes put each object
at the centre of one cell of a 3x3 grid. Every scene is a train scene or a val scene (is_val_scene): no val picture,
and no val scene in words, is ever seen in training.
"""
import json
import os
import random
import shutil
import zlib

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
seed = 1337
toy_train = {"caption": 4000, "image_qa": 8000, "video_qa": 1500, "generation": 4000, "image_edit": 1500,
             "video_prediction": 1000, "visual_thinking": 1500}
toy_val = {"caption": 200, "image_qa": 400, "video_qa": 200, "generation": 200, "image_edit": 200,
           "video_prediction": 200, "visual_thinking": 200}
toy_heldout_val = 200  # samples in each held-out file: generation_heldout.jsonl, generation_riddle.jsonl
toy_corpus_captions = 8000  # caption sentences in corpus.txt
toy_fact_repeats = 50  # copies of each fact and sum in corpus.txt, so the stand-in LLM knows them by heart
# Text-only conversations for the stand-in LLM's pretraining (text/train.jsonl): the prior a real LLM brings to VPiT,
# reading an answer out of its context (Sec. 2: the method starts from a pretrained instruction-tuned LLM)
toy_text = {"scene_qa": 30000, "video_qa": 6000, "keyed_copy": 8000, "repeat": 15000, "facts": 3000, "riddle": 4000}
toy_text_val = {"scene_qa": 200, "video_qa": 100, "keyed_copy": 100}  # text/val.jsonl: scored by pretrain_tiny.py
val_share = 8  # one scene in val_share is a val scene (by a hash of its description)
# ---------------------------------------------------------------------------------------------------------------------

SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 190), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle"]
HALF = {"large": 8, "small": 4}  # half the side of the shape's bounding box, in pixels
CENTRES = [11, 32, 53]  # cell centres of the 3x3 grid, in pixels
ROWS, COLS = ["top", "middle", "bottom"], ["left", "middle", "right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# Held out of every visual *output* in train (they still appear in understanding data): test of Sec. 3.1.
HELDOUT_COMBOS = [("purple", "circle"), ("orange", "square"), ("yellow", "triangle")]

# World knowledge, in corpus.txt only (never in image data): test of Sec. 4.2-4.3.
COLOUR_OF = {"lime": "green", "frog": "green", "leaf": "green", "banana": "yellow", "lemon": "yellow",
             "tomato": "red", "strawberry": "red", "cherry": "red", "blueberry": "blue", "sapphire": "blue",
             "grape": "purple", "plum": "purple", "eggplant": "purple", "carrot": "orange", "pumpkin": "orange",
             "tangerine": "orange"}
SHAPE_OF = {"wheel": "circle", "coin": "circle", "plate": "circle", "dice face": "square", "chessboard tile": "square",
            "stamp": "square", "slice of pizza": "triangle", "yield sign": "triangle", "sail": "triangle"}
CORNERS = {"circle": "no", "square": "four", "triangle": "three"}


def position_name(x, y):
    row, col = ROWS[min(2, int(y * 3 // SIZE))], COLS[min(2, int(x * 3 // SIZE))]
    return "center" if row == col == "middle" else f"{row} {col}"


POSITIONS = [position_name(x, y) for y in CENTRES for x in CENTRES]


# ---- rendering -------------------------------------------------------------------------------------------------------
def render(scene, size=SIZE):
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene:
        h, x, y, fill = HALF[o["size"]], o["x"], o["y"], COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse([x - h, y - h, x + h, y + h], fill=fill)
        elif o["shape"] == "square":
            draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
        else:
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
    return img


def zoom(img, x, y, box=24, size=SIZE, resample=Image.NEAREST):
    """Visual thinking: a box x box square around (x, y), kept inside the picture, blown up to size x size."""
    x0 = min(max(x - box // 2, 0), img.width - box)
    y0 = min(max(y - box // 2, 0), img.height - box)
    return img.crop((x0, y0, x0 + box, y0 + box)).resize((size, size), resample)


# ---- the scene reader (GenEval-style scoring of generated pictures) -------------------------------------------------
def read_scene(img, min_area=12):
    """Every object in a picture: shape, colour, size, centre and grid position, read back from the pixels."""
    a = np.asarray(img.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    foreground = np.abs(a - np.array(BACKGROUND, dtype=np.float32)).sum(-1) > 120
    nearest = ((a[:, :, None, :] - palette[None, None]) ** 2).sum(-1).argmin(-1)
    label = np.where(foreground, nearest, -1)
    seen, objects = np.zeros_like(foreground), []
    for sy, sx in zip(*np.nonzero(foreground)):
        if seen[sy, sx]:
            continue
        pixels, stack, seen[sy, sx] = [], [(sy, sx)], True  # flood fill one same-coloured component
        while stack:
            py, px = stack.pop()
            pixels.append((py, px))
            for qy, qx in ((py + 1, px), (py - 1, px), (py, px + 1), (py, px - 1)):
                if 0 <= qy < SIZE and 0 <= qx < SIZE and not seen[qy, qx] and label[qy, qx] == label[sy, sx]:
                    seen[qy, qx] = True
                    stack.append((qy, qx))
        if len(pixels) < min_area:
            continue
        ys, xs = np.array(pixels).T
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        fill = len(pixels) / (w * h)
        shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
        cx, cy = (xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2
        objects.append({"shape": shape, "colour": list(COLOURS)[label[sy, sx]], "size": "large" if max(w, h) > 13 else
                        "small", "x": float(cx), "y": float(cy), "position": position_name(cx, cy)})
    return sorted(objects, key=lambda o: (POSITIONS.index(o["position"]), o["x"]))


def compare_scenes(target, read):
    """How a picture's scene (read back by read_scene) matches the scene it should show (GenEval-style). For each
    target object, at its grid cell: `position` something is there; `shape`, `colour`, `size` something there has it
    right; `shape_colour` and `object` one thing there has both, or all three. For the picture: `count` as many
    objects as the target; `scene` every object right and nothing else. Returns (per-object dicts, picture dict)."""
    objects = []
    for o in target:
        here = [r for r in read if r["position"] == position_name(o["x"], o["y"])]
        right = lambda *keys: any(all(r[k] == o[k] for k in keys) for r in here)
        objects.append({"position": bool(here), "shape": right("shape"), "colour": right("colour"),
                        "size": right("size"), "shape_colour": right("shape", "colour"),
                        "object": right("shape", "colour", "size")})
    count = len(read) == len(target)
    return objects, {"count": count, "scene": count and all(o["object"] for o in objects)}


# ---- scenes and their language ---------------------------------------------------------------------------------------
def is_val_scene(key):
    """A scene (or a video's frames) belongs to val or to train by a hash of its description: the split is a property
    of the scene, so the same picture can never be in both."""
    return zlib.crc32(key.encode()) % val_share == 0


def scene_keys(name, scenes):
    """What decides a sample's split: each still scene's description; a video's frames together (one key)."""
    if name.startswith("video"):
        return ["|".join(sorted(describe(s) for s in scenes))]
    return [describe(s) for s in scenes if s and "x" in s[0]]  # (a visual-thinking crop is part of its scene)


def split_scene(rng, split, n=None, avoid=()):
    """A random scene of the given split ("train" or "val")."""
    while True:
        scene = random_scene(rng, n, avoid)
        if is_val_scene(describe(scene)) == (split == "val"):
            return scene


def random_object(rng, x, y, avoid=()):
    while True:
        o = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": rng.choice(list(HALF)),
             "x": x, "y": y}
        if (o["colour"], o["shape"]) not in avoid:
            return o


def random_scene(rng, n=None, avoid=()):
    cells = rng.sample([(x, y) for y in CENTRES for x in CENTRES], n or rng.randint(1, 3))
    scene = [random_object(rng, x, y, avoid) for x, y in cells]
    return sorted(scene, key=lambda o: (o["y"], o["x"]))  # reading order


def phrase(o, with_position=True):
    text = f"a {o['size']} {o['colour']} {o['shape']}"
    return f"{text} in the {position_name(o['x'], o['y'])}" if with_position else text


def listing(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene):
    return listing([phrase(o) for o in scene])


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def reference(o, scene, hide=None):
    """The shortest description that picks o out of scene without naming its attribute `hide`:
    'the circle', 'the red circle', 'the circle in the top left'; None if there is none."""
    for keys in (["shape"], ["colour", "shape"], ["size", "shape"], ["size", "colour", "shape"]):
        if hide not in keys and sum(all(p[k] == o[k] for k in keys) for p in scene) == 1:
            return "the " + " ".join(o[k] for k in keys)
    if hide != "position":
        return f"the {o['shape']} in the {position_name(o['x'], o['y'])}"


CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Give a short caption for this image.",
                   "Write one sentence about the image.", "What do you see?"]
CAPTION_TEMPLATES = ["There is {}.", "The picture shows {}.", "An image of {}.", "{}.", "We can see {}."]
GEN_PROMPTS = ["Generate an image of {}.", "Draw {}.", "Create a picture showing {}.", "Can you make an image of {}?",
               "Please paint {}.", "Show me {}."]
GEN_RESPONSES = ["Here is an image based on your request: <image>", "Sure, here it is: <image>", "<image>",
                 "Here you go: <image>"]


def caption(rng, scene):
    text = rng.choice(CAPTION_TEMPLATES).format(describe(scene))
    return text[0].upper() + text[1:]


def generation_turns(rng, request):
    return [rng.choice(GEN_PROMPTS).format(request), rng.choice(GEN_RESPONSES)]


# The turns of the other tasks, in one place: prepare.py phrases real data the same way.
def video_qa_turns(n_frames, question, answer):
    return ["<image>" * n_frames + f"\nThese are the frames of a video. {question}", answer]


def edit_turns(instruction):
    return [f"<image>\n{instruction}", "<image>"]  # App. C: "<image> Make this a rainy day." -> "<image>"


def thinking_turns(question, answer):
    return [f"<image>\nThink visually before you answer. {question}", f"<image>\n{answer}"]


VIDEO_PREDICTIONS = ["forward", "partial", "reverse", "reorder"]


def frame_prediction(rng, kind, frames):
    """App. C.2: one of the four video prediction tasks on a clip of frames (scenes or image paths alike):
    ([human, gpt], the frames in placeholder order)."""
    n = len(frames)
    if kind == "forward":
        shown, target, ask = frames[:-1], frames[-1:], "What is the next frame of this video?"
    elif kind == "reverse":
        shown, target, ask = frames[1:], frames[:1], "These are the last frames of a video. What frame came before them?"
    elif kind == "partial":
        k = rng.randrange(1, n - 1)
        shown, target = frames[:k] + frames[k + 1:], frames[k:k + 1]
        ask = f"Frame {k + 1} of this video is missing. What is frame {k + 1}?"
    else:
        order = list(range(n))
        while order == sorted(order):
            rng.shuffle(order)
        shown, target, ask = [frames[i] for i in order], frames, "These video frames are shuffled. Put them in order."
    return ["<image>" * len(shown) + "\n" + ask, "<image>" * len(target)], shown + target


# ---- the tasks: each returns ([human, gpt, human, gpt, ...] texts, images, meta) -----------------------------------
def task_caption(rng, avoid):
    scene = random_scene(rng)
    return [f"<image>\n{rng.choice(CAPTION_PROMPTS)}", caption(rng, scene)], [render(scene)], {"scenes": [scene]}


def image_question(rng, scene, qtype):
    """(question, answer) of one type about scene, or None if scene cannot pose it without giving the answer away.
    App. C.2: short answers; multiple choice answered with a letter."""
    o = rng.choice(scene)
    pos = position_name(o["x"], o["y"])
    if qtype == "count":
        key = rng.choice(["all", "colour", "shape"])
        if key == "all":
            return rng.choice(["How many shapes are there?", "How many objects are in the image?"]), NUMBERS[len(scene)]
        value = rng.choice(list(COLOURS) if key == "colour" else SHAPES)
        noun = f"{value} shapes" if key == "colour" else f"{value}s"
        return f"How many {noun} are there?", NUMBERS[sum(p[key] == value for p in scene)]
    if qtype == "yes_no":
        probe = o if rng.random() < 0.5 else random_object(rng, 0, 0)
        present = any(p["colour"] == probe["colour"] and p["shape"] == probe["shape"] for p in scene)
        return f"Is there {article(probe['colour'])} {probe['colour']} {probe['shape']}?", "yes" if present else "no"
    key = rng.choice(["colour", "shape", "position"]) if qtype == "multiple_choice" else qtype
    ref = reference(o, scene, hide=key)
    if ref is None:
        return None
    question = {"colour": f"What colour is {ref}?", "shape": f"What shape is in the {pos}?",
                "position": f"Where is {ref}?", "size": f"Is {ref} large or small?"}[key]
    truth = pos if key == "position" else o[key]
    if qtype != "multiple_choice":
        return question, truth
    pool = {"colour": list(COLOURS), "shape": SHAPES, "position": POSITIONS}[key]
    options = rng.sample([p for p in pool if p != truth], min(3, len(pool) - 1)) + [truth]
    rng.shuffle(options)
    choices = "\n".join(f"{'ABCD'[i]}. {opt}" for i, opt in enumerate(options))
    return (f"{question}\n{choices}\nAnswer with the option's letter from the given choices directly.",
            "ABCD"[options.index(truth)])


QA_TYPES = ["colour", "shape", "count", "position", "size", "yes_no", "multiple_choice"]


def scene_questions(rng, scene, max_turns=4):
    """One to max_turns different questions about scene and their answers: ([q, a, q, a, ...], question types)."""
    turns, qtypes = [], []
    for _ in range(rng.randint(1, max_turns)):
        qa = None
        while qa is None or qa[0] in turns:  # a type this scene cannot pose, or a repeat: another one
            qtype = rng.choice(QA_TYPES)
            qa = image_question(rng, scene, qtype)
        turns += list(qa)
        qtypes.append(qtype)
    return turns, qtypes


def task_image_qa(rng, avoid):
    """One picture, one to four questions about it (LLaVA-style multi-turn: more answers per image)."""
    scene = random_scene(rng)
    turns, qtypes = scene_questions(rng, scene)
    turns[0] = f"<image>\n{turns[0]}"
    return turns, [render(scene)], {"qtype": qtypes[0], "qtypes": qtypes, "scenes": [scene]}


DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def random_video(rng, n_frames, n_objects, avoid=(), staggered=False):
    """Frames of objects gliding in straight lines from one side of the grid to the other (no two ever touch).
    staggered: the first object moves in the first half of the video, the second in the second half."""
    while True:
        movers = []
        for _ in range(n_objects):
            direction, lane = rng.choice(list(DIRECTIONS)), rng.choice(CENTRES)
            dx, dy = DIRECTIONS[direction]
            x = lane if dx == 0 else CENTRES[0] if dx > 0 else CENTRES[-1]
            y = lane if dy == 0 else CENTRES[0] if dy > 0 else CENTRES[-1]
            movers.append((random_object(rng, x, y, avoid), direction))
        if len({(o["colour"], o["shape"]) for o, _ in movers}) < n_objects:
            continue
        frames = []
        for t in range(n_frames):
            scene = []
            for i, (o, direction) in enumerate(movers):
                progress = t / (n_frames - 1)
                if staggered:
                    progress = min(max(2 * progress - i, 0.0), 1.0)
                dx, dy = DIRECTIONS[direction]
                step = round(progress * (CENTRES[2] - CENTRES[0]))
                scene.append(dict(o, x=o["x"] + dx * step, y=o["y"] + dy * step))
            frames.append(scene)
        if all(abs(a["x"] - b["x"]) > 2 * HALF["large"] + 2 or abs(a["y"] - b["y"]) > 2 * HALF["large"] + 2
               for scene in frames for i, a in enumerate(scene) for b in scene[i + 1:]):
            return frames, [d for _, d in movers]


def task_video_qa(rng, avoid):
    n = rng.randint(4, 8)
    if rng.random() < 0.5:
        frames, directions = random_video(rng, n, rng.randint(1, 2))
        i = rng.randrange(len(directions))
        o = frames[0][i]
        question = f"Which way is the {o['colour']} {o['shape']} moving?"
        answer, qtype = directions[i], "direction"
    else:
        frames, _ = random_video(rng, n, 2, staggered=True)
        a, b = frames[0]
        names = [f"the {a['colour']} {a['shape']}", f"the {b['colour']} {b['shape']}"]
        shown = names if rng.random() < 0.5 else names[::-1]
        question, answer, qtype = f"Which moves first, {shown[0]} or {shown[1]}?", names[0][4:], "order"
    return video_qa_turns(n, question, answer), [render(s) for s in frames], {"qtype": qtype, "scenes": frames}


def task_generation(rng, avoid):
    scene = random_scene(rng, avoid=avoid)
    return generation_turns(rng, describe(scene)), [render(scene)], {"scenes": [scene]}


def edit_instruction(rng, scene, avoid):
    """(instruction, edited scene) for one of: recolour, move, add, remove, change shape."""
    o = rng.choice(scene)
    ref, rest = reference(o, scene), [p for p in scene if p is not o]
    free = [(x, y) for y in CENTRES for x in CENTRES if all((p["x"], p["y"]) != (x, y) for p in scene)]
    kinds = ["recolour", "move", "change_shape"] + (["add"] if free else []) + (["remove"] if len(scene) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "recolour":
        colour = rng.choice([c for c in COLOURS if c != o["colour"] and (c, o["shape"]) not in avoid])
        return f"Make {ref} {colour}.", rest + [dict(o, colour=colour)]
    if kind == "change_shape":
        shape = rng.choice([s for s in SHAPES if s != o["shape"] and (o["colour"], s) not in avoid])
        return f"Turn {ref} into a {shape}.", rest + [dict(o, shape=shape)]
    if kind == "remove":
        return f"Remove {ref}.", rest
    x, y = rng.choice(free) if free else (o["x"], o["y"])
    if kind == "move" and free:
        return f"Move {ref} to the {position_name(x, y)}.", rest + [dict(o, x=x, y=y)]
    new = random_object(rng, x, y, avoid)
    return f"Add {phrase(new)}.", scene + [new]


def task_image_edit(rng, avoid):
    scene = random_scene(rng, avoid=avoid)
    instruction, edited = edit_instruction(rng, scene, avoid)
    edited = sorted(edited, key=lambda o: (o["y"], o["x"]))
    return edit_turns(instruction), [render(scene), render(edited)], {"scenes": [scene, edited]}


def task_video_prediction(rng, avoid):
    """App. C.2: forward prediction, partial-sequence completion, reverse prediction, temporal reordering."""
    kind, n = rng.choice(VIDEO_PREDICTIONS), rng.randint(4, 5)
    frames, _ = random_video(rng, n, rng.randint(1, 2), avoid)
    turns, ordered = frame_prediction(rng, kind, frames)
    return turns, [render(s) for s in ordered], {"qtype": kind, "scenes": ordered}


def task_visual_thinking(rng, avoid):
    scene = random_scene(rng, rng.randint(2, 3), avoid=avoid)
    o = rng.choice(scene)
    pos = position_name(o["x"], o["y"])
    key = rng.choice(["colour", "shape"])
    question = f"What colour is the {o['size']} shape in the {pos}?" if key == "colour" else \
        f"What shape is the {o['colour']} object in the {pos}?"
    img = render(scene)
    crop = {"zoom_of": pos, "shape": o["shape"], "colour": o["colour"]}
    return thinking_turns(question, o[key]), [img, zoom(img, o["x"], o["y"])], {"qtype": key, "scenes": [scene, [crop]]}


def riddle(rng, avoid=()):
    """(request, scene): one object named only through the facts ("a small shape like a coin in the colour of a lime,
    in the center")."""
    clues = {f"shape with {c} corners": s for s, c in CORNERS.items()}
    clues.update({f"shape like {article(t)} {t}": s for t, s in SHAPE_OF.items()})
    while True:
        thing, clue = rng.choice(list(COLOUR_OF)), rng.choice(list(clues))
        if (COLOUR_OF[thing], clues[clue]) not in avoid:
            break
    size, (x, y) = rng.choice(list(HALF)), rng.choice([(x, y) for y in CENTRES for x in CENTRES])
    request = f"a {size} {clue} in the colour of {article(thing)} {thing}, in the {position_name(x, y)}"
    return request, [{"shape": clues[clue], "colour": COLOUR_OF[thing], "size": size, "x": x, "y": y}]


def task_generation_riddle(rng, avoid):
    """Sec. 4.2-4.3: the answer follows only from corpus facts, never from image data."""
    request, scene = riddle(rng, avoid)
    return generation_turns(rng, request), [render(scene)], {"scenes": [scene]}


def task_generation_heldout(rng, avoid):
    """Sec. 3.1: compositions seen in understanding data but never as a generation target."""
    colour, shape = rng.choice(HELDOUT_COMBOS)
    while True:
        scene = random_scene(rng)
        if not any((o["colour"], o["shape"]) in HELDOUT_COMBOS for o in scene):
            break
    scene[0] = dict(scene[0], colour=colour, shape=shape)
    return generation_turns(rng, describe(scene)), [render(scene)], {"scenes": [scene]}


TASKS = {"caption": task_caption, "image_qa": task_image_qa, "video_qa": task_video_qa,
         "generation": task_generation, "image_edit": task_image_edit, "video_prediction": task_video_prediction,
         "visual_thinking": task_visual_thinking}
HELDOUT = {"generation_heldout": task_generation_heldout, "generation_riddle": task_generation_riddle}


# ---- writing ---------------------------------------------------------------------------------------------------------
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


def facts():
    """(prompt, answer) pairs of the fact base and arithmetic: the stand-in LLM must complete prompt with answer."""
    pairs = []
    for thing, colour in COLOUR_OF.items():
        a = article(thing)
        pairs += [(f"{a} {thing} is", colour), (f"the colour of {a} {thing} is", colour)]
    for thing, shape in SHAPE_OF.items():
        a = article(thing)
        pairs += [(f"{a} {thing} is shaped like a", shape), (f"the shape of {a} {thing} is a", shape)]
    for shape, corners in CORNERS.items():
        pairs += [(f"a {shape} has", f"{corners} corners"), (f"a shape with {corners} corners is a", shape)]
    for a in range(6):
        for b in range(6):
            pairs.append((f"{NUMBERS[a]} plus {NUMBERS[b]} is", NUMBERS[a + b]))
    return pairs


# ---- text-only conversations: the stand-in LLM's prior (pretrain_tiny.py) -----------------------------------------
SCENE_INTROS = ["Scene: {}.", "Picture this: {}.", "In a picture there is {}.", "Imagine {}."]
KEYS = [f"{box} {n}" for box in ("box", "card", "slot") for n in NUMBERS[1:]]


def text_scene_qa(rng, split):
    """A scene in words, then one to four questions answered from the words (image_qa's questions, and
    visual_thinking's "the small shape in the center")."""
    scene = split_scene(rng, split)
    turns, _ = scene_questions(rng, scene)
    if rng.random() < 0.25:
        o = rng.choice(scene)
        pos = position_name(o["x"], o["y"])
        turns[:2] = [f"What colour is the {o['size']} shape in the {pos}?", o["colour"]] if rng.random() < 0.5 else \
            [f"What shape is the {o['colour']} object in the {pos}?", o["shape"]]
    turns[0] = rng.choice(SCENE_INTROS).format(describe(scene)) + "\n" + turns[0]
    return turns


def text_video_qa(rng, split):
    """video_qa's questions about frames written as words."""
    while True:
        turns, images, meta = task_video_qa(rng, ())
        if is_val_scene(scene_keys("video_qa", meta["scenes"])[0]) == (split == "val"):
            break
    frames = "\n".join(f"Frame {t + 1}: {describe(s)}." for t, s in enumerate(meta["scenes"]))
    return [f"{frames}\nThese are the frames of a video. {turns[0].split('video. ', 1)[1]}", turns[1]]


def text_keyed_copy(rng, split):
    """Keyed copying: a few labelled things, then one asked for by its label (the retrieval a reply needs)."""
    keys = rng.sample(KEYS, rng.randint(2, 6))
    values = [describe(split_scene(rng, "train", 1)) for _ in keys]
    lines = "\n".join(f"{k}: {v}." for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return [f"Remember these.\n{lines}\nWhat is in {keys[i]}?", values[i]]


def text_repeat(rng, split):
    """A scene's description said back word for word: copying, the cheapest lesson in attending to the context."""
    text = describe(split_scene(rng, "train"))
    return [f"Repeat this exactly: {text}.", text]


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
    return turns


def text_riddle(rng, split):
    """A riddle's request said plainly: the facts composed into a scene description (Sec. 4.3's reasoning, in words)."""
    while True:
        request, scene = riddle(rng)
        if is_val_scene(describe(scene)) == (split == "val"):
            break
    return [f"Say it plainly: {request}.", describe(scene)]


TEXT_TASKS = {"scene_qa": text_scene_qa, "video_qa": text_video_qa, "keyed_copy": text_keyed_copy,
              "repeat": text_repeat, "facts": text_facts, "riddle": text_riddle}


def write_text(path, split, counts, rng):
    """Text-only conversations in the conversation format (no images), `task` naming their kind."""
    with open(path, "w") as f:
        for name, count in counts.items():
            for i in range(count):
                turns = TEXT_TASKS[name](rng, split)
                conversations = [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(turns)]
                f.write(json.dumps({"id": f"{split}-text-{name}-{i:06d}", "task": name,
                                    "conversations": conversations}) + "\n")


def write_corpus(path, rng, n_captions, repeats):
    lines = [caption(rng, split_scene(rng, "train")) for _ in range(n_captions)]
    lines += [f"{p} {a}." for p, a in facts() for _ in range(repeats)]
    rng.shuffle(lines)
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)  # written last and whole: pipeline.py takes it to mean the world is complete


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
        write_text(os.path.join(data_dir, "text", f"{split}.jsonl"), split, counts, random.Random(f"{seed}-text-{split}"))
    write_corpus(os.path.join(data_dir, "corpus.txt"), random.Random(f"{seed}-corpus"), toy_corpus_captions,
                 toy_fact_repeats)
    scenes = [json.loads(line)["meta"]["scenes"][0] for line in open(os.path.join(data_dir, "val", "generation.jsonl"))]
    accuracy = scene_reader_accuracy(scenes)
    print(f"wrote {sum(c for _, _, c in jobs)} conversations to {data_dir}")
    print(f"scene reader accuracy on {len(scenes)} rendered val scenes: {100 * accuracy:.2f}% of objects "
          "(shape, colour, size and position all right)")


def scene_reader_accuracy(scenes):
    scores = [o["object"] for scene in scenes for o in compare_scenes(scene, read_scene(render(scene)))[0]]
    return sum(scores) / max(len(scores), 1)


if __name__ == "__main__":
    from configurator import configure

    configure(globals())
    main()
