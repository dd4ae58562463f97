"""
A dataset the project has never seen, for README's "Your own data" walkthrough: 64x64 greyscale pictures of ten
household objects (not the toy world's shapes, colours or phrasings), written straight in the conversation format
(DESIGN.md) with three tasks only: caption, image_qa and generation.

    python tests/own_data.py --out data/objects --train 2000 --val 100     # per task
"""
import argparse
import json
import math
import os
import random

from PIL import Image, ImageDraw

OBJECTS = ["cup", "key", "star", "heart", "moon", "arrow", "cross", "ring", "bolt", "house"]


def polygon(points, cx, cy, scale, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in points]


SHAPES = {  # outlines in a unit box around (0, 0)
    "cup": [(-.6, -.6), (.5, -.6), (.4, .7), (-.5, .7)],
    "key": [(-.8, -.25), (-.2, -.25), (-.2, -.1), (.8, -.1), (.8, .15), (.6, .15), (.6, .35), (.4, .35), (.4, .15),
            (-.2, .15), (-.2, .25), (-.8, .25)],
    "star": [(math.cos(a) * r, math.sin(a) * r) for k in range(10)
             for a, r in [(k * math.pi / 5 - math.pi / 2, .9 if k % 2 == 0 else .4)]],
    "heart": [(0, .8), (-.8, 0), (-.8, -.4), (-.4, -.8), (0, -.4), (.4, -.8), (.8, -.4), (.8, 0)],
    "moon": None,  # a disc with a bite of the background taken out
    "arrow": [(-.8, -.15), (.2, -.15), (.2, -.5), (.85, 0), (.2, .5), (.2, .15), (-.8, .15)],
    "cross": [(-.25, -.8), (.25, -.8), (.25, -.25), (.8, -.25), (.8, .25), (.25, .25), (.25, .8), (-.25, .8),
              (-.25, .25), (-.8, .25), (-.8, -.25), (-.25, -.25)],
    "ring": None,  # a disc with a hole
    "bolt": [(-.2, -.9), (.5, -.9), (.1, -.1), (.5, -.1), (-.3, .9), (-.05, .1), (-.45, .1)],
    "house": [(0, -.8), (.8, -.1), (.6, -.1), (.6, .8), (-.6, .8), (-.6, -.1), (-.8, -.1)],
}
SHADES = {"dark": (20, 90), "light": (170, 240)}


def picture(name, shade, rng):
    """The object in a shade of grey on a plain grey background, at a random place, size and tilt."""
    background = rng.randint(100, 150)
    image = Image.new("L", (64, 64), background)
    draw = ImageDraw.Draw(image)
    grey = rng.randint(*SHADES[shade])
    cx, cy, scale, angle = rng.uniform(24, 40), rng.uniform(24, 40), rng.uniform(14, 22), rng.uniform(-.4, .4)
    if SHAPES[name] is None:
        r = scale * .85
        hole = (cx, cy, r / 2) if name == "ring" else (cx + r * .5, cy - r * .3, r * .8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=grey)
        draw.ellipse([hole[0] - hole[2], hole[1] - hole[2], hole[0] + hole[2], hole[1] + hole[2]], fill=background)
    else:
        draw.polygon(polygon(SHAPES[name], cx, cy, scale, angle), fill=grey)
    return image.convert("RGB")


def conversations(task, name, shade, rng):
    if task == "caption":
        return [("Write a short caption for this photo.\n<image>", f"A {shade} {name} on a grey backdrop.")]
    if task == "image_qa":
        return rng.sample([("<image>\nWhich object is in this photo?", name),
                           ("<image>\nIs the object light or dark?", shade)], 1)
    return [(f"Could you sketch a {shade} {name} for me?", "Of course! Here is my sketch: <image>")]


def make(out, n_train, n_val, seed=0):
    """out/images/<split>/*.png and out/{train,val}/{caption,image_qa,generation}.jsonl."""
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        os.makedirs(os.path.join(out, split), exist_ok=True)
        for task in ("caption", "image_qa", "generation"):
            with open(os.path.join(out, split, f"{task}.jsonl"), "w") as f:
                for i in range(n):
                    name, shade = rng.choice(OBJECTS), rng.choice(list(SHADES))
                    path = f"images/{split}/{task}-{i:05d}.png"
                    picture(name, shade, rng).save(os.path.join(out, path))
                    turns = []
                    for human, gpt in conversations(task, name, shade, rng):
                        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
                    f.write(json.dumps({"id": f"{split}-{task}-{i}", "task": task, "images": [path],
                                        "conversations": turns}) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="data/objects")
    parser.add_argument("--train", type=int, default=2000, help="conversations per task")
    parser.add_argument("--val", type=int, default=100, help="conversations per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make(args.out, args.train, args.val, args.seed)
    print(f"wrote {args.out}: {args.train} train and {args.val} val conversations per task")
