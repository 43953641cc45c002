"""Shared by the model tests (pytest puts this folder on sys.path)."""

import torch


def greedy(model, inputs, steps=5, **kwargs):
    """Exactly `steps` greedy tokens, with the logits of every step."""
    with torch.no_grad():
        return model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
