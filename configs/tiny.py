# The built-in toy world on a laptop CPU: every stage, with stand-in models the project trains itself (pretrain_tiny.py).
data_dir = "data/toy"
siglip_path = "out/tiny/base/siglip"
llm_path = "out/tiny/base/llm"
vae_path = "out/tiny/base/vae"
out_dir = "out/tiny"
# Stage 2 starts with 8 epochs of generation alone, then the mix: the toy LLM, unlike a pretrained one, learns to tie
# the words to the 64 slots only from concentrated examples (docs/toy_experiments.md, "Generation")
vpit_lead_in = {"generation": -1}
vpit_lead_in_epochs = 8
