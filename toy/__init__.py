"""The toy world (toyworld.py: scenes.py, tasks.py, text.py), its stand-in base models (pretrain_tiny.py) and the
shipped weights: base/ (SigLIP, LLM, VAE stand-ins) and run/ (a finished toy run). Run its scripts from the repo root:
`python -m toy.toyworld`, `python -m toy.pretrain_tiny`."""
