"""
The paper's findings in miniature (PAPER.md "Findings", Sec. 3): retrain stage 2 on different data mixes, evaluate
each run with eval.py, and write a markdown table and a bar chart per study.

    python -m tools.ablate                          # the studies below, on the finished toy run's cache, adapter and decoder
    python -m tools.ablate --studies="['tab5']"     # one study

Every run is a real `python train_vpit.py` (one epoch over its mix, as the paper trains, without the toy config's
generation lead-in and drawn-token dropout; tab4_steps and tab6_steps instead train each mix for the same number of
steps, enough for the toy to draw; tab4_departures and tab6_departures are those two with configs/tiny.py's drawn-token
dropout, without which no toy run draws an object, and its lead-in's learning rate for the constant phase;
tab3_departures is Tab. 3's pair trained that way) in out_dir/ablate/<run>/, sharing the main run's token cache, stage-1
adapter and decoder (the decoder never sees the LLM, so one serves every run); a run already evaluated is not run again.
Each run is made once per seed in ablate_seeds (the order of the data); a table shows the mean and, after "±", half the
spread (max - min) of the seeds. Results go to ablate_dir/<study>.md and .png and are listed in ablate_dir/README.md.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------------------------------------------------
out_dir = "out/tiny"  # the finished main run: its tokens/, adapter/ and decoder/ are shared
ablate_dir = "ablations"  # tables and charts (committed); the runs themselves go to out_dir/ablate/<run>
studies = ["tab4_departures", "tab6_departures", "tab3_departures", "tab3", "tab4_steps", "tab6_steps"]  # also "tab4",
# "tab5", "tab6": one epoch per mix, as the paper
ablate_seeds = [1337, 1338]  # every run once per seed: a finding is a gap larger than the seeds' spread
ablate_dropout = 0.5  # *_departures studies: drawn_token_dropout, as configs/tiny.py (docs/devlog.md)
ablate_lead_in_lr = 1e-3  # *_departures studies: the constant phase's learning rate, as configs/tiny.py's lead-in
ablate_equal_steps = 2000  # tab4_steps, tab6_steps: optimizer steps per run (the toy's drawing needs ~1,500 to read the words)
train_only = False  # True: train every run's stage 2 and stop (e.g. while the decoder, which eval needs, still trains)
ablate_eval_understanding = {"image_qa": 100}
ablate_eval_generation = {"generation": 32, "generation_heldout": 32, "generation_riddle": 32}
config_file = "configs/tiny.py"  # set by configure() to the config file in use; every run gets it too
# ---------------------------------------------------------------------------------------------------------------------
G, U = "generation", "image_qa"


def equal_steps(name, mixture, extra=(), batch_size=16):
    """A run of about ablate_equal_steps optimizer steps on one mix, whatever its size: the mix as a constant-lr lead-in
    for as many epochs as that takes, then its usual one-epoch stage 2 (cosine decay)."""
    epochs = max(1, round(ablate_equal_steps * batch_size / sum(mixture.values())) - 1)
    return f"{name}-{ablate_equal_steps}steps", mixture, [*extra, f"--vpit_lead_in={mixture}",
                                                          f"--vpit_lead_in_epochs={epochs}",
                                                          f"--vpit_batch_size={batch_size}"]  # the batch counted on


def departures_study(title, runs):
    """A study of the runs at equal steps with configs/tiny.py's drawn-token dropout (a drawn token read back as a
    blank in training) and its lead-in's learning rate for the constant phase: (title, runs)."""
    return (f"{title} at equal steps, with the toy's departures (drawn-token dropout, the lead-in's lr): "
            f"~{ablate_equal_steps:,} steps",
            [(f"{name}-departures", mixture, extra + [f"--drawn_token_dropout={ablate_dropout}",
                                                      f"--vpit_lead_in_lr={ablate_lead_in_lr}"])
             for name, mixture, extra in (equal_steps(*r) for r in runs)])


TAB4 = [("gen500", {G: 500}, []), ("gen2000", {G: 2000}, []),
        ("gen500+qa4000", {G: 500, U: 4000}, []), ("gen2000+qa4000", {G: 2000, U: 4000}, [])]
TAB3 = [("gen2000+qa4000", {G: 2000, U: 4000}, []), ("gen2000+qa4000-l1", {G: 2000, U: 4000}, ["--vision_loss=l1"])]
TAB6 = [("gen500+qa1000", {G: 500, U: 1000}, []), ("gen2000+qa1000", {G: 2000, U: 1000}, []),
        ("gen500+qa4000", {G: 500, U: 4000}, []), ("gen2000+qa4000", {G: 2000, U: 4000}, [])]
STUDIES = {  # study -> (title, [(run name, stage-2 mixture, extra train_vpit.py overrides)])
    "tab4": ("Tab. 4 / Finding 1: generation-only vs joint with understanding data, at two generation-set sizes", TAB4),
    "tab4_steps": ("Tab. 4 / Finding 1 at equal steps: generation-only vs joint, every run ~2,000 optimizer steps",
                   [equal_steps(name, mixture) for name, mixture, _ in TAB4]),
    "tab5": ("Tab. 5: a fixed generation set (1000) trained with each other data type alone (1000 each)",
             [("gen1000", {G: 1000}, [])] + [(f"gen1000+{t}", {G: 1000, t: 1000}, []) for t in
                                              ("image_qa", "video_qa", "video_prediction", "visual_thinking",
                                               "image_edit")]),
    "tab6": ("Tab. 6 / Findings 2-3: understanding-data size x generation-data size", TAB6),
    "tab6_steps": ("Tab. 6 / Findings 2-3 at equal steps: understanding x generation data, every run ~2,000 steps",
                   [equal_steps(name, mixture) for name, mixture, _ in TAB6]),
    "tab4_departures": departures_study("Tab. 4 / Finding 1", TAB4),
    "tab6_departures": departures_study("Tab. 6 / Findings 2-3", TAB6),
    "tab3": ("Tab. 3: cosine vs L1 vision loss (generation 2000 + image_qa 4000)", TAB3),
    "tab3_departures": departures_study("Tab. 3: cosine vs L1 vision loss", TAB3),
}


def stage(script, *args):
    subprocess.run([sys.executable, script, config_file, *args], check=True)


def code_version():
    """The commit the code is at, and the day: each run records it, so a table says which stand-ins and recipe made
    it (a run already made is not made again when the recipe changes)."""
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], stderr=subprocess.DEVNULL, text=True)
    except (OSError, subprocess.CalledProcessError):
        sha = "no git commit"
    return f"{sha.strip()} ({time.strftime('%Y-%m-%d')})"


def run_dir_of(name, seed):
    return os.path.join(out_dir, "ablate", f"{name}-seed{seed}")


def made_at(name, seed):
    path = os.path.join(run_dir_of(name, seed), "made_at.txt")
    return open(path).read().strip() if os.path.exists(path) else "unrecorded"


def run(name, mixture, extra, seed):
    """Stage 2 on the mixture, then eval.py; returns its results.json (cached)."""
    run_dir = run_dir_of(name, seed)
    results = os.path.join(run_dir, "eval", "results.json")
    if os.path.exists(results):
        return json.load(open(results))
    os.makedirs(run_dir, exist_ok=True)
    for shared in ("tokens", "adapter", "decoder"):
        if not os.path.lexists(os.path.join(run_dir, shared)):
            os.symlink(os.path.abspath(os.path.join(out_dir, shared)), os.path.join(run_dir, shared))
    if not os.path.exists(os.path.join(run_dir, "vpit", "metamorph.json")):
        print(f"\n=== {name}: stage 2 on {mixture}", flush=True)
        open(os.path.join(run_dir, "made_at.txt"), "w").write(code_version())
        stage("train_vpit.py", f"--out_dir={run_dir}", f"--vpit_data={mixture}", "--vpit_lead_in={}",
              "--vpit_lead_out={}", "--drawn_token_dropout=0.0", "--vpit_lead_in_lr=0.0", "--vpit_lead_in_frozen=[]",
              f"--seed={seed}", *extra)  # (a later --key wins)
    if train_only:
        return None
    stage("eval.py", f"--out_dir={run_dir}", f"--eval_understanding={ablate_eval_understanding}",
          f"--eval_generation={ablate_eval_generation}", "--eval_ceiling=False")
    return json.load(open(results))


def row(name, mixture, results):
    """The numbers a finding is judged by: VQA accuracy; per generation set whole-object accuracy and FD; token cosine
    drawn freely and teacher-forced, and what another sample's request costs the latter (0: the words are not read)."""
    g = results["generation"]
    return {"run": name, "mix": ", ".join(f"{t} {n}" for t, n in mixture.items()),
            "image_qa": results["understanding"]["image_qa"]["accuracy"], "drawn": g[G]["drawn"],
            **{f"{s} object": g[s]["model"]["object"] for s in ablate_eval_generation},
            **{f"{s} FD": g[s]["model"]["fd_siglip"] for s in ablate_eval_generation},
            "token cos": g[G]["token_cosine"], "forced cos": g[G]["teacher_forced_cosine"]["own"],
            "forced cos gap": g[G]["teacher_forced_cosine"]["own"] - g[G]["teacher_forced_cosine"]["other"]}


def over_seeds(rows):
    """One row from the same run's rows of several seeds: each number as (mean, half the spread); None where no seed
    has it (a metric over no drawn picture)."""
    merged = {}
    for k, v in rows[0].items():
        values = [r[k] for r in rows if r[k] is not None]
        merged[k] = v if isinstance(v, str) else (float(np.mean(values)), (max(values) - min(values)) / 2) \
            if values else None
    return merged


def table(title, rows, seeds, versions=()):
    keys = list(rows[0])
    scale = lambda k: 1 if "FD" in k or "cos" in k else 100
    digits = lambda k: 3 if scale(k) == 1 else 1
    fmt = lambda k, v: v if isinstance(v, str) else "n/a" if v is None else \
        f"{scale(k) * v[0]:.{digits(k)}f} ± {scale(k) * v[1]:.{digits(k)}f}"
    made = f" Runs made at commit {', '.join(sorted(set(versions)))}." if versions else ""
    spread = f"Mean ± half the spread of {len(seeds)} seeds ({', '.join(map(str, seeds))}).{made}"
    return "\n".join([f"## {title}", "", spread, "", "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)] +
                     ["| " + " | ".join(fmt(k, r[k]) for k in keys) + " |" for r in rows]) + "\n"


def bar_chart(title, rows, series, path, width=900, height=360):
    """Grouped bars (0-100%; token cosine x 100) of the given series for every run, drawn with PIL (no plotting
    library needed)."""
    image = Image.new("RGB", (width, height), "white")
    draw, colours = ImageDraw.Draw(image), [(66, 110, 200), (220, 120, 40), (60, 160, 90), (150, 80, 170)]
    left, bottom, top = 50, height - 70, 40
    draw.text((left, 10), title[:140], fill="black")
    for pct in range(0, 101, 25):
        y = bottom - (bottom - top) * pct / 100
        draw.line([(left, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((10, y - 6), f"{pct}%", fill="black")
    slot = (width - left - 10) / len(rows)
    bar = slot * 0.8 / len(series)
    for i, r in enumerate(rows):
        x0 = left + i * slot + slot * 0.1
        for j, key in enumerate(series):
            x = x0 + j * bar
            height_of = bottom - (bottom - top) * (r[key][0] if r[key] else 0)  # (None, nothing drawn: no bar)
            draw.rectangle([x, height_of, x + bar - 2, bottom], fill=colours[j % len(colours)])
        draw.text((x0, bottom + 6 + 12 * (i % 2)), r["run"][:24], fill="black")
    for j, key in enumerate(series):
        draw.rectangle([left + j * 200, height - 22, left + j * 200 + 10, height - 12], fill=colours[j % len(colours)])
        draw.text((left + j * 200 + 14, height - 24), key, fill="black")
    image.save(path)


def main():
    os.makedirs(ablate_dir, exist_ok=True)
    index = ["# The paper's findings in miniature", "", "Made by `python -m tools.ablate` on the toy run (configs/tiny.py).",
             "Accuracies in %, FD = FD-SigLIP (lower is better), `object` = shape, colour and size right at the "
             "asked-for cell (eval.py).", ""]
    for study in studies:
        title, runs = STUDIES[study]
        results = [[run(name, mixture, extra, seed) for seed in ablate_seeds] for name, mixture, extra in runs]
        if train_only:
            continue
        rows = [over_seeds([row(name, mixture, r) for r in seeds]) for (name, mixture, _), seeds in zip(runs, results)]
        versions = [made_at(name, seed) for name, _, _ in runs for seed in ablate_seeds]
        markdown = table(title, rows, ablate_seeds, versions)
        open(os.path.join(ablate_dir, f"{study}.md"), "w").write(markdown)
        bar_chart(title, rows, ["image_qa", "drawn", "token cos", "generation object"],
                  os.path.join(ablate_dir, f"{study}.png"))
        print(markdown)
    for study in STUDIES:  # every study done so far, this run's or an earlier one's
        if os.path.exists(os.path.join(ablate_dir, f"{study}.md")):
            index += [open(os.path.join(ablate_dir, f"{study}.md")).read(), f"![{study}]({study}.png)", ""]
    open(os.path.join(ablate_dir, "README.md"), "w").write("\n".join(index))


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
