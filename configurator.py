"""
nanoGPT-style configuration. A stage script declares its knobs as plain globals at its top, then calls

    configure(globals())

which applies, in order: a config file (first argument ending in .py; configs/tiny.py when none is given), then
`--key=value` or `--key value` overrides. Values are parsed as Python literals (falling back to a plain string) and
must have the type of the default; a list knob given plain values collects them (--image a.png --image b.png).
A config file is shared by every stage, so it may hold keys another stage declares; a key that no stage declares is
an error, as is an override this script does not declare, or a config file that does not run (its line is named). Run
from the command line, such a mistake is one line on stderr and exit status 2; `--help` (or -h) prints the script's
docstring and its knobs with their values (after the config file) and comments, and exits.
Every stage raises the same kinds of error for a mistake in what the user gave (MissingFile, BadInput), and its
`__main__` runs `run_main(main)`, which turns them into one line on stderr and exit status 2 too; a bug keeps its
traceback.
"""
import ast
import difflib
import io
import os
import sys
import tokenize
import traceback

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
STAGES = ["toy/toyworld.py", "toy/pretrain_tiny.py", "tools/prepare_smol.py", "encode.py", "train_adapter.py",
          "train_vpit.py", "train_decoder.py", "sample.py", "eval.py", "tools/estimate.py", "pipeline.py",
          "tools/ablate.py", "tools/benchmark.py"]


def script_args(script):
    """The arguments after `python` that run a script given by its path from the repo root: the stage files by name,
    those in a folder as modules from the root (toy/toyworld.py -> -m toy.toyworld), so their imports resolve."""
    return ["-m", script[:-len(".py")].replace("/", ".")] if "/" in script else [script]


class UserError(Exception):
    """A mistake in what the user gave (a knob, a path, a file, an image, a line of data), never a bug."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder that the user named, or that an earlier stage makes, is not there."""


class BadInput(UserError, ValueError):
    """A file, an image, a line of data or a value is there but not what the stage can take."""


class ConfigError(BadInput):
    """A mistake in a config file or on the command line."""


def run_main(main, *args):
    """main(*args) from the command line: a UserError ends in `error: <message>`, one line on stderr, exit status 2."""
    try:
        return main(*args)
    except UserError as e:
        # raised in a DataLoader worker, it comes back with the worker's traceback first: its last line is the error
        message = str(e).strip().splitlines()[-1]
        message = message.removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: ")
        # its frames go now, before the message: a progress bar in them closes its line, a DataLoader stops its workers
        e.__traceback__ = None  # (left to a gc pass, each worker would take 5 s to stop)
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


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
        raise ConfigError(f"config key '{key}' ({source}): expected {type(default).__name__}, "
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
            raise ConfigError(f"unexpected argument {arg!r}: give a config file (configs/x.py) and --key=value "
                              "overrides")
        i += 1
    return config_file, pairs


def comments(script):
    """{knob: its comment} from a script's source: the comment-only lines just above its assignment, the `#` comment on
    the line where the assignment ends, and the comment-only lines that go on with that one's sentence (they do not
    start a new one with a capital letter). A `# ----` rule ends a comment."""
    source = open(script).read()
    lines = source.splitlines()
    notes = {tok.start[0]: tok.string.lstrip("# ").rstrip() for tok in
             tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    alone = {n for n in notes if lines[n - 1].lstrip().startswith("#") and not notes[n].startswith("--")}
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            text, line = [notes.get(node.end_lineno, "")], node.lineno - 1
            while line in alone:
                text.insert(0, notes[line])
                line -= 1
            line = node.end_lineno + 1
            while text[-1] and line in alone and not notes[line][:1].isupper():
                alone.discard(line)  # taken: not a comment above the next knob
                text.append(notes[line])
                line += 1
            found[node.targets[0].id] = " ".join(t for t in text if t)
    return found


def print_help(g, defaults, config_file, from_file):
    """The script's docstring, how to call it, and every knob: its value now, where it came from, and its comment."""
    script = g.get("__file__", sys.argv[0])
    name, notes = os.path.basename(script), comments(script) if os.path.exists(script) else {}
    where = os.path.relpath(os.path.abspath(script), ROOT).replace(os.sep, "/")
    command = " ".join(script_args(where)) if not where.startswith("..") else name
    print(f"{name}: {(g.get('__doc__') or '').strip()}\n")
    print(f"usage: python {command} [config.py] [--key=value ...]   (config now: {os.path.relpath(config_file)})")
    print(f"knobs, with their values now ({os.path.basename(config_file)}: set by the config file):")
    for key in defaults:
        value = f"--{key}={g[key]!r}" + (f"  ({os.path.basename(config_file)})" if key in from_file else "")
        print(f"  {value}" + (f"\n      {notes[key]}" if notes.get(key) else ""))


def read_config(path):
    """The knobs a config file sets, or a ConfigError naming the file and line of what went wrong in it."""
    values = {}
    try:
        exec(compile(open(path).read(), path, "exec"), values)  # one namespace: a comprehension sees earlier names
    except SyntaxError as e:
        raise ConfigError(f"{path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == path][-1]
        raise ConfigError(f"{path}, line {line}: {type(e).__name__}: {e}") from None
    return knobs(values)


def unknown_keys(keys, known, source):
    """The ConfigError for keys nobody declares: each with its close matches among the known ones."""
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=3)
        named.append(f"'{key}'" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return ConfigError(f"unknown config key {', '.join(named)} ({source}); `--help` lists this script's keys")


def apply(g, argv):
    """configure() without the command-line handling: a mistake raises ConfigError; --help prints and exits 0."""
    wants_help = any(a in ("--help", "-h") for a in argv)
    config_file, pairs = split_args([a for a in argv if a not in ("--help", "-h")])
    config_file = config_file or DEFAULT_CONFIG
    if not os.path.exists(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    defaults = knobs(g)
    file_values, declared = read_config(config_file), declared_by_any_stage()
    unknown = sorted(set(file_values) - set(defaults) - declared)
    if unknown:
        raise unknown_keys(unknown, declared | set(defaults), f"{config_file}, in no stage script")
    for key, value in file_values.items():
        if key in defaults:
            g[key] = checked(key, value, defaults[key], config_file)
    repeated = {}
    for key, text in pairs:
        if key not in defaults:
            raise unknown_keys([key], defaults, "command line")
        value = text if isinstance(defaults[key], str) else parse_value(text)  # a prompt stays a string
        if isinstance(defaults[key], list) and not isinstance(value, list):  # repeatable: --image a.png --image b.png
            item = text if all(isinstance(x, str) for x in defaults[key]) else parse_value(text)
            value = repeated.setdefault(key, [])
            value.append(item)
        g[key] = checked(key, value, defaults[key], "command line")
    g["config_file"] = config_file
    if wants_help:
        print_help(g, defaults, config_file, set(file_values) & set(defaults))
        raise SystemExit(0)
    return {k: g[k] for k in defaults}


def configure(g, argv=None):
    """Apply a config file and command-line overrides to the knobs in g (a script's globals()), in place. From the
    command line (argv None) a mistake is one line on stderr and exit status 2; given argv, it raises ConfigError."""
    if argv is not None:
        return apply(g, argv)
    return run_main(apply, g, sys.argv[1:])
