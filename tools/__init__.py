"""Tools around the stages, run from the repo root as modules: `python -m tools.prepare` (real data in),
`python -m tools.prepare_smol`, `python -m tools.benchmark`, `python -m tools.estimate`, `python -m tools.ablate`."""
