# The built-in toy world on a laptop CPU: every stage, stand-in models the project trains itself (pretrain_tiny.py).
data_dir = "data/toy"
