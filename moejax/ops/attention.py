"""Dot-product attention kernels behind one function, all with grouped-query attention (GQA).

`attention(q, k, v, impl=...)` picks a kernel:
- "reference": plain float32 softmax attention; builds the [B, H, L, M] scores (ground truth).
- "blockwise": online-softmax (flash) attention in pure JAX with a recomputing backward; memory
  linear in L for forward and backward; runs anywhere (moejax.ops.blockwise_attention).
- "xla": `jax.nn.dot_product_attention`, asking for cuDNN flash attention on GPU for bf16/fp16
  inputs (jax's own default, implementation=None, means its XLA path, which also builds the
  scores). GQA is native there.
- "tpu_splash": the Pallas splash-attention kernel of `jax.experimental.pallas.ops.tpu` (imported
  lazily), for prefill/training with a static q_offset on TPU.
- "auto": tpu -> tpu_splash (xla when q_offset is traced, i.e. decoding, or L < 128),
  gpu -> xla, cpu and others -> blockwise for L >= AUTO_BLOCKWISE_MIN_LEN, else reference.

Every kernel shares the semantics of moejax.ops.attention_mask: query l is at position
q_offset + l, keys at positions >= kv_len or after the query (causal) get probability exactly 0.
Query head h uses key/value head h // (H // G), the layout of jax.nn.dot_product_attention and
of splash attention, so a KV cache stores only the G key/value heads.

Einsum letters: b batch, l query position, m key position, h query heads, g key/value heads,
r query heads per key/value head (H = G * R), k head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.ops import attention_mask
from moejax.ops.blockwise_attention import blockwise_attention

IMPLS = ("auto", "reference", "blockwise", "xla", "tpu_splash")
# Below this many queries (decoding, short prompts) the [L, M] scores are small: use reference.
AUTO_BLOCKWISE_MIN_LEN = 1024
# Splash attention tiles the sequence in multiples of the TPU lane width.
SPLASH_LANES = 128


def reference_attention(
  q_blhk, k_bmgk, v_bmgk, *, q_offset=0, kv_len=None, causal: bool = True, scale=None
) -> jax.Array:
  """Softmax attention in float32 over the full [B, G, R, L, M] score tensor.

  Args:
    q_blhk: [B, L, H, K] queries.
    k_bmgk: [B, M, G, K] keys (G divides H).
    v_bmgk: [B, M, G, K] values.
    q_offset: int or int32 scalar (may be traced): absolute position of query 0.
    kv_len: None, int32 scalar or int32 [B]: keys at positions >= kv_len are not visible.
    causal: a query sees only keys at positions <= its own.
    scale: score scale, default K ** -0.5.

  Returns:
    [B, L, H, K] in q's dtype; a query with no visible key gets zeros.
  """
  num_heads, num_kv_heads = attention_mask.check_shapes(q_blhk, k_bmgk, v_bmgk, kv_len)
  b, length, _, head_dim = q_blhk.shape
  max_len = k_bmgk.shape[1]
  scale = head_dim**-0.5 if scale is None else scale
  q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
  mask_lm = attention_mask.visible_mask(
    q_pos, jnp.arange(max_len, dtype=jnp.int32), num_keys=max_len, kv_len=kv_len, causal=causal
  )
  v32 = v_bmgk.astype(jnp.float32)
  if num_kv_heads == num_heads:  # plain multi-head attention: [B, H, L, M] scores, no grouping
    s = jnp.einsum("blhk,bmhk->bhlm", q_blhk, k_bmgk, preferred_element_type=jnp.float32)
    probs = _masked_softmax(s * scale, mask_lm[:, None])
    return jnp.einsum("bhlm,bmhk->blhk", probs, v32).astype(q_blhk.dtype)
  q_blgrk = q_blhk.reshape(b, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  s = jnp.einsum("blgrk,bmgk->bgrlm", q_blgrk, k_bmgk, preferred_element_type=jnp.float32)
  probs = _masked_softmax(s * scale, mask_lm[:, None, None])
  out = jnp.einsum("bgrlm,bmgk->blgrk", probs, v32)
  return out.reshape(q_blhk.shape).astype(q_blhk.dtype)


def _masked_softmax(scores, mask):
  """Softmax over the last axis of the visible entries; masked entries and rows without any
  visible key get probability exactly 0 (instead of NaN)."""
  s = jnp.where(mask, scores, -jnp.inf)
  return jnp.where(mask, jax.nn.softmax(jnp.where(mask.any(-1, keepdims=True), s, 0.0)), 0.0)


def xla_fused_attention(
  q_blhk,
  k_bmgk,
  v_bmgk,
  *,
  q_offset=0,
  kv_len=None,
  causal: bool = True,
  scale=None,
  implementation: str | None = None,
) -> jax.Array:
  """`jax.nn.dot_product_attention` with moejax's masking semantics (arguments as reference).

  Training/prefill (causal, q_offset a static 0, L == M) uses `is_causal`, which lets cuDNN skip
  the upper triangle; otherwise (decoding) an explicit [B or 1, 1, L, M] mask is passed, small
  since L is small. `implementation`: None = "cudnn" on GPU for bf16/fp16, else "xla".
  """
  attention_mask.check_shapes(q_blhk, k_bmgk, v_bmgk, kv_len)
  (b, length), max_len = q_blhk.shape[:2], k_bmgk.shape[1]
  if implementation is None:
    low_precision = q_blhk.dtype in (jnp.bfloat16, jnp.float16)
    implementation = "cudnn" if jax.default_backend() == "gpu" and low_precision else "xla"
  kwargs = {}
  prefill = attention_mask.is_static_int(q_offset) and int(q_offset) == 0 and length == max_len
  if causal and prefill:
    kwargs["is_causal"] = True
    if kv_len is not None:
      kwargs["key_value_seq_lengths"] = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,))
  else:
    q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
    kwargs["mask"] = attention_mask.visible_mask(
      q_pos, jnp.arange(max_len, dtype=jnp.int32), num_keys=max_len, kv_len=kv_len, causal=causal
    )[:, None]
  dtype = q_blhk.dtype
  return jax.nn.dot_product_attention(
    q_blhk,
    k_bmgk.astype(dtype),
    v_bmgk.astype(dtype),
    scale=scale,
    implementation=implementation,
    **kwargs,
  )


def splash_attention(
  q_blhk,
  k_bmgk,
  v_bmgk,
  *,
  q_offset: int = 0,
  kv_len=None,
  causal: bool = True,
  scale=None,
  block: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """Pallas splash attention (TPU), arguments as reference; q_offset must be a static int.

  L and M are padded to multiples of 128; the causal mask (with q_offset) is static, and kv_len
  and the key padding become key segment ids (1 = not visible), so kv_len may be traced.
  `interpret=True` runs the kernel in the Pallas interpreter (slow; any backend, for tests).
  The kernel is per example and unsharded: under a mesh, call it inside `shard_map`.
  """
  num_heads, _ = attention_mask.check_shapes(q_blhk, k_bmgk, v_bmgk, kv_len)
  if not attention_mask.is_static_int(q_offset):
    raise ValueError("splash attention needs a static int q_offset; decode with impl='xla'")
  splash = _import_splash()
  (b, length, _, head_dim), max_len = q_blhk.shape, k_bmgk.shape[1]
  padded_q, padded_k = _round_up(length, SPLASH_LANES), _round_up(max_len, SPLASH_LANES)
  kernel = _splash_kernel(num_heads, padded_q, padded_k, int(q_offset), causal, block, interpret)
  scale = head_dim**-0.5 if scale is None else scale
  q = _padded_heads_major(q_blhk * jnp.asarray(scale, q_blhk.dtype), padded_q)
  k = _padded_heads_major(k_bmgk.astype(q.dtype), padded_k)
  v = _padded_heads_major(v_bmgk.astype(q.dtype), padded_k)
  limit = jnp.full((b,), max_len, jnp.int32)
  if kv_len is not None:
    limit = jnp.minimum(limit, jnp.asarray(kv_len, jnp.int32))
  kv_segment_bm = (jnp.arange(padded_k)[None, :] >= limit[:, None]).astype(jnp.int32)
  q_segment_bl = jnp.zeros((b, padded_q), jnp.int32)
  segments = splash.SegmentIds(q=q_segment_bl, kv=kv_segment_bm)
  out_bhlk = jax.vmap(kernel)(q, k, v, segment_ids=segments)
  return jnp.einsum("bhlk->blhk", out_bhlk[:, :, :length])


def _import_splash():
  try:
    from jax.experimental.pallas.ops.tpu import splash_attention
  except ImportError as e:
    raise ImportError(
      f"this jax ({jax.__version__}) has no jax.experimental.pallas.ops.tpu.splash_attention; "
      "use impl='xla' or 'blockwise'"
    ) from e
  return splash_attention


def _padded_heads_major(x_blhk, length: int):
  """[B, L, H, K] -> [B, H, length, K], zero-padded along L (the kernel's layout)."""
  padded = jnp.pad(x_blhk, [(0, 0), (0, length - x_blhk.shape[1]), (0, 0), (0, 0)])
  return jnp.einsum("blhk->bhlk", padded)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _largest_block(n: int, block: int) -> int:
  """The largest multiple of SPLASH_LANES <= block that divides n (n a multiple of the lanes)."""
  for size in range(min(block, n) // SPLASH_LANES * SPLASH_LANES, 0, -SPLASH_LANES):
    if n % size == 0:
      return size
  return SPLASH_LANES


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads, padded_q, padded_k, q_offset, causal, block, interpret):
  splash = _import_splash()
  shape = (padded_q, padded_k)
  one = splash.CausalMask(shape, offset=q_offset) if causal else splash.FullMask(shape)
  bq, bk = _largest_block(padded_q, block), _largest_block(padded_k, block)
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  return splash.make_splash_mha_single_device(
    splash.MultiHeadMask([one] * num_heads), block_sizes=sizes, interpret=interpret
  )


def resolve_impl(impl: str, *, length: int, q_offset=0, backend: str | None = None) -> str:
  """The kernel `attention` runs for `impl` on `backend` (default: jax.default_backend())."""
  backend = backend or jax.default_backend()
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
  if impl == "tpu_splash" and backend != "tpu":
    raise ValueError(f"impl='tpu_splash' needs a TPU (backend is {backend}); use 'auto'")
  if impl != "auto":
    return impl
  if backend == "tpu":
    static = attention_mask.is_static_int(q_offset)
    return "tpu_splash" if static and length >= SPLASH_LANES else "xla"
  if backend == "gpu":
    return "xla"
  return "blockwise" if length >= AUTO_BLOCKWISE_MIN_LEN else "reference"


def attention(
  q_blhk,
  k_bmgk,
  v_bmgk,
  *,
  impl: str = "auto",
  q_offset=0,
  kv_len=None,
  causal: bool = True,
  scale=None,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """[B, L, H, K] queries over [B, M, G, K] keys and values -> [B, L, H, K] in q's dtype.

  Args:
    q_blhk, k_bmgk, v_bmgk: queries, keys, values; H a multiple of G (GQA, MQA when G = 1).
    impl: one of IMPLS (see the module docstring); "auto" picks by platform.
    q_offset: absolute position of query 0: 0 for training, the cache fill when decoding.
    kv_len: None, int32 scalar or [B]: keys at positions >= kv_len are never attended.
    causal: queries see only keys at positions <= their own.
    scale: score scale, default K ** -0.5.
    block_q, block_k: tile sizes of the blockwise kernel (splash uses block_q for both).
  """
  kernel = resolve_impl(impl, length=q_blhk.shape[1], q_offset=q_offset)
  common = dict(q_offset=q_offset, kv_len=kv_len, causal=causal, scale=scale)
  if kernel == "reference":
    return reference_attention(q_blhk, k_bmgk, v_bmgk, **common)
  if kernel == "blockwise":
    return blockwise_attention(q_blhk, k_bmgk, v_bmgk, block_q=block_q, block_k=block_k, **common)
  if kernel == "xla":
    return xla_fused_attention(q_blhk, k_bmgk, v_bmgk, **common)
  return splash_attention(q_blhk, k_bmgk, v_bmgk, block=block_q, **common)
