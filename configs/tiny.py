# The built-in toy world on a laptop CPU: every stage, with stand-in models the project trains itself (pretrain_tiny.py).
data_dir = "data/toy"
siglip_path = "out/tiny/base/siglip"
llm_path = "out/tiny/base/llm"
vae_path = "out/tiny/base/vae"
out_dir = "out/tiny"
