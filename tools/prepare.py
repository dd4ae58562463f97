"""
Real data in (PAPER.md "Data", App. C): converters from the public datasets' layouts into the conversation JSONL of
DESIGN.md, one subcommand per source.

    python -m tools.prepare llava    --src llava_v1_5_mix665k.json --images /datasets/llava --out data/mine   # or Cambrian
    python -m tools.prepare pairs    --src metaclip.tsv --out data/mine          # TSV/JSONL of image + caption, or a folder
    python -m tools.prepare video    --src frames/ --qa video_qa.jsonl --out data/mine
    python -m tools.prepare edit     --src instructpix2pix.jsonl --out data/mine
    python -m tools.prepare thinking --src boxes.jsonl --out data/mine

Each one streams its source (a JSON array too), so a 7M-row file never sits in memory, checks every sample as data.py
and encode.py will read it, and writes

    <out>/{train,val}/<task>[_<tag>].jsonl    the samples; image paths relative to --image_root (default: --out)
    <out>/skipped/<command>[_<tag>].jsonl     every source row it could not use: where, id, reason, detail

each to a temporary file renamed at the end. A row goes to val by a hash of its (first) image or video, so one image
lands in the same split whichever converter writes it.
"""
import argparse
import functools
import hashlib
import json
import os
import random
import re
import sys
import zlib
from collections import Counter

from PIL import Image
from tqdm import tqdm

from configurator import BadInput, run_main
from data import conversation_problem
from encode import load_image
from model import IMAGE
from toy.scenes import zoom
from toy.tasks import (CAPTION_PROMPTS, VIDEO_PREDICTIONS, edit_turns, frame_prediction, generation_turns, thinking_turns,
                       video_qa_turns)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ROLE_ALIASES = {"user": "human", "assistant": "gpt"}  # some LLaVA-style sets name the roles as chat templates do


class Skip(Exception):
    """A source row that cannot become a sample: a short reason (counted in the summary) and a detail (logged)."""

    def __init__(self, reason, detail=""):
        super().__init__(reason)
        self.reason, self.detail = reason, str(detail)


# ---- reading: every source streams, one row at a time ---------------------------------------------------------------
SEPARATORS = re.compile(r"[\s,]*")


def json_array(f, path, chunk=1 << 20):
    """(where, element) for each element of the JSON array in f (just past its "["), read chunk characters at a time."""
    decoder, buffer, pos, n = json.JSONDecoder(), "", 0, 0
    while True:
        pos = SEPARATORS.match(buffer, pos).end()
        if buffer.startswith("]", pos):
            return
        try:
            element, pos = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError as e:  # an element cut by the chunk's end, or bad JSON if the file has no more
            more = f.read(chunk)
            if not more:
                raise BadInput(f"{path}, element {n}: not valid JSON ({e})") from None
            buffer, pos = buffer[pos:] + more, 0
            continue
        yield f"{path}[{n}]", element
        n += 1


def records(path):
    """(where, row) for each row of a JSONL file or a JSON array; a line that is not JSON arrives as its Skip."""
    with open(path) as f:
        first = f.read(1)
        while first.isspace():
            first = f.read(1)
        if first == "[":
            yield from json_array(f, path)
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            try:
                yield f"{path}:{lineno}", json.loads(line) if line.strip() else Skip("empty line")
            except ValueError as e:
                yield f"{path}:{lineno}", Skip("malformed JSON", e)


def tsv_rows(path):
    """(where, {image, caption}) for each `path<TAB>caption` line; a first line `image<TAB>caption` is a header."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            image, tab, caption = line.rstrip("\n").partition("\t")
            if lineno == 1 and (image, caption) == ("image", "caption"):
                continue
            yield f"{path}:{lineno}", {"image": image, "caption": caption} if tab else Skip("not image<TAB>caption")


def folder_pairs(root):
    """(where, {image, caption}) for each picture with a same-named .txt beside it (paths relative to root); a picture
    without its .txt, or a .txt without its picture, arrives as a Skip."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        images = {}
        for n in sorted(files):
            if n.lower().endswith(IMAGE_EXTENSIONS):
                images.setdefault(os.path.splitext(n)[0], []).append(n)
        captions = {os.path.splitext(n)[0] for n in files if n.endswith(".txt")}
        for stem in sorted(images.keys() | captions):
            where = os.path.join(folder, stem)
            if len(images.get(stem, [])) > 1:
                yield where, Skip("several pictures for one caption", images[stem])
            elif stem not in captions:
                yield where, Skip("no caption file", images[stem][0])
            elif stem not in images:
                yield where, Skip("caption without image", f"{stem}.txt")
            else:
                with open(f"{where}.txt") as f:
                    caption = f.read()
                yield where, {"image": os.path.relpath(os.path.join(folder, images[stem][0]), root), "caption": caption}


def pair_rows(path):
    return folder_pairs(path) if os.path.isdir(path) else tsv_rows(path) if path.endswith(".tsv") else records(path)


def natural(name):
    """Sort key that puts frame_2 before frame_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frames_of(root, video):
    """The frame files of root/video in time order (relative to root), or Skip."""
    folder = os.path.join(root, video)
    if not os.path.isdir(folder):
        raise Skip("missing video", folder)
    frames = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural)
    if not frames:
        raise Skip("no frames", folder)
    return [os.path.join(video, n) for n in frames]


def video_folders(root):
    """(where, {video}) for each folder of frames in root."""
    for name in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, name)):
            yield os.path.join(root, name), {"video": name}


# ---- checking: what data.py and encode.py will accept ---------------------------------------------------------------
def field(row, name):
    """row[name] as stripped text, or Skip."""
    if name not in row:
        raise Skip("missing field", name)
    if not isinstance(row[name], str) or not row[name].strip():
        raise Skip("empty text", name)
    return row[name].strip()


@functools.lru_cache(maxsize=65536)  # video frames and Cambrian's images recur: read each once
def image_problem(path, decode):
    """None, or (reason, detail) for a missing image or, with decode, one PIL cannot read."""
    if not os.path.isfile(path):
        return "missing image", path
    if decode:
        try:
            load_image(path)
        except ValueError as e:
            return "unreadable image", e
    return None


def check(sample, image_root, decode):
    """Skip unless the sample is one the loader takes (data.conversation_problem) and every image is there (and
    readable)."""
    problem = conversation_problem(sample)
    if problem:
        raise Skip(*problem)
    for path in sample["images"]:
        problem = image_problem(os.path.join(image_root, path), decode)
        if problem:
            raise Skip(*problem)


# ---- the converters: one source row -> (split key, samples), or Skip ------------------------------------------------
def image_path(args, source):
    """An image named relative to --images, as the JSONL names it: relative to --image_root."""
    return os.path.relpath(os.path.join(args.images, source), args.image_root)


def row_id(args, i, row):
    return str(row.get("id", f"{args.name}-{i:08d}"))


def sample(sid, task, images, texts):
    """A sample of DESIGN.md from [human, gpt, ...] texts."""
    return {"id": sid, "task": task, "images": images,
            "conversations": [{"from": ("human", "gpt")[k % 2], "value": t} for k, t in enumerate(texts)]}


def llava_samples(args, rng, i, row):
    """LLaVA / Cambrian: `image` (a path, a list of paths, or none: a text-only conversation) and `conversations` of
    from/value turns, <image> where each image goes (LLaVA puts it in the first human turn). Rows already in this
    project's format (`images`, a list, and a `task`) are taken as they are."""
    if "video" in row:
        raise Skip("video sample", "convert videos with `python -m tools.prepare video`")
    images = (row.get("image") if "image" in row else row.get("images")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise Skip("bad image field", images)
    try:
        turns = [{"from": ROLE_ALIASES.get(t["from"], t["from"]), "value": t["value"]} for t in row["conversations"]]
    except (KeyError, TypeError) as e:
        raise Skip("not a conversation", e) from None
    task = row.get("task", args.task)
    if not isinstance(task, str) or not re.fullmatch(r"[\w-]+", task):  # it names the file the sample goes to
        raise Skip("bad task", task)
    sid, paths = row_id(args, i, row), [image_path(args, p) for p in images]
    return paths[0] if paths else sid, [{"id": sid, "task": task, "images": paths, "conversations": turns}]


def request(caption):
    """A caption as what to generate: "A puppy on the grass." -> "a puppy on the grass"."""
    return re.sub(r"^(A|An|The)\b", lambda m: m.group().lower(), caption.rstrip(" ."))


def pair_samples(args, rng, i, row):
    """An image-text pair (MetaCLIP) -> a generation conversation with varied request and reply phrasings (Sec. 2.2,
    App. C.2) and a caption conversation, stage 1's data (App. A.1)."""
    image, caption = field(row, "image"), " ".join(field(row, "caption").split())
    path, sid = image_path(args, image), f"{args.name}-{i:08d}"
    return path, [sample(f"{sid}-gen", "generation", [path], generation_turns(rng, request(caption))),
                   sample(f"{sid}-cap", "caption", [path], [f"{IMAGE}\n{rng.choice(CAPTION_PROMPTS)}", caption])]


def clip(rng, frames, clip_frames, intervals):
    """A clip of MIN..MAX frames, a sampled interval apart (frames are at 1 fps: the interval is in seconds)."""
    lo, hi = clip_frames
    fits = [(n, k) for n in range(lo, hi + 1) for k in intervals if (n - 1) * k < len(frames)]
    if not fits:
        raise Skip("too few frames", f"{len(frames)} frames; a clip needs {(lo - 1) * min(intervals) + 1}")
    n, k = rng.choice(fits)
    start = rng.randrange(len(frames) - (n - 1) * k)
    return frames[start:start + (n - 1) * k + 1:k]


def prediction_samples(args, rng, i, row):
    """App. C.2: forward prediction, partial completion, reverse prediction and reordering, one clip each."""
    frames = frames_of(args.src, row["video"])
    samples = []
    for kind in VIDEO_PREDICTIONS:
        texts, ordered = frame_prediction(rng, kind, clip(rng, frames, args.clip_frames, args.intervals))
        samples.append(sample(f"{row['video']}-{kind}", "video_prediction", [image_path(args, f) for f in ordered],
                              texts))
    return image_path(args, row["video"]), samples


def video_qa_samples(args, rng, i, row):
    """VideoQA (Sec. 2.2): each frame an image, at most --qa_frames of them spread evenly over the video."""
    video, question, answer = field(row, "video"), field(row, "question"), field(row, "answer")
    frames = frames_of(args.src, video)
    m = min(len(frames), args.qa_frames)
    picked = [image_path(args, frames[j * len(frames) // m]) for j in range(m)]
    qa = sample(row_id(args, i, row), "video_qa", picked, video_qa_turns(m, question, answer))
    return image_path(args, video), [qa]


def edit_samples(args, rng, i, row):
    """Image-to-image (App. C: InstructPix2Pix, Aurora): {source, instruction, target} -> "<image> {instruction}" ->
    "<image>"."""
    source, instruction, target = field(row, "source"), field(row, "instruction"), field(row, "target")
    return image_path(args, source), [sample(row_id(args, i, row), "image_edit",
                           [image_path(args, source), image_path(args, target)], edit_turns(instruction))]


def pixel_box(box, width, height):
    """[x0, y0, x1, y1] in pixels, clipped to the picture, or Skip."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise Skip("bad box", box) from None
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise Skip("bad box", box)
    return x0, y0, x1, y1


def thinking_samples(args, rng, i, row):
    """Visual thinking (App. C): {image, question, answer, box} -> "Think visually ..." -> the zoomed-in crop of the
    box (saved as a picture under <out>/images/), then the answer."""
    image, question, answer = field(row, "image"), field(row, "question"), field(row, "answer")
    try:
        picture = load_image(os.path.join(args.images, image))
    except (FileNotFoundError, ValueError) as e:
        raise Skip("missing image" if isinstance(e, FileNotFoundError) else "unreadable image", e) from None
    x0, y0, x1, y1 = pixel_box(row.get("box"), *picture.size)
    side = min(max(x1 - x0, y1 - y0), *picture.size)  # the box, squared
    # named by what it shows, not by row number: encode.py's cache keeps a path's tokens, so a path keeps its pixels
    name = hashlib.sha1(json.dumps([image, [x0, y0, x1, y1]]).encode()).hexdigest()[:20]
    crop = os.path.join(args.crops, f"{name}.png")
    zoom(picture, (x0 + x1) // 2, (y0 + y1) // 2, side, min(picture.size), Image.BICUBIC).save(crop)
    return image_path(args, image), [sample(row_id(args, i, row), "visual_thinking",
                          [image_path(args, image), os.path.relpath(crop, args.image_root)],
                          thinking_turns(question, answer))]


def sources(args):
    """(rows, converter) pairs of a command."""
    if args.command == "video":
        return [(video_folders(args.src), prediction_samples)] + ([(records(args.qa), video_qa_samples)] if args.qa
                                                                   else [])
    rows = pair_rows(args.src) if args.command == "pairs" else records(args.src)
    return [(rows, {"llava": llava_samples, "pairs": pair_samples, "edit": edit_samples,
                    "thinking": thinking_samples}[args.command])]


# ---- writing ---------------------------------------------------------------------------------------------------------
class Output:
    """One run's files, <out>/<split>/<task>[_<tag>].jsonl and the skip log, each written to a .tmp file and renamed by
    close(), which prints the summary."""

    def __init__(self, args):
        self.out, self.suffix, self.val = args.out, f"_{args.tag}" if args.tag else "", args.val
        self.files, self.written, self.skipped, self.rows = {}, Counter(), Counter(), 0
        self.log_path = os.path.join(args.out, "skipped", f"{args.name}.jsonl")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.log = open(f"{self.log_path}.tmp", "w")

    def path(self, split, task):
        return os.path.join(self.out, split, f"{task}{self.suffix}.jsonl")

    def add(self, key, samples):
        """One source row's samples, all to the split its key hashes to: the path of its (first) image as the JSONL
        names it, normalised, so an image goes to one split whichever source or converter names it, and however."""
        split = "val" if zlib.crc32(key.encode()) < self.val * 2 ** 32 else "train"
        for s in samples:
            if (split, s["task"]) not in self.files:  # both splits, so that val/<task>.jsonl exists even if empty
                for name in ("train", "val"):
                    os.makedirs(os.path.join(self.out, name), exist_ok=True)
                    self.files[name, s["task"]] = open(f"{self.path(name, s['task'])}.tmp", "w")
            self.files[split, s["task"]].write(json.dumps(s) + "\n")
            self.written[split, s["task"]] += 1

    def skip(self, where, row, error):
        self.skipped[error.reason] += 1
        sid = row.get("id") if isinstance(row, dict) else None
        self.log.write(json.dumps({"where": where, "id": sid, "reason": error.reason, "detail": error.detail}) + "\n")

    def close(self):
        for (split, task), f in self.files.items():
            f.close()
            os.replace(f.name, self.path(split, task))
        self.log.close()
        os.replace(self.log.name, self.log_path)
        for task in sorted({task for _, task in self.files}):
            print(f"{task}: {self.written['train', task]} train, {self.written['val', task]} val -> "
                  f"{self.path('{train,val}', task)}")
        print(f"skipped {self.skips()}: listed in {self.log_path}")

    def skips(self):
        """"7 of 13 rows (4 missing image, 3 empty text)": how many rows were skipped, of how many, by reason."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        return f"{sum(self.skipped.values())} of {self.rows} rows" + (f" ({reasons})" if reasons else "")


def convert(output, rows, make, image_root, decode, desc):
    """Every row through make, every sample through check; whatever fails is skipped and logged, never dropped."""
    for i, (where, row) in enumerate(tqdm(rows, desc=desc, unit=" rows")):
        output.rows += 1
        try:
            if isinstance(row, Skip):
                raise row
            if not isinstance(row, dict):
                raise Skip("not a JSON object", type(row).__name__)
            key, samples = make(i, row)
            for s in samples:
                check(s, image_root, decode)
            output.add(key, samples)
        except Skip as e:
            output.skip(where, row, e)


# ---- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Convert public datasets' layouts into conversation JSONL.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--src", required=True, help="the source file (JSONL, JSON array, TSV) or folder")
    common.add_argument("--out", required=True, help="the data_dir to write")
    common.add_argument("--images", help="the folder --src names images relative to (default: --src's folder; "
                                         "video: --src)")
    common.add_argument("--image_root", help="write image paths relative to this: encode.py's image_root (default: "
                                             "--out)")
    common.add_argument("--tag", default="", help="write <task>_<tag>.jsonl, so two sources of one task sit side by "
                                                  "side (list both in the mixture)")
    common.add_argument("--val", type=float, default=0.01,
                        help="fraction of rows for val/, by a hash of the image (default: %(default)s)")
    common.add_argument("--seed", type=int, default=1337, help="for the phrasings and the clips (default: %(default)s)")
    common.add_argument("--max_skipped", type=float, default=0.1,
                        help="fail (exit status 2) when more than this fraction of the rows is skipped, or all are "
                             "(default: %(default)s)")
    common.add_argument("--fast", action="store_true", help="only check that images exist, do not decode them "
                                                            "(an unreadable one then stops encode.py, which names it)")
    commands = parser.add_subparsers(dest="command", required=True)
    llava = commands.add_parser("llava", parents=[common], help="LLaVA / Cambrian instruction JSON or JSONL")
    llava.add_argument("--task", default="image_qa", help="the task of rows that name none: image_qa, or caption for a "
                                                      "caption set (LLaVA-Pretrain); default: %(default)s")
    commands.add_parser("pairs", parents=[common], help="image-text pairs: a folder of x.jpg + x.txt, a TSV of "
                                                        "image<TAB>caption, or JSONL of {image, caption}")
    video = commands.add_parser("video", parents=[common], help="a folder of folders of frames at 1 fps")
    video.add_argument("--qa", help="JSONL of {video, question, answer}; video names a folder in --src")
    video.add_argument("--qa_frames", type=int, default=16,
                       help="most frames of a video_qa sample (default: %(default)s)")
    video.add_argument("--clip_frames", type=int, nargs=2, default=[4, 8], metavar=("MIN", "MAX"),
                       help="frames in a video_prediction clip (at least 3; default: %(default)s)")
    video.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3],
                       help="seconds between a clip's frames, one sampled per clip (App. C.2; default: %(default)s)")
    commands.add_parser("edit", parents=[common], help="JSONL of {source, instruction, target} (InstructPix2Pix)")
    commands.add_parser("thinking", parents=[common], help="JSONL of {image, question, answer, box: [x0, y0, x1, y1] "
                                                           "in pixels}")
    args = parser.parse_args(argv)
    if not os.path.exists(args.src):
        parser.error(f"--src {args.src} not found")
    if args.command == "video" and (not os.path.isdir(args.src) or args.clip_frames[0] < 3):
        parser.error("video: --src must be a folder of frame folders, and --clip_frames at least 3")
    if args.command == "video" or not args.images:  # a video's frames are in its folder under --src
        args.images = args.src if os.path.isdir(args.src) else os.path.dirname(args.src)
    args.image_root = args.image_root or args.out
    args.name = f"{args.command}_{args.tag}" if args.tag else args.command
    args.crops = os.path.join(args.out, "images", args.name)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == "thinking":
        os.makedirs(args.crops, exist_ok=True)
    output, rng = Output(args), random.Random(args.seed)
    for rows, make in sources(args):
        convert(output, rows, functools.partial(make, args, rng), args.image_root, not args.fast, args.command)
    output.close()
    skipped = sum(output.skipped.values())
    if skipped == output.rows or skipped > args.max_skipped * output.rows:  # all of them, or too many
        print(f"error: skipped {output.skips()}: all, or more than --max_skipped={args.max_skipped} of them; "
              f"each row's reason is in {output.log_path}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    run_main(main)
