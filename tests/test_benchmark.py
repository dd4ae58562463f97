"""benchmark.py --what=scale: the synthetic Cambrian-shaped set is in the project's format with a token cache that holds
its every image, it is made again only when its knobs change, and the training data path reads it in fresh processes
(the numbers of the last line)."""
import json
import os

import pytest

from tools import benchmark
from data import parse_line
from common import open_token_cache

WORDS = ["apple", "river", "stone", "cloud", "green", "table", "light", "music", "over", "under"]


@pytest.fixture(scope="module")
def scale_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scale") / "set")
    benchmark.write_scale_set(root, 2000, WORDS, 4)
    return root


def rows(root, split, task):
    path = os.path.join(root, split, f"{task}.jsonl")
    return [parse_line(line, f"{path}, line {i}") for i, line in enumerate(open(path), 1)]  # the loader's checks


def test_synthetic_set_is_cambrian_shaped_and_its_images_are_cached(scale_set):
    train = {task: rows(scale_set, "train", task) for task in benchmark.MIX}
    assert {task: len(r) for task, r in train.items()} == {t: round(2000 * s) for t, s in benchmark.MIX.items()}
    assert all(len(rows(scale_set, "val", task)) == benchmark.SCALE_VAL for task in benchmark.MIX)
    assert all(r["task"] == task for task, samples in train.items() for r in samples)
    text_only = sum(not r["images"] for r in train["image_qa"])
    assert 0.07 < text_only / 2000 < 0.13 and all(len(r["images"]) <= 1 for r in train["image_qa"])
    assert max(len(r["conversations"]) for r in train["image_qa"]) > 4  # multi-turn
    assert all(len(r["images"]) == benchmark.FRAMES for r in train["video_qa"])
    assert all(r["conversations"][1]["value"] == "Here is an image based on your request: <image>"
               for r in train["generation"])
    cache = open_token_cache(os.path.join(scale_set, "tokens"))
    paths = [p for samples in train.values() for r in samples for p in r["images"]]
    assert len(set(paths)) == len(paths) and all(p in cache for p in paths)
    tokens = cache.get_many(paths[:8])
    assert tokens.shape == (8, benchmark.num_visual_tokens, 1152)
    assert len({tuple(t[0, :4].tolist()) for t in tokens}) == 4  # every path maps onto one of 4 pictures


def test_made_again_only_when_its_spec_changes(tmp_path):
    folder, made = str(tmp_path / "set"), []

    def make():
        os.makedirs(folder)
        made.append(len(made))
        open(os.path.join(folder, f"file{len(made)}"), "w").close()

    assert benchmark.cached(folder, {"conversations": 10}, make)
    assert not benchmark.cached(folder, {"conversations": 10}, make) and made == [0]
    assert benchmark.cached(folder, {"conversations": 20}, make) and made == [0, 1]
    assert sorted(os.listdir(folder)) == ["file2", "spec.json"]  # the old set is gone


def test_scale_run_reads_the_set_in_fresh_processes(micro, tmp_path, monkeypatch, capsys):
    """The whole --what=scale at a small size, the micro toy LLM's tokenizer standing in for SmolLM2's."""
    knobs = dict(out_dir=str(tmp_path), smol_path=f"{micro['base']}/llm", conversations=600, scale_images=4,
                 scale_batches=6, index_entries=1000, micro_batch_size=4)
    for key, value in knobs.items():
        monkeypatch.setattr(benchmark, key, value)
    monkeypatch.setattr(benchmark, "whole_words", lambda tokenizer: WORDS)  # the micro vocabulary has few
    result = benchmark.bench_scale()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert dict(pair.split("=") for pair in last.split()).keys() == result.keys()
    assert result["conversations"] == 600 and 0 < result["startup_s"] and 0 < result["startup_first_s"]
    assert result["loader_conversations_per_s"] > 0 and result["rss_bytes_per_conversation"] > 0
    assert 0 <= result["padding_ratio_grouped"] < result["padding_ratio_random"]
    assert result["grouping_speedup"] > 1 and result["index_bytes_per_entry"] > 0
    index = os.path.join(tmp_path, "bench", "scale", "data_index")
    assert len(os.listdir(index)) == 2 * len(benchmark.MIX)  # the line index of every file, cached beside the set
    assert json.load(open(os.path.join(tmp_path, "bench", "scale", "spec.json")))["conversations"] == 600
