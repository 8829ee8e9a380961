"""The three exportable graphs of Qwen2.5-VL: vision, embedding and decoder.

Each is a small ``nn.Module`` over the weights of a loaded
``Qwen2_5_VLForConditionalGeneration`` that computes exactly what the HF model computes, but
with an I/O contract an ONNX or TensorRT graph can hold (see ``docs/bundle.md``):

* every grid-dependent index of the vision tower (rotary positions, window permutation and
  its inverse, attention segments) comes from the host (``gmner_rt.vision``), and the packed
  variable-length attention is a block-diagonal additive mask built from the segment bounds;
* the 3-row M-RoPE position ids come from the host; the graph turns them into cos/sin;
* the decoder takes an explicit past KV cache and a 2-D key-padding mask and builds the
  causal mask itself (offset by the past length); it returns logits only for the positions
  ``logits_index`` names (prefill asks for the last one, so it never materialises
  ``[B, T, vocab]``; a speculative verification step asks for the last K).

Attention is written out (scores, fp32 softmax, weighted sum) rather than through SDPA, so the
exported graph is the same for prefill and decode and keeps softmax in fp32 in an fp16 graph.
The decoder's graph is kept lean, since a decode step is a few MB of activations around GBs of
weights and every extra node costs a kernel launch: head reshapes are single ``Reshape`` nodes
with constant shapes (:func:`reshape_tail`), grouped-query attention is a broadcast matmul
instead of repeated keys, and the rotary half-split is a constant.
RMSNorms are HF's modules, which already compute in fp32. This module knows nothing about
ONNX files, bundles or tokenization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DecoderGraph", "EmbeddingGraph", "VisionGraph", "rotate_half", "segment_mask"]

#: Additive mask value for a disallowed key; finite so fully masked (padding) rows stay finite.
MASKED = torch.finfo(torch.float32).min


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split on the last axis (rotary embedding)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def segment_mask(cu_seqlens: torch.Tensor, length: torch.Tensor | int) -> torch.Tensor:
    """Additive ``[1, 1, N, N]`` fp32 mask: 0 where two positions share a segment, else MASKED.

    ``cu_seqlens`` holds the segment bounds ``[0, s1, s1+s2, ..., N]`` (as in flash-attention's
    var-len API); position ``p`` is in segment ``sum(p >= cu_seqlens[1:])``.
    """
    positions = torch.arange(length, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = (positions[:, None] >= cu_seqlens[None, 1:]).to(torch.int64).sum(-1)
    same = segment[:, None] == segment[None, :]
    zero = torch.zeros((), dtype=torch.float32, device=cu_seqlens.device)
    return torch.where(same, zero, MASKED)[None, None]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """Softmax attention with an additive fp32 mask; q/k/v ``[B, H, T, d]`` of equal heads."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale + mask
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class _Reshape(torch.autograd.Function):
    """``x.reshape(*x.shape[:keep], *tail)``, exported as one ONNX ``Reshape`` whose shape is a
    constant (``0`` copies a leading dim) instead of a Shape/Gather/Concat chain per call."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: int, tail: tuple[int, ...]) -> torch.Tensor:
        return x.reshape(*x.shape[:keep], *tail)

    @staticmethod
    def symbolic(g, x, keep: int, tail: tuple[int, ...]):
        shape = torch.tensor([0] * keep + list(tail), dtype=torch.int64)
        return g.op("Reshape", x, g.op("Constant", value_t=shape))


def reshape_tail(x: torch.Tensor, keep: int, *tail: int) -> torch.Tensor:
    """Keep the first ``keep`` dims of ``x`` and reshape the rest to ``tail``, which holds
    exactly one -1 (the TorchScript exporter's shape inference needs it beside the 0s)."""
    if tail.count(-1) != 1:
        raise ValueError(f"tail: expected exactly one -1, got {tail}")
    if torch.jit.is_tracing():
        return _Reshape.apply(x, keep, tuple(tail))
    return x.reshape(*x.shape[:keep], *tail)


class VisionGraph(nn.Module):
    """Qwen2.5-VL's vision tower and merger with host-computed indices.

    Inputs: ``pixel_values [P, C*T*p*p]``, ``rot_pos_ids [P, 2]`` (h, w of each patch in
    processor order), ``window_index [G]`` and its inverse ``reverse_index [G]`` (G = P /
    merge^2 merge groups), ``cu_seqlens [images+1]`` and ``cu_window_seqlens [windows+1]``
    (segment bounds, in patches, of full and windowed attention). Output: ``image_embeds
    [G, out_hidden]`` in processor order, what HF scatters into the image-pad positions.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        config = visual.config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.unit = config.spatial_merge_size**2
        self.full_attention = frozenset(config.fullatt_block_indexes)

    def forward(
        self,
        pixel_values: torch.Tensor,
        rot_pos_ids: torch.Tensor,
        window_index: torch.Tensor,
        reverse_index: torch.Tensor,
        cu_seqlens: torch.Tensor,
        cu_window_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        weight = self.visual.patch_embed.proj.weight  # Conv3d with kernel == stride: a matmul
        hidden = F.linear(pixel_values.to(weight.dtype), weight.reshape(self.embed_dim, -1))
        length = hidden.shape[0]
        hidden = self._to_windows(hidden, window_index, length)
        cos, sin = self._rotary(rot_pos_ids)
        cos = self._to_windows(cos, window_index, length)
        sin = self._to_windows(sin, window_index, length)
        full_mask = segment_mask(cu_seqlens, length)
        window_mask = segment_mask(cu_window_seqlens, length)
        for index, block in enumerate(self.visual.blocks):
            mask = full_mask if index in self.full_attention else window_mask
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = self.visual.merger(hidden)
        return merged[reverse_index]

    def _to_windows(self, x: torch.Tensor, window_index: torch.Tensor, length) -> torch.Tensor:
        """Reorder rows group-wise (``merge^2`` consecutive patches) into window order."""
        return x.reshape(-1, self.unit, x.shape[-1])[window_index].reshape(length, -1)

    def _rotary(self, rot_pos_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.visual.rotary_pos_emb.inv_freq.float()
        freqs = rot_pos_ids[..., None].float() * inv_freq  # [P, 2, d/4]
        freqs = torch.cat((freqs[:, 0], freqs[:, 1]), dim=-1)  # [P, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        return emb.cos(), emb.sin()

    def _attention(self, attn: nn.Module, x, cos, sin, mask) -> torch.Tensor:
        length = x.shape[0]
        qkv = attn.qkv(x).reshape(length, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [heads, P, d]
        q = self._rotate(q, cos, sin)
        k = self._rotate(k, cos, sin)
        out = _attend(q[None], k[None], v[None], mask, attn.scaling)[0]  # [heads, P, d]
        return attn.proj(out.transpose(0, 1).reshape(length, -1))

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in fp32, as HF's ``apply_rotary_pos_emb_vision``."""
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class EmbeddingGraph(nn.Module):
    """Token embedding: ``input_ids [B, T]`` -> ``inputs_embeds [B, T, hidden]``."""

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """The text decoder with an explicit KV cache; logits of the positions asked for only.

    Inputs: ``inputs_embeds [B, T, hidden]``, ``attention_mask [B, P+T]`` (1 real, 0 padding),
    ``position_ids [3, B, T]`` (M-RoPE rows t, h, w), ``logits_index [K]`` (positions within
    the call, ``0 <= i < T``, whose logits are returned: ``[T-1]`` for prefill and a plain
    step, the last K to verify K-1 drafted tokens), then ``past_key_i, past_value_i
    [B, kv_heads, P, head_dim]`` for each layer. Outputs: ``logits [B, K, vocab]``, then
    ``present_key_i, present_value_i [B, kv_heads, P+T, head_dim]``. K is the length of an
    input, not a value inside one, so every shape stays inferable (TensorRT profiles, dynamo).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        language_model = model.model.language_model
        config = language_model.config
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.lm_head = model.lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.mrope_section = tuple(language_model.rotary_emb.mrope_section)
        self.register_buffer(
            "inv_freq",
            language_model.rotary_emb.inv_freq.detach().float().clone(),
            persistent=False,
        )

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_index, *past):
        length = inputs_embeds.shape[1]
        cos, sin = self._rotary(position_ids, inputs_embeds.dtype)  # [B, 1, T, d]
        mask = self._mask(attention_mask, length)  # [B, 1, T, P+T]
        hidden = inputs_embeds
        presents: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            past_kv = (past[2 * index], past[2 * index + 1])
            attn_out, key, value = self._attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, mask, past_kv
            )
            presents += [key, value]
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        kept = torch.index_select(hidden, 1, logits_index)  # [B, K, hidden]
        logits = self.lm_head(self.norm(kept))
        return (logits, *presents)

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """M-RoPE cos/sin ``[B, 1, T, head_dim]`` from 3-row position ids, as HF computes them."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [3, B, T, d/2]
        chunks = torch.split(freqs, list(self.mrope_section), dim=-1)
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _mask(attention_mask: torch.Tensor, length) -> torch.Tensor:
        """Causal (offset by the past length) AND key padding, as an additive fp32 mask."""
        total = attention_mask.shape[1]
        keys = torch.arange(total, device=attention_mask.device)
        queries = torch.arange(length, device=attention_mask.device) + (total - length)
        causal = keys[None, :] <= queries[:, None]  # [T, P+T]
        allowed = causal[None] & (attention_mask[:, None, :] != 0)  # [B, T, P+T]
        zero = torch.zeros((), dtype=torch.float32, device=attention_mask.device)
        return torch.where(allowed, zero, MASKED)[:, None]

    def _attention(self, attn: nn.Module, x, cos, sin, mask, past_kv):
        """Grouped-query attention without repeating keys: queries ``[B, kv, groups, T, d]``
        against keys ``[B, kv, 1, S, d]`` (a broadcast matmul); the same heads as HF's
        ``repeat_kv`` (query head ``h`` reads kv head ``h // groups``)."""
        kv, dim = self.num_kv_heads, self.head_dim
        q = reshape_tail(attn.q_proj(x), 2, kv, -1, dim).permute(0, 2, 3, 1, 4)
        k = reshape_tail(attn.k_proj(x), 2, -1, dim).transpose(1, 2)  # [B, kv, T, d]
        v = reshape_tail(attn.v_proj(x), 2, -1, dim).transpose(1, 2)
        q = self._rotate(q, cos[:, None], sin[:, None])
        k = self._rotate(k, cos, sin)
        key = torch.cat((past_kv[0], k), dim=2)
        value = torch.cat((past_kv[1], v), dim=2)
        out = _attend(q, key[:, :, None], value[:, :, None], mask[:, None], attn.scaling)
        out = reshape_tail(out.permute(0, 3, 1, 2, 4), 2, -1)  # [B, T, heads * d]
        return attn.o_proj(out), key, value

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding; the half split is a constant of the graph, not a shape lookup."""
        half = self.head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
