# The built-in toy world on a laptop CPU: every stage, from the stand-in base models the repo ships in toy/base
# (toy/pretrain_tiny.py made them; `rm -r toy/base && python -m toy.pretrain_tiny` makes them again).
data_dir = "data/toy"
siglip_path = "toy/base/siglip"
llm_path = "toy/base/llm"
vae_path = "toy/base/vae"
out_dir = "out/tiny"
