"""
Every data category of MetaMorph (PAPER.md Sec. 2.2, App. C) as toy-world conversations: each task returns
([human, gpt, human, gpt, ...] texts, images, meta). The turns of each kind are phrased in one place, so
tools/prepare.py phrases real data the same way. Also the world knowledge (facts) and riddles made of it (Sec. 4.2-4.3).
"""
from data import with_options
from toy.scenes import (CENTRES, COLOURS, CORNERS, COLOUR_OF, HALF, HELDOUT_COMBOS, NUMBERS, POSITIONS, SHAPE_OF,
                        SHAPES, article, describe, phrase, position_name, random_object, random_scene, reference,
                        render, zoom)

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


# The turns of the other tasks, in one place: tools/prepare.py phrases real data the same way.
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
    return with_options(question, options), "ABCD"[options.index(truth)]


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
