"""The guided model call every loop makes: arguments, guidance and dtype, validated once."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ddim_jax._guidance import per_example_value
from ddim_jax._guiders import GuidanceInfo, Guider, ScaleSchedule, cfg, check_guidance_combination
from ddim_jax._step import GuidedOutput
from ddim_jax._values import check_same_shape, numeric

__all__ = ["ModelFn", "ModelCall", "Supports"]

ModelFn = Callable[..., jax.Array]
"""``model_fn(x, t, *model_args) -> model_output``; ``t`` is an int32 scalar array."""

GUIDANCE_LAYOUTS = ("concat", "interleave")


class Supports(NamedTuple):
    """What a loop supports, declared by the loop and checked against its guider.

    ``name`` is the public function's name, for messages; ``inverse`` sets `GuidanceInfo.inverse`.
    ``no_guider_state`` is None where the loop carries a guider's state through its steps, else
    why it cannot; ``no_split_output`` is None where a step takes a `GuidedOutput` (CFG++: x0
    from one output, epsilon from the other), else why it cannot and what to use instead.
    """

    name: str
    inverse: bool = False
    no_guider_state: str | None = None
    no_split_output: str | None = None


def check_model_output(out: Any) -> None:
    """A model output must be an array: diffusers-style output objects, tuples and dicts get a
    TypeError that says which element to return."""
    if isinstance(out, (jax.Array, np.ndarray)) or (hasattr(out, "shape") and hasattr(out, "dtype")):
        return
    kind = type(out).__name__
    if hasattr(out, "sample"):
        fix = "return its .sample, e.g. `return unet.apply(...).sample`"
    elif isinstance(out, Mapping):
        fix = f"return the array itself, e.g. out[{next(iter(out), 'sample')!r}]"
    elif isinstance(out, (tuple, list)):
        fix = "return the array itself, e.g. `return unet.apply(..., return_dict=False)[0]`"
    else:
        fix = "return a jax array of the latents' shape"
    raise TypeError(f"model_fn must return an array, got a {kind}: {fix}")


def check_call_options(model_fn: Any, model_args: Any, guidance_layout: Any, model_dtype: Any) -> None:
    """The model call's own arguments, as every loop and the engine take them."""
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if not isinstance(model_args, tuple):
        raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
    if guidance_layout not in GUIDANCE_LAYOUTS:
        raise ValueError(f"guidance_layout must be one of {list(GUIDANCE_LAYOUTS)}, got {guidance_layout!r}")
    if model_dtype is not None and not jnp.issubdtype(model_dtype, jnp.floating):
        raise TypeError(f"model_dtype must be a float dtype or None, got {model_dtype!r}")


def _check_guider(guider: Any, guidance_scale: Any, model_args: tuple) -> None:
    if not isinstance(guider, Guider):
        raise TypeError(f"guider must be a Guider (e.g. ddim_jax.cfg(7.5)), got {type(guider).__name__}")
    if guidance_scale is not None:
        raise ValueError(
            "pass guidance_scale (the CFG shorthand) or guider, not both: "
            "cfg(guidance_scale, guidance_rescale) is the guider the shorthand makes"
        )
    if any(i >= len(model_args) for i in guider.conditional_args):
        raise ValueError(
            f"the guider's conditional_args {guider.conditional_args} name positions past "
            f"model_args, which has {len(model_args)} entries"
        )


class ModelCall(NamedTuple):
    """How a loop calls the model each step; build it with `ModelCall.build`, which checks it.

    ``guidance_layout`` orders the doubled batch of a guided call: ``"concat"`` (diffusers'
    ``[x, x]``, with conditioning ``concat([uncond, cond])``) or ``"interleave"``
    (``[x_0, x_0, x_1, x_1, ...]``, with conditioning ``stack([uncond, cond], 1)`` flattened to
    the batch axis), which keeps each example's pair on its device when the batch is sharded.
    ``guider`` (None: no guidance) turns the two outputs into one; ``state`` is the loop's
    `DDIMState`, from which each step's `GuidanceInfo` is read; ``supports`` is the loop's
    `Supports`.
    """

    model_fn: ModelFn
    model_args: tuple
    guider: Guider | None
    guidance_layout: str
    model_dtype: Any
    state: Any
    supports: Supports

    @classmethod
    def build(
        cls,
        supports: Supports,
        state: Any,
        latents: Any,
        model_fn: Any,
        model_args: Any,
        guidance_scale: Any,
        guidance_rescale: Any,
        guidance_layout: Any,
        guider: Any,
        model_dtype: Any,
    ) -> ModelCall:
        """The checked call for ``latents`` (the CFG shorthand turned into its `cfg` guider)."""
        check_call_options(model_fn, model_args, guidance_layout, model_dtype)
        check_guidance_combination(guidance_scale, guidance_rescale, guidance_layout, guider)
        if guider is None:
            if guidance_scale is not None:  # values and shapes, no compute
                guider = cfg(guidance_scale, guidance_rescale)  # the values (a scale_schedule too)
                for name, value in (
                    ("guidance_scale", guidance_scale),
                    ("guidance_rescale", guidance_rescale),
                ):
                    if not isinstance(value, ScaleSchedule):  # then each one's batch
                        per_example_value(name, numeric(name, value), latents)
        else:
            _check_guider(guider, guidance_scale, model_args)
            stateful = jax.tree.leaves(jax.eval_shape(guider.init, latents))
            if stateful and supports.no_guider_state is not None:
                raise ValueError(
                    f"{supports.name} needs a stateless guider (one whose init returns no arrays): "
                    f"{supports.no_guider_state}; a guider's state (e.g. apg's momentum) is carried "
                    "only by loops that make one model call per step, in order"
                )
        return cls(model_fn, model_args, guider, guidance_layout, model_dtype, state, supports)

    def init(self, x: jax.Array) -> Any:
        """The guider's initial state for latents ``x`` (``()`` without one)."""
        return () if self.guider is None else self.guider.init(x)

    def __call__(self, x: jax.Array, t: jax.Array, index: jax.Array) -> Any:
        """The (guided) model output for ``x`` at ``t`` (schedule entry ``index``), for a stateless guider."""
        return self.guided(x, t, index, self.init(x))[0]

    def guided(self, x: jax.Array, t: jax.Array, index: jax.Array, guider_state: Any) -> tuple[Any, Any]:
        """``(output, new guider state)`` for ``x`` at ``t``, the timestep of schedule entry
        ``index`` (`GuidanceInfo.step`): an array in ``x``'s dtype, or a `GuidedOutput`."""
        guider = self.guider
        x_in = x if self.model_dtype is None else x.astype(self.model_dtype)
        if guider is None:
            return self._single(x, x_in, t, self.model_args), guider_state
        info = GuidanceInfo(
            jnp.asarray(index, jnp.int32),
            self.state.num_inference_steps,
            t,
            self.state.alphas_cumprod[t],
            x,
            self.state.config.prediction_type,
            self.supports.inverse,
        )

        def guide(guider_state):
            uncond, cond = self._doubled(x, x_in, t)
            out, guider_state = guider.apply(guider_state, uncond, cond, info)
            if isinstance(out, GuidedOutput) and self.supports.no_split_output is not None:
                raise ValueError(f"{self.supports.name} {self.supports.no_split_output}")
            check_same_shape(
                "the guider's output", out.denoise if isinstance(out, GuidedOutput) else out, "latents", x
            )
            return jax.tree.map(lambda v: v.astype(x.dtype), out), guider_state

        if guider.active is None:
            return guide(guider_state)
        split = []

        def guided_branch(guider_state):
            out, guider_state = guide(guider_state)
            split.append(isinstance(out, GuidedOutput))
            return (out if split[-1] else GuidedOutput(out, out)), guider_state

        def conditional_branch(guider_state):
            cond = self._conditional(x, x_in, t, guider.conditional_args)
            return GuidedOutput(cond, cond), guider_state

        out, guider_state = jax.lax.cond(guider.active(info), guided_branch, conditional_branch, guider_state)
        return (out if split[-1] else out.denoise), guider_state

    def _single(self, x: jax.Array, x_in: jax.Array, t: jax.Array, model_args: tuple) -> jax.Array:
        out = self.model_fn(x_in, t, *model_args)
        check_model_output(out)
        check_same_shape("model_fn output", out, "latents", x)
        return out.astype(x.dtype)

    def _doubled(self, x: jax.Array, x_in: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The unconditional and conditional outputs of one call on the doubled batch."""
        batch = x.shape[0]
        if self.guidance_layout == "concat":
            doubled = jnp.concatenate([x_in, x_in])
        else:
            doubled = jnp.repeat(x_in, 2, axis=0)
        out = self.model_fn(doubled, t, *self.model_args)
        check_model_output(out)
        if jnp.shape(out) != doubled.shape:
            order = "[uncond, cond]" if self.guidance_layout == "concat" else "[uncond_0, cond_0, ...]"
            raise ValueError(
                f"Shape mismatch: with guidance, model_fn must return the doubled batch "
                f"{order} of shape {doubled.shape}, got {jnp.shape(out)}"
            )
        out = out.astype(x.dtype)
        if self.guidance_layout == "concat":
            return tuple(jnp.split(out, 2))
        pairs = out.reshape((batch, 2) + x.shape[1:])
        return pairs[:, 0], pairs[:, 1]

    def _conditional(
        self, x: jax.Array, x_in: jax.Array, t: jax.Array, positions: tuple[int, ...]
    ) -> jax.Array:
        """The conditional output alone: one call on ``x`` with the conditioning at ``positions``
        halved, or (no positions) the doubled call's conditional half."""
        if not positions:
            return self._doubled(x, x_in, t)[1]
        batch = x.shape[0]

        def half(a):
            if jnp.shape(a)[:1] != (2 * batch,):
                raise ValueError(
                    f"conditional_args: model_args entries at {positions} must hold the doubled batch "
                    f"(leading axis 2 * batch = {2 * batch}), got an array of shape {jnp.shape(a)}"
                )
            return a[batch:] if self.guidance_layout == "concat" else a[1::2]

        args = tuple(
            jax.tree.map(half, arg) if i in positions else arg for i, arg in enumerate(self.model_args)
        )
        return self._single(x, x_in, t, args)
