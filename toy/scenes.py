"""
The toy world's scenes: a scene is a list of objects {shape, colour, size, x, y}; grid scenes put each object at the
centre of one cell of a 3x3 grid. Here: drawing a scene (render), reading one back from pixels and scoring it against
the scene it should show (read_scene, compare_scenes, scene_accuracy: GenEval-style), the train/val split of scenes,
a scene in words (describe) and as a grid of words (grid), and pictures beyond the toy world (wide_picture, for the
stand-ins' training).
toy/tasks.py makes conversations of scenes; toy/toyworld.py writes the world.
"""
import zlib
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

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
VAL_SHARE = 8  # one scene in VAL_SHARE is a val scene (by a hash of its description)


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
    return zlib.crc32(key.encode()) % VAL_SHARE == 0


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


# ---- a scene as a grid of words: the stand-in LLM's picture in text (toy/text.py) ------------------------------------
SLOT = SIZE // 8  # pixels per side of a slot: the 8x8 grid of the 64 visual tokens (encode.py)
EMPTY_SLOT = "[ ]"
SLOT_WORDS = [EMPTY_SLOT] + [f"[{s} {c} {h}]" for s in HALF for c in COLOURS for h in SHAPES]  # one token each


def slot_word(obj):
    return f"[{obj['size']} {obj['colour']} {obj['shape']}]"


def grid(scene):
    """The scene as 64 slot words in reading order, one per slot: the object covering the most of the slot if it
    covers a quarter or more of it (every object covers at least one), else EMPTY_SLOT."""
    if not scene:
        return EMPTY_SLOT * 64
    cover = np.stack([(np.asarray(render([o])) != BACKGROUND).any(-1).reshape(8, SLOT, 8, SLOT).sum((1, 3)).ravel()
                      for o in scene])
    return "".join(slot_word(scene[i]) if n >= SLOT * SLOT // 4 else EMPTY_SLOT
                   for i, n in zip(cover.argmax(0), cover.max(0)))


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


# ---- scoring a picture against the scene it should show (GenEval-style: eval.py, train_decoder.py) -------------------
SCENE_SCORES = ("position", "shape", "colour", "size", "shape_colour", "object", "count", "scene")  # compare_scenes'


def mean_of(dicts):
    """Key-wise mean of a list of dicts of numbers or booleans."""
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else {}


def names_toy_scenes(samples):
    """Whether every sample names the toy world's scenes of its pictures (meta.scenes): only there can the toy world's
    scene reader score a picture (another dataset's pictures it would misread). eval.py and train_decoder.py ask."""
    return bool(samples) and all("scenes" in s.get("meta", {}) for s in samples)


def scene_accuracy(pictures, targets):
    """Mean attribute scores over target objects and picture scores over pictures (compare_scenes); without
    pictures every score is None (n/a)."""
    if not pictures:
        return dict.fromkeys(SCENE_SCORES)
    objects, whole = [], []
    for picture, target in zip(pictures, targets):
        per_object, per_picture = compare_scenes(target, read_scene(picture))
        objects += per_object
        whole.append(per_picture)
    return {**mean_of(objects), **mean_of(whole)}


def scene_agreement(originals, decodings):
    """Toy world (GenEval-style): of the objects read_scene finds in the originals, the share that the decoding has
    with the same shape and colour at the same grid position, and the share matched on shape and colour anywhere."""
    at_position = anywhere = total = 0
    for original, decoding in zip(originals, decodings):
        want, got = read_scene(original), read_scene(decoding)
        total += len(want)
        at_position += sum(o["shape_colour"] for o in compare_scenes(want, got)[0])
        kinds = lambda objects: Counter((o["shape"], o["colour"]) for o in objects)
        anywhere += sum((kinds(want) & kinds(got)).values())
    return {"objects": total, "shape_colour_at_position": at_position / max(1, total),
            "shape_colour_anywhere": anywhere / max(1, total)}


# ---- pictures beyond the toy world -----------------------------------------------------------------------------------
# Real SigLIP and VAE keep every colour of every picture; stand-ins that saw only the toy's six colours on white turn a
# user's greyscale photos green and purple (README, "Your own data"). So a share of the pictures toy/pretrain_tiny.py
# trains them on are these.
WIDE_COLOURS = {**COLOURS, "black": (20, 20, 20), "dark grey": (80, 80, 80), "grey": (128, 128, 128),
                "light grey": (190, 190, 190), "white": (250, 250, 250), "brown": (120, 72, 30),
                "pink": (240, 140, 180), "cyan": (40, 200, 210), "navy": (20, 30, 100), "olive": (110, 120, 30)}


def colour_name(rgb):
    return min(WIDE_COLOURS, key=lambda k: sum((a - b) ** 2 for a, b in zip(WIDE_COLOURS[k], rgb)))


def random_colour(rng):
    if rng.random() < 0.3:  # greys: the colours of a greyscale photo
        return (rng.randrange(256),) * 3
    return tuple(rng.randrange(256) for _ in range(3))


def wide_picture(rng):
    """(picture, caption): one to four shapes of any colour and size anywhere, on any background."""
    background = (255, 255, 255) if rng.random() < 0.3 else random_colour(rng)
    img = Image.new("RGB", (SIZE, SIZE), background)
    draw, parts = ImageDraw.Draw(img), []
    for _ in range(rng.randint(1, 4)):
        shape, fill, h = rng.choice(SHAPES), random_colour(rng), rng.randint(3, 16)
        x, y = rng.randint(0, SIZE), rng.randint(0, SIZE)
        box = [x - h, y - h, x + h, y + h]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
        parts.append(f"{article(colour_name(fill))} {colour_name(fill)} {shape}")
    return img, f"{listing(parts)} on {article(colour_name(background))} " \
                f"{colour_name(background)} background"
