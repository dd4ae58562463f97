"""
nanoGPT-style configuration. A stage script declares its knobs as plain globals at its top, then calls

    configure(globals())

which applies, in order: a config file (first argument ending in .py; configs/tiny.py when none is given), then
`--key=value` or `--key value` overrides. Values are parsed as Python literals (falling back to a plain string) and
must have the type of the default; a list knob given plain values collects them (--image a.png --image b.png).
A config file is shared by every stage, so it may hold keys another stage declares; a key that no stage declares is
an error, as is an override this script does not declare.
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
STAGES = ["toyworld.py", "pretrain_tiny.py", "prepare_smol.py", "encode.py", "train_adapter.py", "train_vpit.py",
          "train_decoder.py", "sample.py", "eval.py", "estimate.py", "pipeline.py", "ablate.py", "benchmark.py"]


def knobs(g):
    """The configurable globals of a script: plain values, not modules, functions, _private names or CONSTANTS."""
    kinds = (int, float, bool, str, list, tuple, dict, type(None))
    return {k: v for k, v in g.items() if not k.startswith("_") and not k.isupper() and isinstance(v, kinds)}


def declared_by_any_stage():
    """Every top-level knob any stage script declares (read from source, nothing is imported)."""
    names = set()
    for stage in STAGES:
        path = os.path.join(ROOT, stage)
        if not os.path.exists(path):
            continue
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def checked(key, value, default, source):
    """value, converted where lossless (int -> float), or a ValueError that names the key. None only where the default
    is None; a list's items must have the type of the default's items (when it has some, all of one type)."""
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        item_types = {type(item) for item in default}
        if len(item_types) == 1:
            value = [checked(f"{key}[{i}]", item, default[0], source) for i, item in enumerate(value)]
        return type(default)(value)
    if type(value) is not type(default):
        raise ValueError(f"config key '{key}' ({source}): expected {type(default).__name__}, "
                         f"got {type(value).__name__} {value!r}")
    return value


def split_args(argv):
    """argv -> (config file or None, [(key, text)]). Accepts --key=value and --key value."""
    config_file, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            if "=" in arg:
                key, text = arg[2:].split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, text = arg[2:], argv[i + 1]
                i += 1
            else:
                key, text = arg[2:], "True"  # a bare flag: --chat
            pairs.append((key, text))
        elif arg.endswith(".py") and config_file is None:
            config_file = arg
        else:
            raise ValueError(f"unexpected argument {arg!r}: give a config file (configs/x.py) and --key=value overrides")
        i += 1
    return config_file, pairs


def configure(g, argv=None):
    """Apply a config file and command-line overrides to the knobs in g (a script's globals()), in place."""
    argv = sys.argv[1:] if argv is None else argv
    config_file, pairs = split_args(argv)
    config_file = config_file or DEFAULT_CONFIG
    if not os.path.exists(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    defaults = knobs(g)
    file_values = {}
    exec(open(config_file).read(), file_values)  # one namespace: a comprehension in the file sees its earlier names
    file_values = knobs(file_values)
    unknown = sorted(set(file_values) - set(defaults) - declared_by_any_stage())
    if unknown:
        raise ValueError(f"{config_file}: unknown config key(s) {unknown}: no stage script declares them")
    for key, value in file_values.items():
        if key in defaults:
            g[key] = checked(key, value, defaults[key], config_file)
    repeated = {}
    for key, text in pairs:
        if key not in defaults:
            raise ValueError(f"unknown config key '{key}' (command line): known keys are {sorted(defaults)}")
        value = text if isinstance(defaults[key], str) else parse_value(text)  # a prompt stays a string
        if isinstance(defaults[key], list) and not isinstance(value, list):  # repeatable: --image a.png --image b.png
            item = text if all(isinstance(x, str) for x in defaults[key]) else parse_value(text)
            value = repeated.setdefault(key, [])
            value.append(item)
        g[key] = checked(key, value, defaults[key], "command line")
    g["config_file"] = config_file
    return {k: g[k] for k in defaults}
