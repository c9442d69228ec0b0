"""Answer-only causal-LM loss that computes logits only where a label is trained.

transformers' loss projects every position onto the vocabulary (SmolLM2: 576 × 49,152 per token, about a fifth
of the model's arithmetic) and takes the cross-entropy of all of them, then ignores the prompt's positions.
With answer-only labels most of that is thrown away; here the decoder's hidden states are gathered at the
trained positions first. The value equals transformers' ForCausalLMLoss (sum over trained tokens divided by
`num_items_in_batch`, else by their count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _causal_lm(model):
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_only_loss(model, inputs: dict, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over trained positions of `inputs` (a batch with `labels`)."""
    causal_lm = _causal_lm(model)
    labels = inputs["labels"]
    features = {key: value for key, value in inputs.items() if key != "labels"}
    hidden = causal_lm.get_decoder()(**features).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][trained]).float()
    total = F.cross_entropy(logits, targets[trained], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else trained.sum()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count


def has_answer_only_loss(model) -> bool:
    """Whether `model` exposes the decoder and output projection this loss needs (every causal LM in transformers)."""
    causal_lm = _causal_lm(model)
    try:
        return causal_lm.get_decoder() is not None and causal_lm.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False
