"""
The whole job, one command: every stage in order, each skipped when its artefact is already there.

    python pipeline.py                    # the toy world on a CPU, from the stand-ins the repo ships in toy/base
    python pipeline.py configs/8b.py      # real models and data: encode, stage 1, stage 2, decoder, eval, samples
    python pipeline.py --force=train_vpit.py   # run one stage again (and so the stages after it)

Stages run as their own processes (`python <stage> <config>`, `python -m toy.<script>` for the toy world's), exactly as
a person would type them, so their progress bars and messages show; `launcher` puts e.g. torchrun in front of encode.py
and the training stages on a GPU machine.
At the end it prints the eval report and makes a few sample PNGs with sample.py.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from configurator import BadInput, configure, run_main, script_args

# ---------------------------------------------------------------------------------------------------------------------
data_dir = "data/toy"
out_dir = "out/tiny"
llm_path = "toy/base/llm"
toy_world = True  # False for real data: the world and the stand-ins are not made, they must exist
launcher = ""  # put before encode.py and the training stages, e.g. "torchrun --nproc_per_node=8"
force = ""  # a stage to run again even if its artefact exists (and every stage after it but the shipped stand-ins)
# A few sample.py runs at the end: (prompt, input image relative to data_dir or ""): a generation, a question about an
# image, an edit and a visual-thinking prompt (the images are toy val pictures the model never trained on).
samples = [("Generate an image of a large red circle in the top left and a small blue square in the center.", ""),
           ("What colour is the circle?", "images/val/image_qa/val-image_qa-000000-0.png"),
           ("Add a small red triangle in the bottom middle.", "images/val/image_edit/val-image_edit-000000-0.png"),
           ("Think visually before you answer. What shape is the blue object in the bottom left?",
            "images/val/visual_thinking/val-visual_thinking-000000-0.png")]
config_file = "configs/tiny.py"  # set by configure() to the config file in use
# ---------------------------------------------------------------------------------------------------------------------


def stages():
    """(script, artefact that says it is done or None: always run, runs under the launcher, what --force clears
    besides the artefact's folder). Every artefact is written last, when its stage has finished."""
    base, out = os.path.dirname(llm_path), lambda *parts: os.path.join(out_dir, *parts)
    toy = [("toy/toyworld.py", os.path.join(data_dir, "world.json"), False, []),
           ("toy/pretrain_tiny.py", os.path.join(base, "pretrain_report.json"), False, [])] if toy_world else []
    # encode.py always runs: it encodes only what no shard holds yet (a killed run leaves its shards), in seconds when
    # nothing is missing; under the launcher its ranks split the images
    return toy + [("encode.py", None, True, [out("tokens")]),
                  ("train_adapter.py", out("adapter", "metamorph.json"), True, [out("ckpt", "adapter")]),
                  ("train_vpit.py", out("vpit", "metamorph.json"), True,
                   [out(phase) for phase in ("vpit_lead_in", "vpit_mix")] +
                   [out("ckpt", phase) for phase in ("vpit_lead_in", "vpit_mix", "vpit")]),
                  ("train_decoder.py", out("decoder", "decoder.json"), True, [out("latents"), out("ckpt", "decoder")]),
                  ("eval.py", out("eval", "report.md"), False, [])]


def world_recipe():
    """The toy world's knobs as `python -m toy.toyworld <config_file>` reads them (toy.toyworld.RECIPE)."""
    from toy import toyworld
    g = dict(vars(toyworld))
    configure(g, [config_file])
    return {knob: g[knob] for knob in toyworld.RECIPE}


def world_changes(done):
    """The toy-world knobs in force that data_dir/world.json records other values for, comma-separated ('' if none)."""
    recorded, wanted = json.load(open(done))["recipe"], world_recipe()
    return ", ".join(knob for knob in wanted if recorded.get(knob) != wanted[knob])


def run(script, config, parallel, *args):
    runner = shlex.split(launcher) if parallel and launcher else [sys.executable]
    command = runner + [*script_args(script), config, *args]
    print(f"\n=== {' '.join(command)}", flush=True)
    start = time.time()
    code = subprocess.run(command).returncode
    if code:  # the stage has said why, in one line or a bug's traceback: the pipeline stops with its exit status
        raise SystemExit(code)
    return time.time() - start


def plan():
    """The stages to run, in order: those not done, and --force's stage with every stage after it but the stand-ins'.
    A forced stage starts clean: its artefact's folder, checkpoints and caches are removed (toy/toyworld.py clears
    its own folder)."""
    names = [s for s, _, _, _ in stages()]
    if force and force not in names:
        raise BadInput(f"--force={force}: not a stage of this pipeline ({', '.join(names)})")
    todo, after_force = [], False
    for script, done, parallel, clears in stages():
        after_force = after_force or script == force
        # the stand-ins are base models, not a product of the world: remade only when missing or named by --force
        forced = after_force and (script != "toy/pretrain_tiny.py" or force == script)
        if script == "toy/toyworld.py" and os.path.exists(done) and not forced and (changed := world_changes(done)):
            # not made again here: new knobs may redraw pictures that the token cache (keyed by path) still holds
            raise BadInput(f"{data_dir} was made with other toy-world knobs than {config_file} "
                           f"({changed}): make it again with `python -m toy.toyworld {config_file}`, "
                           f"removing {os.path.join(out_dir, 'tokens')} first if seed or a picture count changed")
        if done and os.path.exists(done) and not forced:
            print(f"=== {script}: done ({done} exists), skipped")
            continue
        if forced and script != "toy/toyworld.py":
            for folder in ([os.path.dirname(done)] if done else []) + clears:
                shutil.rmtree(folder, ignore_errors=True)
        todo.append((script, parallel))
    return todo


def main(config):
    times = {}
    for script, parallel in plan():
        times[script] = run(script, config, parallel)
    for k, (prompt, image) in enumerate(samples):
        extra = ["--image", os.path.join(data_dir, image)] if image else []
        times[f"sample {k}"] = run("sample.py", config, False, "--prompt", prompt, *extra)
    print(open(os.path.join(out_dir, "eval", "report.md")).read())
    print("=== wall time per stage (this run): " + ", ".join(f"{s} {t / 60:.1f} min" for s, t in times.items()))


if __name__ == "__main__":
    configure(globals())
    run_main(main, config_file)
