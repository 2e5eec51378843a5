"""KnowledgeInjection (paper Eq. 3-4): shapes, padding handling, gradients, batch independence, end to end."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from helpers_tiny_text import TINY_TEXT_HIDDEN_SIZE, make_tiny_text_encoder_dir

from custom_components.networks import KnowledgeInjection, TextEncoder

TEXT_DIM = 24
CONTEXT_DIMS = (16, 32, 64)


def _module(**overrides) -> KnowledgeInjection:
    torch.manual_seed(0)
    kwargs = dict(text_dim=TEXT_DIM, context_dims=CONTEXT_DIMS, num_queries=8, hidden_dim=32, num_heads=4)
    kwargs.update(overrides)
    return KnowledgeInjection(**kwargs).eval()


def _text(batch: int = 2, tokens: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def test_one_context_per_level_with_the_right_shape() -> None:
    module = _module()
    contexts = module(_text(batch=3, tokens=7))
    assert isinstance(contexts, list) and len(contexts) == len(CONTEXT_DIMS)
    for context, dim in zip(contexts, CONTEXT_DIMS):
        assert context.shape == (3, 8, dim) and context.dtype == torch.float32
        assert torch.isfinite(context).all()
    # Output size does not depend on the prompt length.
    assert module(_text(batch=3, tokens=2))[0].shape == (3, 8, CONTEXT_DIMS[0])


def test_padding_tokens_masked_out_do_not_change_the_output() -> None:
    module = _module()
    text = _text(batch=2, tokens=5)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    # Pad both items with 4 extra tokens of large garbage, marked False.
    padded = torch.cat([text, 50 * torch.randn(2, 4, TEXT_DIM)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        reference = module(text, mask)
        extended = module(padded, padded_mask)
        truncated = module(text[1:, :3], None)  # item 1 with only its real tokens
    for ref, ext in zip(reference, extended):
        torch.testing.assert_close(ext, ref, atol=1e-5, rtol=1e-5)
    for ref, short in zip(reference, truncated):
        torch.testing.assert_close(ref[1:], short, atol=1e-5, rtol=1e-5)


def test_padding_without_a_mask_changes_the_output() -> None:
    # Sanity check of the test above: the mask is what makes padding harmless.
    module = _module()
    text = _text(batch=1, tokens=5)
    padded = torch.cat([text, torch.randn(1, 4, TEXT_DIM)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    with torch.no_grad():
        masked, unmasked = module(padded, mask)[0], module(padded)[0]
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_integer_mask_is_accepted() -> None:
    module = _module()
    text = _text()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(module(text, mask)[1], module(text, mask.bool())[1])


def test_gradients_reach_the_queries_and_all_projections() -> None:
    module = _module().train()
    text = _text().requires_grad_(True)
    contexts = module(text, torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    sum(context.square().mean() for context in contexts).backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert text.grad is not None and text.grad[1, 3:].abs().sum() == 0  # no gradient into padding


def test_batch_items_are_independent() -> None:
    module = _module()
    text = _text(batch=3, tokens=6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    with torch.no_grad():
        batched = module(text, mask)
        for item in range(3):
            alone = module(text[item : item + 1], mask[item : item + 1])
            for b, a in zip(batched, alone):
                torch.testing.assert_close(b[item : item + 1], a, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors() -> None:
    module = _module()
    with pytest.raises(ValueError, match=rf"\(batch, tokens, {TEXT_DIM}\).*text encoder's hidden size"):
        module(torch.randn(2, 5, TEXT_DIM + 1))
    with pytest.raises(ValueError, match="text_features must have shape"):
        module(torch.randn(5, TEXT_DIM))
    with pytest.raises(ValueError, match="text_mask must have shape"):
        module(_text(), torch.ones(2, 4, dtype=torch.bool))


def test_a_mask_without_real_tokens_is_the_null_prompt() -> None:
    # Prompt dropout / classifier-free guidance: such an item gets the all-zero contexts of
    # TextConditionedUNet.null_contexts, the other items are untouched, and nothing is NaN in either pass.
    module = _module()
    text = _text(batch=2).requires_grad_(True)
    mask = torch.tensor([[True] * 5, [False] * 5])
    mixed = module(text, mask)
    alone = module(text[:1].detach(), mask[:1])
    for m, a in zip(mixed, alone):
        torch.testing.assert_close(m[:1], a, atol=1e-6, rtol=1e-6)
        assert torch.equal(m[1], torch.zeros_like(m[1]))
    sum(c.sum() for c in mixed).backward()
    assert torch.isfinite(text.grad).all() and torch.equal(text.grad[1], torch.zeros_like(text.grad[1]))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="context_dims"):
        KnowledgeInjection(text_dim=8, context_dims=[])
    with pytest.raises(ValueError, match="divide hidden_dim"):
        KnowledgeInjection(text_dim=8, context_dims=[8], hidden_dim=30, num_heads=8)
    with pytest.raises(ValueError, match="num_layers"):
        KnowledgeInjection(text_dim=8, context_dims=[8], num_layers=0)


def test_end_to_end_with_the_tiny_text_encoder(tmp_path: Path) -> None:
    encoder = TextEncoder(make_tiny_text_encoder_dir(tmp_path))
    module = _module(text_dim=encoder.hidden_size).train()
    assert encoder.hidden_size == TINY_TEXT_HIDDEN_SIZE
    prompts = [
        "The patient is a 63-year-old male. In this imaging, the patient's condition is described as "
        "hepatocellular carcinoma, with a tumor in the liver.",
        "The patient is female.",
    ]
    features, mask = encoder(prompts)
    contexts = module(features, mask)
    assert [tuple(c.shape) for c in contexts] == [(2, 8, d) for d in CONTEXT_DIMS]
    sum(c.mean() for c in contexts).backward()
    assert module.queries.grad is not None and module.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())  # the text encoder stays frozen
    # The two prompts give different contexts.
    assert not torch.allclose(contexts[0][0], contexts[0][1], atol=1e-4)
