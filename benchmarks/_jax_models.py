"""Flax (linen) twins of compare.py's torch models, the torch -> Flax weight copy, and the jitted optax step.

Submodules are named after the torch parameter paths ("blocks.0", "mlp.2", "3", "body.4"), so `load_torch` can map
every torch tensor to its Flax leaf by name and check the shapes: a missing, extra or misshaped tensor is an error,
which keeps the two architectures in step. Where they differ (layout, not FLOPs), a comment says so.
Imported only by compare.py's JAX runner, after it has set XLA's environment (threads, GPU preallocation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

LN_EPS = 1e-5  # torch's LayerNorm / BatchNorm eps (Flax's LayerNorm defaults to 1e-6)


class MLP(nn.Module):
    """torch: Sequential(Flatten, Linear, ReLU, ..., Linear); the Linears sit at indices 1, 3, 5, ..."""

    sizes: Sequence[int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, n in enumerate(self.sizes[1:]):
            x = nn.Dense(n, name=str(1 + 2 * i))(nn.relu(x) if i else x)
        return x


class Block(nn.Module):
    """Pre-norm block: x + proj(causal attention(ln1(x))), then x + mlp(ln2(x)), exact (erf) GELU as nn.GELU()."""

    d: int
    heads: int
    dtype: Any  # compute dtype of the matmuls (bf16 = torch's autocast); params stay fp32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = nn.Dense(3 * d, dtype=self.dtype, name="qkv")(nn.LayerNorm(LN_EPS, name="ln1")(x))
        # Same split of the 3d features as torch's view(b, t, 3, heads, d // heads); jax's attention takes
        # (batch, time, heads, head_dim) where torch's SDPA takes (batch, heads, time, head_dim).
        q, k, v = qkv.reshape(b, t, 3, self.heads, d // self.heads).transpose(2, 0, 1, 3, 4)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
        x = x + nn.Dense(d, dtype=self.dtype, name="proj")(y)
        h = nn.Dense(4 * d, dtype=self.dtype, name="mlp.0")(nn.LayerNorm(LN_EPS, name="ln2")(x))
        return x + nn.Dense(d, dtype=self.dtype, name="mlp.2")(nn.gelu(h, approximate=False))


class GPT(nn.Module):
    """Token + learned position embeddings, blocks, final LayerNorm, untied bias-free head (as the torch GPT)."""

    layers: int
    d: int
    heads: int
    t: int
    vocab: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, idx: jax.Array) -> jax.Array:
        # Embeddings and the residual stream stay fp32, as under torch's autocast (embedding is not autocast, and
        # fp32 + bf16 promotes to fp32); LayerNorm then sees fp32 and runs in fp32 in both.
        x = nn.Embed(self.vocab, self.d, name="tok")(idx) + nn.Embed(self.t, self.d, name="pos")(jnp.arange(idx.shape[1]))
        for i in range(self.layers):
            x = Block(self.d, self.heads, self.dtype, name=f"blocks.{i}")(x)
        x = nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="head")(nn.LayerNorm(LN_EPS, name="ln")(x))
        return x.reshape(-1, self.vocab)


def _conv(c: int, stride: int, name: str) -> nn.Conv:
    return nn.Conv(c, (3, 3), strides=stride, padding=((1, 1), (1, 1)), use_bias=False, name=name)


def _bn(name: str) -> nn.BatchNorm:
    # Training mode (batch statistics), like the torch model in train(). Flax's momentum is torch's 1 - momentum;
    # Flax updates the running variance with the biased batch variance, torch with the unbiased one (running
    # stats only; the training forward is the same).
    return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=LN_EPS, name=name)


class Res(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))); torch names its layers body.0, body.1, body.3, body.4."""

    c: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(_bn("body.1")(_conv(self.c, 1, "body.0")(x)))
        return nn.relu(x + _bn("body.4")(_conv(self.c, 1, "body.3")(h)))


class ResNet(nn.Module):
    """compare.resnet(): stem, Res, two stride-2 stages (conv, bn, relu, Res), average pool, Linear.

    Takes NHWC images (Flax's layout; torch's is NCHW): the runner transposes the batch once, the weight copy
    transposes the kernels. Same convolutions and FLOPs, different memory layout.
    """

    width: int = 32
    classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.width
        x = Res(w, name="3")(nn.relu(_bn("1")(_conv(w, 1, "0")(x))))
        for i, c in ((4, 2 * w), (8, 4 * w)):  # torch indices of each stage's conv, bn, relu, Res
            x = Res(c, name=str(i + 3))(nn.relu(_bn(str(i + 1))(_conv(c, 2, str(i))(x))))
        return nn.Dense(self.classes, name="14")(x.mean(axis=(1, 2)))


# Flax leaf name -> torch tensor name suffix (per collection).
_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "embedding"): "weight",
           ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def load_torch(shapes: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Flax variables with the torch model's values: Linear weights transposed (out, in) -> (in, out), conv
    kernels (out, in, kh, kw) -> (kh, kw, in, out). `shapes` is the variables' structure (jax.eval_shape of init).
    Every torch tensor must be used once, with the matching shape (BatchNorm's num_batches_tracked has no twin)."""
    wanted = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    out = {}
    for path, leaf in flatten_dict(shapes).items():
        name = ".".join(path[1:-1]) + "." + _LEAVES[path[0], path[-1]]
        value = wanted.pop(name).detach().float().cpu().numpy()
        if path[-1] == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
        if value.shape != leaf.shape:
            raise ValueError(f"{name}: torch {value.shape} vs flax {leaf.shape}")
        out[path] = np.array(value, dtype=leaf.dtype, order="C")  # a copy: jax may alias host memory on the CPU
    if wanted:
        raise ValueError(f"torch tensors with no Flax twin: {sorted(wanted)}")
    return unflatten_dict(out)


def make_step(net: nn.Module, tx: optax.GradientTransformation) -> Callable[..., tuple[Any, jax.Array]]:
    """`step(state, x, y) -> (state, loss)` with state = (params, batch_stats, opt_state): forward, cross-entropy
    (on fp32 logits, as torch's autocast runs cross_entropy in fp32), backward, optax update. Jitted, the state
    donated so XLA updates it in place (as torch's optimizers do)."""

    def loss_fn(params: Any, batch_stats: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
        logits, updates = net.apply({"params": params, "batch_stats": batch_stats}, x, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
        return loss, updates.get("batch_stats", batch_stats)

    def step(state: tuple[Any, Any, Any], x: jax.Array, y: jax.Array) -> tuple[tuple[Any, Any, Any], jax.Array]:
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return jax.jit(step, donate_argnums=0)
