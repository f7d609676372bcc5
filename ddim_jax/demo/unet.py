"""`UNet`: a small UNet-style Flax denoiser (time embedding, residual conv blocks, skip connections)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps ``t`` (shape ``(B,)``) to ``(B, dim)`` float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from ddim_jax.demo.unet import timestep_embedding
      >>> timestep_embedding(jnp.array([0, 999]), 16).shape
      (2, 16)
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def _groups(channels: int, num_groups: int) -> int:
    g = min(num_groups, channels)
    while channels % g:
        g -= 1
    return g


class _ResBlock(nn.Module):
    channels: int
    num_groups: int
    zero_init: bool

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nn.silu(nn.GroupNorm(num_groups=_groups(x.shape[-1], self.num_groups))(x))
        h = nn.Conv(self.channels, (3, 3))(h)
        h = h + nn.Dense(self.channels)(nn.silu(emb))[:, None, None, :]
        h = nn.silu(nn.GroupNorm(num_groups=_groups(self.channels, self.num_groups))(h))
        last_init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
        h = nn.Conv(self.channels, (3, 3), kernel_init=last_init)(h)
        skip = x if x.shape[-1] == self.channels else nn.Conv(self.channels, (1, 1))(x)
        return skip + h


class UNet(nn.Module):
    """A UNet-style denoiser ``model.apply(params, x, t, cond=None, labels=None)`` on NHWC images.

    Each level of ``channels`` has ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3x3
    convs, the time embedding added in between); levels after the first halve the
    resolution (stride-2 conv) and the decoder mirrors them with nearest upsampling and
    skip connections. No attention, so it stays cheap on a CPU. ``H`` and ``W`` must be
    divisible by ``2 ** (len(channels) - 1)``.

    Attributes:
      channels: feature channels per resolution level, e.g. ``(32, 64)``.
      in_channels: channels of ``x`` (checked at call time).
      out_channels: channels of the output (e.g. the noise prediction).
      num_res_blocks: residual blocks per level in the encoder (the decoder has one more).
      emb_dim: width of the time (and conditioning) embedding.
      num_groups: GroupNorm groups (reduced to a divisor of the channel count).
      num_classes: with ``num_classes = K > 0`` the model is class-conditional: it takes
        ``labels`` in ``[0, K]``, where ``K`` itself is the null label ("no class"), the
        unconditional branch of classifier-free guidance. 0: no labels.
      zero_init: zero-initialise the last conv of each residual block and the output conv
        (a common training trick: a fresh model then predicts 0). Set False for a random
        model that is not a no-op, e.g. to exercise a sampling loop without weights.

    Call args:
      x: ``(B, H, W, in_channels)`` float array.
      t: int timestep(s), a scalar or ``(B,)``.
      cond: optional conditioning embedding, ``(B, D)`` or ``(B, L, D)`` (token sequence,
        mean-pooled); projected to ``emb_dim`` and added to the time embedding. A model
        initialised with ``cond`` must be applied with it, and vice versa.
      labels: int class labels ``(B,)`` (or a scalar), required iff ``num_classes > 0``;
        a learned embedding of the label is added to the time embedding.

    Returns:
      ``(B, H, W, out_channels)`` float32.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ddim_jax.demo.unet import UNet
      >>> model = UNet(channels=(8, 16), in_channels=4, out_channels=4)  # SD-like: 4 latent channels
      >>> x, text = jnp.zeros((2, 8, 8, 4)), jnp.zeros((2, 77, 32))  # (B, L, D) token embeddings
      >>> params = jax.jit(model.init)(jax.random.key(0), x, jnp.array(10), text)
      >>> jax.jit(model.apply)(params, x, jnp.array([10, 500]), text).shape
      (2, 8, 8, 4)
      >>> digits = UNet(channels=(8,), num_classes=10)  # labels 0-9, and 10 = null label
      >>> # shapes only (jax.eval_shape traces, computes nothing): its parameters and output
      >>> key, image, null = jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.array([10])
      >>> shapes = jax.eval_shape(digits.init, key, image, 0, None, null)
      >>> jax.eval_shape(digits.apply, shapes, image, 500, labels=jnp.array([3])).shape
      (1, 8, 8, 1)
    """

    channels: tuple[int, ...] = (32, 64)
    in_channels: int = 1
    out_channels: int = 1
    num_res_blocks: int = 1
    emb_dim: int = 128
    num_groups: int = 8
    num_classes: int = 0
    zero_init: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, cond: jax.Array | None = None, labels: jax.Array | None = None
    ) -> jax.Array:
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints, got {self.channels!r}")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, H, W, in_channels={self.in_channels}) (NHWC), got {x.shape}"
            )
        factor = 2 ** (len(self.channels) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"x's height and width must be divisible by {factor} for {len(self.channels)} levels, "
                f"got {x.shape[1:3]}"
            )
        batch = x.shape[0]
        t = jnp.asarray(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(f"t must be a scalar or have shape (B,) = ({batch},), got {t.shape}")
        t = jnp.broadcast_to(t, (batch,))

        emb = timestep_embedding(t, self.emb_dim)
        emb = nn.Dense(self.emb_dim)(nn.silu(nn.Dense(self.emb_dim)(emb)))
        if cond is not None:
            cond = jnp.asarray(cond, jnp.float32)
            if cond.ndim == 3:
                cond = cond.mean(axis=1)
            if cond.ndim != 2 or cond.shape[0] != batch:
                raise ValueError(f"cond must have shape (B, D) or (B, L, D) with B={batch}, got {cond.shape}")
            emb = emb + nn.Dense(self.emb_dim, name="cond_proj")(cond)
        if (labels is None) != (self.num_classes == 0):
            raise ValueError(
                f"labels must be given iff num_classes > 0; num_classes={self.num_classes}, "
                f"labels {'missing' if labels is None else 'given'}"
            )
        if labels is not None:
            labels = jnp.asarray(labels)
            if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape not in ((), (batch,)):
                raise ValueError(
                    f"labels must be ints of shape () or (B,) = ({batch},), got {labels.dtype} {labels.shape}"
                )
            labels = jnp.broadcast_to(labels, (batch,))
            emb = emb + nn.Embed(self.num_classes + 1, self.emb_dim, name="label_embed")(labels)

        h = nn.Conv(self.channels[0], (3, 3))(jnp.asarray(x, jnp.float32))
        skips = [h]
        for level, ch in enumerate(self.channels):
            if level > 0:
                h = nn.Conv(ch, (3, 3), strides=(2, 2))(h)
                skips.append(h)
            for _ in range(self.num_res_blocks):
                h = _ResBlock(ch, self.num_groups, self.zero_init)(h, emb)
                skips.append(h)
        for level in reversed(range(len(self.channels))):
            ch = self.channels[level]
            for _ in range(self.num_res_blocks + 1):
                h = _ResBlock(ch, self.num_groups, self.zero_init)(
                    jnp.concatenate([h, skips.pop()], axis=-1), emb
                )
            if level > 0:
                b, hh, ww, c = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")
                h = nn.Conv(self.channels[level - 1], (3, 3))(h)
        h = nn.silu(nn.GroupNorm(num_groups=_groups(h.shape[-1], self.num_groups))(h))
        out_init = nn.initializers.zeros if self.zero_init else nn.linear.default_kernel_init
        return nn.Conv(self.out_channels, (3, 3), kernel_init=out_init)(h)
