"""The main job (``ddim-jax demo``): small class-conditional Flax UNets trained on scikit-learn's digits.

Needs the ``demo`` extra (flax, optax, scikit-learn, tqdm, Pillow, matplotlib). Modules: `unet` (the
model), `data` (the digits, and their random brightness), `train` (optax training of the
epsilon and the zero-SNR v-prediction models, and the parameter cache), `metrics` (Frechet
distance in a small classifier's feature space, brightness and over-exposure measures),
`png` (image grids, written with Pillow), `experiments` (the DDIM paper's tables in
miniature, and `Sampler` / `trained_sampler`), `fixes` (Lin et al.'s fixes in miniature),
`inversion` (DDIM inversion, EDICT and BDIA reconstructing and editing digits), `brightness`
(Lin et al.'s first claim on a closed-form perfect model, no training), `figures` (labelled
matplotlib figures of the results) and `cli` (the console script).

To build on the trained class-conditional model::

    from ddim_jax.demo.experiments import trained_sampler
    sampler = trained_sampler()  # zero-SNR v-prediction model, trailing spacing; cached by the demo
    images = sampler.sample(x_T, 25, 0.0, key, labels=[3] * len(x_T), guidance_scale=3.0)
    recon, as_eights = sampler.edit(threes, 25, [3] * len(threes), [8] * len(threes), 1.0, "bdia")
    # or directly: ddim_jax.invert / ddim_jax.sample with denoiser_fn(sampler.model),
    # model_args=(sampler.params, labels) and a state from sampler.config
"""
