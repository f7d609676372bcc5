"""The main job (``ddim-jax demo``): a small Flax UNet trained on scikit-learn's digits, sampled with DDIM.

Needs the ``demo`` extra (flax, optax, scikit-learn, tqdm). Modules: `unet` (the model),
`data` (the digits), `train` (optax training and the parameter cache), `metrics` (Frechet
distance in a small classifier's feature space), `png` (a dependency-free PNG writer),
`experiments` (the paper's tables in miniature) and `cli` (the console script).
"""
