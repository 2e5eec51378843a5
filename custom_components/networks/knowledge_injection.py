"""Knowledge injection: learnable task queries read the prompt and give one context per U-Net level.

This is the text-conditioning module of GuideGen (paper Fig. 1d, Eq. 3-4). Instead of feeding raw text
tokens to every cross-attention layer of the denoising U-Net, a small set of learnable task queries first
reads the encoded prompt through a transformer decoder; the decoder's response is then projected separately
for each U-Net level:

    Eq. 3:  R   = Decoder(Q, E_text)       Q in R^{N x d} learnable task queries, E_text the prompt's
                                           token features (projected to d), R in R^{N x d} the response
    Eq. 4:  c_l = W_l R                    c_l in R^{N x C_l}, the context of U-Net level l ("R_layer")

Every decoder block is pre-norm: self-attention among the queries, cross-attention from the queries to the
text tokens (padding tokens masked out), then an MLP; a final LayerNorm follows the last block. The output
has a fixed number of tokens (N queries) whatever the prompt length, so the U-Net's cross-attention cost
does not depend on the prompt.

A batch item whose ``text_mask`` marks no real token has no prompt: its contexts are all zero, which is exactly
the null prompt of :meth:`~custom_components.networks.unet.TextConditionedUNet.null_contexts`. This lets one
batched forward pass mix conditional and unconditional items (prompt dropout in training, classifier-free
guidance in sampling; beyond the paper). The text encoder refuses empty prompts, so such a mask only arises
on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["KnowledgeInjection"]


class KnowledgeInjection(nn.Module):
    """Task-query transformer decoder over text features, with one output projection per U-Net level.

    Args:
        text_dim: feature size D of the text encoder's token features.
        context_dims: context size C_l wanted by each U-Net level l (one output per entry).
        num_queries: number N of learnable task queries (= tokens of every output context).
        hidden_dim: width d of the queries and of the decoder.
        num_layers: number of decoder blocks.
        num_heads: attention heads per block; must divide ``hidden_dim``.
        dropout: dropout inside the decoder blocks.

    Example::

        inject = KnowledgeInjection(text_dim=384, context_dims=[64, 128, 256])
        contexts = inject(features, mask)  # [(B, 16, 64), (B, 16, 128), (B, 16, 256)]
    """

    def __init__(
        self,
        text_dim: int,
        context_dims: Sequence[int | None],
        num_queries: int = 16,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        context_dims = [None if c is None else int(c) for c in context_dims]
        if not any(c is not None for c in context_dims) or any(c is not None and c <= 0 for c in context_dims):
            raise ValueError(
                f"context_dims must list positive sizes (None for levels without context), got {context_dims}."
            )
        for name, value in (("text_dim", text_dim), ("num_queries", num_queries), ("hidden_dim", hidden_dim)):
            if int(value) <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if int(num_layers) < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}.")
        if int(num_heads) < 1 or hidden_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be positive and divide hidden_dim ({hidden_dim}).")

        self.text_dim = int(text_dim)
        self.context_dims = tuple(context_dims)
        self.num_queries = int(num_queries)
        self.hidden_dim = int(hidden_dim)

        # Small init (as for ViT/DETR query embeddings) keeps the first pre-norm blocks well conditioned.
        self.queries = nn.Parameter(torch.randn(self.num_queries, self.hidden_dim) * 0.02)
        self.text_proj = nn.Linear(self.text_dim, self.hidden_dim)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                d_model=self.hidden_dim,
                nhead=int(num_heads),
                dim_feedforward=4 * self.hidden_dim,
                dropout=float(dropout),
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(int(num_layers))
        )
        # Pre-norm blocks leave the residual stream un-normalised; normalise once before the projections.
        self.norm = nn.LayerNorm(self.hidden_dim)
        # Keyed by level: levels without context (None) get no projection, so no parameter is left unused.
        self.context_projs = nn.ModuleDict(
            {str(level): nn.Linear(self.hidden_dim, c) for level, c in enumerate(self.context_dims) if c is not None}
        )

    def forward(self, text_features: Tensor, text_mask: Tensor | None = None) -> list[Tensor | None]:
        """Compute the per-level contexts ``c_l`` (Eq. 3-4).

        Args:
            text_features: (B, L, text_dim) token features of the prompts.
            text_mask: (B, L), True (or nonzero) on real tokens, False on padding; None: every token is real.

        Returns:
            one entry per entry of ``context_dims``: (B, num_queries, context_dims[l]), None where that is None.
            Items whose ``text_mask`` row has no real token get all-zero contexts (the null prompt).

        Raises:
            ValueError: wrong shapes.
        """
        if text_features.ndim != 3 or text_features.shape[-1] != self.text_dim:
            raise ValueError(
                f"text_features must have shape (batch, tokens, {self.text_dim}), got {tuple(text_features.shape)}: "
                "KnowledgeInjection.text_dim must equal the text encoder's hidden size."
            )
        padding_mask = None
        has_prompt = None  # (B, 1, 1) bool where some item has no prompt, else None
        if text_mask is not None:
            if text_mask.shape != text_features.shape[:2]:
                raise ValueError(
                    f"text_mask must have shape {tuple(text_features.shape[:2])} (batch, tokens), "
                    f"got {tuple(text_mask.shape)}."
                )
            valid = text_mask.to(device=text_features.device).bool()
            any_token = valid.any(dim=1)
            if not bool(any_token.all()):
                # All keys masked would make the cross-attention softmax NaN (in the forward and the backward
                # pass); such items read every token instead and their contexts are replaced by zeros below.
                valid = valid | ~any_token[:, None]
                has_prompt = any_token[:, None, None]
            padding_mask = ~valid  # PyTorch attention masks are True where attention is NOT allowed

        memory = self.text_proj(text_features)
        response = self.queries.unsqueeze(0).expand(text_features.shape[0], -1, -1)
        for layer in self.layers:
            response = layer(response, memory, memory_key_padding_mask=padding_mask)
        response = self.norm(response)
        contexts = [
            None if dim is None else self.context_projs[str(level)](response)
            for level, dim in enumerate(self.context_dims)
        ]
        if has_prompt is None:
            return contexts
        # torch.where rather than a product: nothing of a dropped item (even a non-finite value) leaks through, and
        # the projections stay in the graph, so every parameter still gets a (zero) gradient, as DDP requires.
        return [None if c is None else torch.where(has_prompt, c, torch.zeros_like(c)) for c in contexts]
