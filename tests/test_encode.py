"""encode.py: visual tokens (Sec. 2), the safetensors cache, resuming, bad inputs. Tiny random towers, no data/toy."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import encode  # noqa: E402
from conftest import run  # noqa: E402

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                   patch_size=4)  # the stand-in's geometry: 64 / 4 = a 16x16 patch grid


def save_tower(folder, model, image_size):
    model.save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory):
    """A full SiglipModel (vision + text), saved the way the stand-in is: load_vision_tower must take its vision half."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = SiglipModel(SiglipConfig(vision_config=TINY_VISION, text_config=text))
    return save_tower(tmp_path_factory.mktemp("siglip"), model, 64)


def write_png(path, seed, size=(40, 48)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_jsonl(data_dir, split, name, image_lists):
    os.makedirs(os.path.join(data_dir, split), exist_ok=True)
    with open(os.path.join(data_dir, split, f"{name}.jsonl"), "w") as f:
        for i, images in enumerate(image_lists):
            turns = [{"from": "human", "value": "<image>" * len(images) + "\nWhat is this?"},
                     {"from": "gpt", "value": "noise"}]
            f.write(json.dumps({"id": f"{name}-{i}", "task": "image_qa", "images": images,
                                "conversations": turns}) + "\n")


def make_world(data_dir, names, split="train", jsonl="qa", seed=0):
    for k, name in enumerate(names):
        write_png(os.path.join(data_dir, name), seed + k)
    write_jsonl(data_dir, split, jsonl, [[name] for name in names])


def run_main(monkeypatch, capsys, **knobs):
    for key, value in knobs.items():
        monkeypatch.setattr(encode, key, value)
    encode.main()
    return capsys.readouterr().out


def direct_tokens(tower, image_file):
    model, processor = encode.load_vision_tower(tower)
    pixels = processor(images=[encode.load_image(image_file)], return_tensors="pt")["pixel_values"]
    return encode.visual_tokens(model, pixels)[0]


# ---- the visual tokens ---------------------------------------------------------------------------------------------
def test_tokens_shape_and_unit_norm(tiny_tower):
    model, processor = encode.load_vision_tower(tiny_tower)
    assert not model.training
    images = [Image.new("RGB", (30, 50), c) for c in ("red", "green", "blue")]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (3, 3, 64, 64)
    tokens = encode.visual_tokens(model, pixels)
    assert tokens.shape == (3, 64, 32) and tokens.dtype == torch.float32
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(3, 64), atol=1e-5)
    assert not tokens.requires_grad
    assert encode.visual_tokens(model, pixels, num_tokens=16).shape == (3, 16, 32)
    with pytest.raises(AssertionError, match="perfect square"):
        encode.visual_tokens(model, pixels, num_tokens=60)


def test_interpolation_is_2x2_block_mean_then_normalized():
    torch.manual_seed(1)
    features = torch.randn(2, 16 * 16, 8)  # patch n = row * 16 + col
    blocks = features.reshape(2, 8, 2, 8, 2, 8).mean(dim=(2, 4)).reshape(2, 64, 8)  # mean of rows 2i,2i+1 x cols 2j,2j+1
    expected = blocks / blocks.norm(dim=-1, keepdim=True)
    assert torch.allclose(encode.interpolate_tokens(features, 64), expected, atol=1e-6)
    assert torch.allclose(encode.interpolate_tokens(features.half(), 64), expected, atol=2e-3)  # computed in fp32
    corner = features[0, [0, 1, 16, 17]].mean(0)
    assert torch.allclose(encode.interpolate_tokens(features, 64)[0, 0], corner / corner.norm(), atol=1e-6)


def test_tokens_use_last_layer_before_post_layernorm(tiny_tower):
    model, _ = encode.load_vision_tower(tiny_tower)
    captured = {}
    post_layernorm = next(m for name, m in model.named_modules() if name.endswith("post_layernorm"))
    post_layernorm.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    pixels = torch.randn(2, 3, 64, 64)
    after_layernorm = encode.interpolate_tokens(model(pixels).last_hidden_state.detach(), 64)  # the whole tower
    tokens = encode.visual_tokens(model, pixels)  # (which runs without post_layernorm and the head)
    assert torch.allclose(tokens, encode.interpolate_tokens(captured["x"].detach(), 64), atol=1e-6)
    assert not torch.allclose(tokens, after_layernorm, atol=1e-3)


def test_so400m_geometry(tmp_path):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14,
                                image_size=384, num_hidden_layers=1)
    folder = save_tower(tmp_path / "so400m", SiglipVisionModel(config), 384)
    model, processor = encode.load_vision_tower(folder)
    pixels = processor(images=[Image.new("RGB", (500, 300), "white")], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 384, 384)
    assert model(pixels).last_hidden_state.shape == (1, 27 * 27, 1152)
    tokens = encode.visual_tokens(model, pixels)
    assert tokens.shape == (1, 64, 1152)
    assert torch.allclose(tokens.norm(dim=-1), torch.ones(1, 64), atol=1e-5)


def test_missing_tower_names_path_and_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*toy\.pretrain_tiny"):
        encode.load_vision_tower(str(tmp_path / "nowhere"))


# ---- inputs --------------------------------------------------------------------------------------------------------
def test_image_paths_deduplicated_sorted_and_bad_lines_named(tmp_path):
    data = str(tmp_path)
    write_jsonl(data, "train", "a", [["images/z.png", "images/b.png"], ["images/b.png"], []])
    write_jsonl(data, "val", "b", [["images/a.png"]])
    assert encode.image_paths(data) == ["images/a.png", "images/b.png", "images/z.png"]
    with open(os.path.join(data, "val", "b.jsonl"), "a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2: empty line"):
        encode.image_paths(data)
    with open(os.path.join(data, "val", "b.jsonl"), "w") as f:
        f.write('{"images": ["x.png"]}\n{"images": ["y.png"\n')
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2: not valid JSON"):
        encode.image_paths(data)


def test_load_image_names_bad_files(tmp_path):
    write_png(str(tmp_path / "good.png"), 0)
    assert encode.load_image(str(tmp_path / "good.png")).mode == "RGB"
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png at all" * 10)
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[:len(good) // 2])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        encode.load_image(str(tmp_path / "missing.png"))
    for name in ("corrupt.png", "truncated.png"):
        with pytest.raises(ValueError, match=name):
            encode.load_image(str(tmp_path / name))


# ---- the cache -----------------------------------------------------------------------------------------------------
def test_cache_round_trip_via_command_line(tiny_tower, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    names = [f"images/{i}.png" for i in range(5)]
    make_world(data, names[:3], "train")
    make_world(data, names[3:], "val", seed=3)
    config = tmp_path / "config.py"
    config.write_text("encode_shard_size = 2\nencode_batch_size = 3\n")
    result = subprocess.run([sys.executable, "encode.py", str(config), f"--data_dir={data}", f"--out_dir={out}",
                             "--siglip_path", tiny_tower, "--device=cpu", "--dtype=float32"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "encoded 5 images" in result.stdout
    cache = common.TokenCache(os.path.join(out, "tokens"))
    assert cache.shards == ["shard-r000-00000.safetensors", "shard-r000-00001.safetensors",
                            "shard-r000-00002.safetensors"]
    assert (cache.num_tokens, cache.dim, cache.siglip_path) == (64, 32, tiny_tower)
    assert len(cache) == 5 and cache.dim == 32 and "images/0.png" in cache and "images/9.png" not in cache
    for name in names:
        tokens = cache[name]
        assert tokens.shape == (64, 32) and tokens.dtype == torch.float32
        assert torch.allclose(tokens, direct_tokens(tiny_tower, os.path.join(data, name)), atol=1e-3, rtol=1e-2)
    assert torch.equal(cache.get_many(names[::-1]), torch.stack([cache[n] for n in names[::-1]]))
    with pytest.raises(KeyError, match=r"images/9\.png.*encode\.py"):
        cache["images/9.png"]
    assert not [f for f in os.listdir(os.path.join(out, "tokens")) if f.endswith(".tmp")]


def test_resume_encodes_only_new_images(tiny_tower, tmp_path, monkeypatch, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    knobs = dict(data_dir=data, out_dir=out, siglip_path=tiny_tower, encode_shard_size=2, encode_batch_size=2,
                 dtype="float32")
    make_world(data, ["images/a.png", "images/b.png", "images/c.png"])
    assert "encoded 3 images" in run_main(monkeypatch, capsys, **knobs)
    tokens_dir = os.path.join(out, "tokens")
    old = {f: (os.stat(os.path.join(tokens_dir, f)).st_mtime_ns, open(os.path.join(tokens_dir, f), "rb").read())
           for f in ("shard-r000-00000.safetensors", "shard-r000-00001.safetensors")}

    make_world(data, ["images/d.png", "images/e.png"], "val", "more", seed=10)
    with open(os.path.join(data, "val", "more.jsonl"), "a") as f:
        f.write(json.dumps({"images": ["images/a.png"], "conversations": []}) + "\n")  # already cached
    assert "encoded 2 images" in run_main(monkeypatch, capsys, **knobs)
    for f, (mtime, content) in old.items():
        assert os.stat(os.path.join(tokens_dir, f)).st_mtime_ns == mtime
        assert open(os.path.join(tokens_dir, f), "rb").read() == content
    cache = common.TokenCache(tokens_dir)
    assert cache.shards == ["shard-r000-00000.safetensors", "shard-r000-00001.safetensors",
                            "shard-r000-00002.safetensors"]
    assert len(cache) == 5
    for name in ("a", "d", "e"):
        path = f"images/{name}.png"
        assert torch.allclose(cache[path], direct_tokens(tiny_tower, os.path.join(data, path)), atol=1e-3, rtol=1e-2)

    def no_tower(path):
        raise AssertionError("a fully cached run must not load the tower")
    monkeypatch.setattr(encode, "load_vision_tower", no_tower)
    assert "already cached" in run_main(monkeypatch, capsys, **knobs)
    other = str(tmp_path / "other")  # another dataset, the same relative paths: not read as this one's pictures
    make_world(other, ["images/a.png"], seed=3)
    with pytest.raises(encode.CacheMismatch, match=f"images under {data}, not {other}: delete"):
        run_main(monkeypatch, capsys, **{**knobs, "data_dir": other})
    meta_file = os.path.join(tokens_dir, common.META)  # a cache from before the root was kept takes the next run's
    json.dump({k: v for k, v in json.load(open(meta_file)).items() if k != "image_root"}, open(meta_file, "w"))
    assert "already cached" in run_main(monkeypatch, capsys, **knobs)
    assert json.load(open(meta_file))["image_root"] == data


def test_bf16_encoding_agrees_with_fp32(tiny_tower, tmp_path, monkeypatch, capsys):
    """dtype="bfloat16" (what "auto" picks on a bf16 GPU or a CPU with AMX or AVX512-BF16) runs the tower under
    autocast: the cached tokens are float32 unit vectors pointing where the fp32 tower's do."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    names = [f"images/{i}.png" for i in range(3)]
    make_world(data, names)
    assert "encoded 3 images" in run_main(monkeypatch, capsys, data_dir=data, out_dir=out, siglip_path=tiny_tower,
                                          dtype="bfloat16")
    cache = common.TokenCache(os.path.join(out, "tokens"))
    for name in names:
        tokens, exact = cache[name], direct_tokens(tiny_tower, os.path.join(data, name))
        assert tokens.dtype == torch.float32 and torch.allclose(tokens.norm(dim=-1), torch.ones(64), atol=1e-2)
        cosine = torch.nn.functional.cosine_similarity(tokens, exact, dim=-1)
        assert cosine.min() > 0.99 and not torch.equal(tokens, exact.half().float())  # bf16 ran, and ran close


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, (False, False)), (False, True, (False, True)),
                                                        (True, False, (True, True))])
def test_auto_dtype_picks_bf16_on_the_cpus_each_stage_gains_on(monkeypatch, amx, avx512_bf16, expected):
    """"auto" on a CPU: the stand-ins' training (cpu="amx") only with AMX; encode.py (cpu="native") with AMX or
    AVX512-BF16; the LLM and the decoder (cpu=None) never. An explicit dtype wins everywhere."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpu = torch.device("cpu")
    assert (common.wants_bf16("auto", cpu, cpu="amx"), common.wants_bf16("auto", cpu, cpu="native")) == expected
    assert not common.wants_bf16("auto", cpu)
    assert common.wants_bf16("bfloat16", cpu) and not common.wants_bf16("float32", cpu, cpu="native")


def test_bad_images_raise_or_are_skipped(tiny_tower, tmp_path, monkeypatch, capsys):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    knobs = dict(data_dir=data, out_dir=out, siglip_path=tiny_tower, encode_shard_size=4, encode_batch_size=8)
    make_world(data, ["images/a.png", "images/b.png"])
    write_jsonl(data, "val", "bad", [["images/corrupt.png"], ["images/missing.png"]])
    with open(os.path.join(data, "images", "corrupt.png"), "wb") as f:
        f.write(os.urandom(100))
    with pytest.raises(ValueError, match="corrupt.png"):
        run_main(monkeypatch, capsys, **knobs)
    write_jsonl(data, "val", "bad", [["images/missing.png"]])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        run_main(monkeypatch, capsys, **knobs)
    assert not os.path.exists(os.path.join(out, "tokens", common.HASHES))

    write_jsonl(data, "val", "bad", [["images/corrupt.png"], ["images/missing.png"]])
    printed = run_main(monkeypatch, capsys, skip_bad_images=True, **knobs)
    assert "encoded 2 images" in printed and "skipped 2" in printed
    cache = common.TokenCache(os.path.join(out, "tokens"))
    assert len(cache) == 2 and "images/a.png" in cache and "images/corrupt.png" not in cache
    assert cache["images/b.png"].shape == (64, 32)


def test_two_ranks_encode_the_micro_world_as_one_does(micro, tmp_path, monkeypatch, capsys):
    """torchrun splits the images across the ranks, each writing its own shards; rank 0 indexes them all."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    knobs = dict(data_dir=micro["data_dir"], siglip_path=os.path.join(micro["base"], "siglip"), device="cpu",
                  dtype="float32", encode_shard_size=16)  # float32: bf16 rounds batch-dependently, past 1e-3
    run_main(monkeypatch, capsys, out_dir=one, **knobs)
    result = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "encode.py",
                 f"--out_dir={two}", *(f"--{k}={v}" for k, v in knobs.items()), env={"OMP_NUM_THREADS": "1"},
                 timeout=300)
    a, b = common.TokenCache(os.path.join(one, "tokens")), common.TokenCache(os.path.join(two, "tokens"))
    assert f"encoded {len(a)} images" in result.stdout and "on 2 ranks" in result.stdout
    assert {s[:len("shard-r000")] for s in b.shards} == {"shard-r000", "shard-r001"} and len(a) == len(b) > 100
    paths = encode.image_paths(micro["data_dir"])
    assert len(paths) == len(a) and torch.allclose(a.get_many(paths), b.get_many(paths), atol=1e-3)


def test_a_killed_run_keeps_its_whole_shards_and_encodes_the_rest(tiny_tower, tmp_path, monkeypatch, capsys):
    """Killed after some shards (no index yet) and in the middle of one (a shard without its .paths file): the rerun
    encodes only the images of no whole shard, and indexes everything."""
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    names = [f"images/{i}.png" for i in range(6)]
    make_world(data, names)
    knobs = dict(data_dir=data, out_dir=out, siglip_path=tiny_tower, encode_shard_size=2, encode_batch_size=2,
                 dtype="float32")
    run_main(monkeypatch, capsys, **knobs)
    tokens_dir = os.path.join(out, "tokens")
    for name in (common.HASHES, common.LOCATIONS, "shard-r000-00002.paths"):
        os.remove(os.path.join(tokens_dir, name))
    assert "encoded 2 images" in run_main(monkeypatch, capsys, **knobs)
    cache = common.TokenCache(tokens_dir)
    assert len(cache) == 6 and len(cache.shards) == 3
    for name in names:
        assert torch.allclose(cache[name], direct_tokens(tiny_tower, os.path.join(data, name)), atol=1e-3, rtol=1e-2)


def test_index_lookups_duplicates_and_workers(tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    encode.check_meta(folder, "tower", 4, "images")
    paths = [f"images/{i}.png" for i in range(1000)]
    tokens = [torch.full((4, 3), float(i)) for i in range(1000)]
    writer = encode.ShardWriter(folder, rank=1)
    for k in range(0, 1000, 300):
        writer.write(paths[k:k + 300], tokens[k:k + 300])
    encode.build_index(folder)
    cache = common.TokenCache(folder)
    assert len(cache) == 1000 and cache.dim == 3 and cache.shards[0] == "shard-r001-00000.safetensors"
    assert all(cache[p][0, 0] == 37 * i for i, p in enumerate(paths[::37]))
    assert cache.get_many(paths[::-1])[:, 0, 0].tolist() == list(range(999, -1, -1))
    assert "images/1000.png" not in cache and cache.get_many([]).shape == (0, 4, 3)
    with pytest.raises(KeyError, match=r"images/1000\.png"):
        cache.get_many(["images/1.png", "images/1000.png"])
    clone = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: the index mapped again, not copied
    assert len(pickle.dumps(cache)) < 1000 and torch.equal(clone["images/999.png"], cache["images/999.png"])
    assert common.open_token_cache(folder) is common.open_token_cache(folder)

    np.save(os.path.join(folder, common.LOCATIONS), np.zeros((999, 2), np.int32))  # a kill inside write_index
    with pytest.raises(ValueError, match="half-written.*encode.py"):
        common.TokenCache(folder)
    with pytest.raises(ValueError, match=r"images/7\.png is in both x and y"):
        encode.write_index(folder, ["x", "y"], ["images/7.png", "a", "images/7.png"], [0, 0, 1], [0, 1, 0], 3)
    monkeypatch.setattr(encode, "path_hash", lambda path: len(path))
    with pytest.raises(ValueError, match=r"images/1\.png and images/2\.png \(a hash collision\)"):
        encode.write_index(folder, ["x"], ["images/1.png", "images/22.png", "images/2.png"], [0, 0, 0], [0, 1, 2], 3)


def test_encode_benchmark_times_both_dtypes_on_the_same_images(tiny_tower, tmp_path, monkeypatch):
    """tools/benchmark.py --what=encode: fp32 and bf16 forwards of the same pictures, their tokens close."""
    from tools import benchmark

    data = str(tmp_path / "data")
    make_world(data, [f"images/{i}.png" for i in range(5)])
    for key, value in dict(siglip_path=tiny_tower, data_dir=data, bench_images=4, bench_repeats=1).items():
        monkeypatch.setattr(benchmark, key, value)
    result = benchmark.bench_encode()
    assert result["images"] == 4 and result["fp32_images_per_s"] > 0 and result["bf16_images_per_s"] > 0
    assert 0.999 < result["lowest_cosine"] <= 1.0 + 1e-6
    assert result["speedup"] == pytest.approx(result["bf16_images_per_s"] / result["fp32_images_per_s"])
